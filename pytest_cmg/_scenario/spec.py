"""A small declarative spec language for scenario files, validated on YAML nodes.

Validation walks PyYAML's composed node tree rather than loaded Python objects because only nodes
remember their line (and, for included files, their file): every problem is reported with the file
and line it was found on, and all problems in a file are collected before anything is reported.
The same definitions generate the published JSON Schema (:meth:`Spec.schema`) and the key
reference, so the rules live in exactly one place.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .._errors import ScenarioProblem
from .limits import MAX_DURATION_SECONDS, MAX_SIZE, SHOWN_CHARS, clip, human_size, nearest, shown

__all__ = [
    "Anything",
    "Bool",
    "Bounds",
    "Choice",
    "Count",
    "Duration",
    "Field",
    "Int",
    "ListOf",
    "MapOf",
    "Marker",
    "Number",
    "Record",
    "Regex",
    "Size",
    "Spec",
    "Str",
    "Validation",
    "parse_duration",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_SCHEMA = r"^\s*\d+(\.\d+)?\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$"
_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")
_DURATION = re.compile(r"^(-?)((?:\d+(?:\.\d+)?(?:ms|s|m|h|d))+)$")
_DURATION_SCHEMA = r"^-?(\d+(\.\d+)?(ms|s|m|h|d))+$"
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MARKER_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def parse_duration(text: str) -> float | None:
    """Seconds in ``90s``, ``5m``, ``1h30m``, ``250ms``, ``-60s``; None when it is not one."""
    match = _DURATION.fullmatch(text.strip())
    if not match:
        return None
    seconds = sum(float(n) * _SECONDS[unit] for n, unit in _DURATION_PART.findall(match[2]))
    return -seconds if match[1] else seconds


def show_seconds(seconds: float) -> str:
    """Virtual time as a scenario writes it, and as :func:`parse_duration` reads it back:
    ``91d``, ``9h``, ``90s``, ``2.5s``; seconds alone below a minute or when no larger unit
    divides it (``7862400s`` or ``7.8624e+06s`` would hide that it is 91 days)."""
    sign, rest = ("-", -seconds) if seconds < 0 else ("", seconds)
    for unit in ("d", "h", "m"):
        size = _SECONDS[unit]
        if rest >= size and float(rest / size).is_integer():
            return f"{sign}{int(rest // size)}{unit}"
    return f"{sign}{rest:.10g}s"


@dataclass
class Validation:
    """Collects problems and remembers the line (and file) of every validated path (``a.b[0].c``).

    Nodes composed from an included file carry that file's name in their marks; problems on them
    are reported at that file and line, with ``included_from`` naming the line that included it.
    """

    path: Path
    problems: list[ScenarioProblem] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)
    #: Paths whose node came from another file than ``path`` (an include or a catalog entry).
    files: dict[str, Path] = field(default_factory=dict)
    #: For each included file, the text telling where it was included from.
    included_from: dict[Path, str] = field(default_factory=dict)
    #: YAML values composed so far for this scenario, its includes and refs included
    #: (:data:`~.limits.MAX_VALUES` is their budget).
    composed: int = 0

    def file_of(self, node: yaml.Node) -> Path:
        name = node.start_mark.name
        return Path(name) if name and not name.startswith("<") else self.path

    def problem(self, node: yaml.Node, rule: str, hint: str = "") -> None:
        path = self.file_of(node)
        self.problems.append(self.make(path, _line(node), rule, hint))

    def make(self, path: Path, line: int, rule: str, hint: str = "") -> ScenarioProblem:
        # Rules quote paths and keys from the file; clipped here, none of them is echoed whole.
        hint = clip(hint)
        origin = self.included_from.get(path)
        if origin:
            # Not clipped as a whole: it is the chain of files and lines that locates the
            # problem (each path is the reader's own, and includes nest at most a few deep).
            hint = f"{hint}; {origin}" if hint else origin
        return ScenarioProblem(path, line, clip(rule), hint)

    def remember(self, where: str, node: yaml.Node) -> None:
        self.lines[where] = _line(node)
        path = self.file_of(node)
        if path != self.path:
            self.files[where] = path
        else:
            self.files.pop(where, None)

    def _nearest(self, where: str) -> str:
        while where:
            if where in self.lines:
                return where
            parent = re.sub(r"(\.[^.\[]+|\[[^\]]*\]|^[^.\[]+)$", "", where)
            # Every step must shorten the path, or a never-validated key would loop forever.
            where = parent if parent != where else ""
        return ""

    def line(self, where: str) -> int:
        """The line of ``where`` or of its nearest validated ancestor."""
        return self.lines.get(self._nearest(where), 1)

    def location(self, where: str) -> tuple[Path, int]:
        """The file and line of ``where`` or of its nearest validated ancestor."""
        nearest = self._nearest(where)
        return self.files.get(nearest, self.path), self.lines.get(nearest, 1)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


_NULL_TAG = "tag:yaml.org,2002:null"


def is_null(node: yaml.Node) -> bool:
    """``key:``, ``key: ~`` and ``key: null`` all mean "no value"."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _scalar(node: yaml.Node) -> Any:  # noqa: ANN401 - YAML scalars are of any type
    return yaml.SafeLoader("").construct_object(node, deep=True)


#: What PyYAML's constructors raise on a value they cannot make (a bad tag, 2001-02-30, an
#: integer of more than 4300 digits, a number too large for a float).
_CONSTRUCTION_ERRORS = (yaml.YAMLError, ValueError, TypeError, OverflowError)


def _reason(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return clip(lines[0] if lines else type(exc).__name__, 120)


def _finite(value: float) -> float | None:
    """``value`` as a finite float, or None (inf, nan, or an integer beyond a float's range)."""
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def _where(where: str) -> str:
    return where or "the document"


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


class Spec:
    """Base of every rule; ``doc`` feeds the scenario reference and the JSON Schema."""

    doc: str = ""

    def check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        v.remember(where, node)
        return self._check(node, where, v)

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        """This rule as JSON Schema (draft 2020-12)."""
        raise NotImplementedError

    def sample(self) -> str:
        """A valid value, as YAML text, for the reference's examples."""
        raise NotImplementedError

    def _is_a(self, node: yaml.Node, kind: type[yaml.Node], where: str, v: Validation) -> bool:
        """Whether ``node`` is a list or mapping node of ``kind``; if not, the problem is noted
        (what it must be, as :meth:`describe` says) and the caller reads no further."""
        if isinstance(node, kind):
            return True
        v.problem(node, f"{_where(where)} must be {self.describe()}")
        return False

    def _scalar_of(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not isinstance(node, yaml.ScalarNode):
            v.problem(
                node,
                f"{_where(where)} must be {self.describe()}, not a "
                f"{'list' if isinstance(node, yaml.SequenceNode) else 'mapping'}",
            )
            return None
        if is_null(node):
            v.problem(node, f"{_where(where)} must be {self.describe()}, not empty")
            return None
        try:
            return _scalar(node)
        except _CONSTRUCTION_ERRORS as exc:
            # Explicit tags (!!int abc, !custom), impossible dates and integers of more than
            # 4300 digits fail in the constructor.
            v.problem(
                node,
                f"{_where(where)} {shown(node.value)} is not valid YAML for its tag: "
                f"{_reason(exc)}",
            )
            return None


@dataclass
class Str(Spec):
    pattern: str | None = None
    example: str = ""
    doc: str = ""
    #: An empty string is refused at its line: for a name that selects by substring (a blob's
    #: ``file``), "" would select everything, never what was meant.
    nonempty: bool = False

    def describe(self) -> str:
        if self.pattern:
            return f"a string matching {self.pattern}"
        return "a non-empty string" if self.nonempty else "a string"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        # The text as written: YAML would turn 0x00000000 into 0, yes into True, 1.10 into 1.1.
        value = node.value if isinstance(node, yaml.ScalarNode) else str(value)
        if self.nonempty and not value:
            hint = f"e.g. {self.example}" if self.example else ""
            v.problem(node, f"{where} must not be empty", hint)
            return None
        if self.pattern and not re.fullmatch(self.pattern, value):
            hint = f"e.g. {self.example}" if self.example else ""
            v.problem(node, f"{where} {shown(value)} must match {self.pattern}", hint)
            return None
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "string"}
        if self.nonempty:
            out["minLength"] = 1
        if self.pattern:
            out["pattern"] = f"^(?:{self.pattern})$"
        return out

    def sample(self) -> str:
        return self.example or "some text"


@dataclass
class Regex(Str):
    """A Python regular expression, searched in each line (``re.search``)."""

    def describe(self) -> str:
        return "a regular expression"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = super()._check(node, where, v)
        if value is None:
            return None
        try:
            re.compile(value)
        except re.error as exc:
            v.problem(
                node,
                f"{where} {shown(value)} is not a valid regular expression: {exc}",
                "escape . ( ) [ ] with a backslash to match them literally",
            )
            return None
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "regex"}

    def sample(self) -> str:
        return self.example or '"Hash verification succeeded for content PS100012\\\\.1"'


@dataclass
class Int(Spec):
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[int, ...] = ()
    doc: str = ""

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        text = "an integer"
        if self.minimum is not None and self.maximum is not None:
            return f"{text} from {self.minimum} to {self.maximum}"
        if self.maximum is not None:
            return f"{text} <= {self.maximum}"
        return text + (f" >= {self.minimum}" if self.minimum is not None else "")

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            v.problem(node, f"{where} must be {self.describe()}, got {shown(value)}")
            return None
        if (self.minimum is not None and value < self.minimum) or (
            self.maximum is not None and value > self.maximum
        ):
            v.problem(node, f"{where} must be {self.describe()}, got {shown(value)}")
            return None
        if self.choices and value not in self.choices:
            near = min(self.choices, key=lambda c: abs(c - value))
            v.problem(node, f"{where} {shown(value)} is not {self.describe()}", f"nearest: {near}")
            return None
        return value

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "integer"}
        if self.choices:
            out["enum"] = list(self.choices)
        if self.minimum is not None:
            out["minimum"] = self.minimum
        if self.maximum is not None:
            out["maximum"] = self.maximum
        return out

    def sample(self) -> str:
        if self.choices:
            return str(self.choices[-1])
        return str(max(self.minimum or 0, 1) if self.maximum is None or self.maximum >= 1 else 0)


@dataclass
class Bool(Spec):
    doc: str = ""

    def describe(self) -> str:
        return "true or false"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        if not isinstance(value, bool):
            v.problem(node, f"{where} must be {self.describe()}, got {shown(value)}")
            return None
        return value

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}

    def sample(self) -> str:
        return "true"


@dataclass
class Choice(Spec):
    choices: tuple[str, ...] = ()
    doc: str = ""

    def describe(self) -> str:
        return "one of " + ", ".join(self.choices)

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        if str(value) not in self.choices:
            near = nearest(str(value), self.choices)
            hint = f"did you mean {near!r}?" if near else ""
            v.problem(node, f"{where} {shown(value)} is not {self.describe()}", hint)
            return None
        return str(value)

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.choices)}

    def sample(self) -> str:
        return self.choices[0]


@dataclass
class Number(Spec):
    """An integer or decimal number, at least ``minimum``."""

    minimum: float = 0.0
    doc: str = ""

    def describe(self) -> str:
        return f"a number >= {self.minimum:g}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        number = None
        if not isinstance(value, bool) and isinstance(value, int | float):
            number = _finite(value)
        if number is None or number < self.minimum:
            v.problem(node, f"{where} must be {self.describe()}, got {shown(value)}")
            return None
        return number

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "minimum": self.minimum}

    def sample(self) -> str:
        return "0.5"


@dataclass
class Size(Spec):
    """A byte count: an integer, or a string like ``64MiB``, ``512KiB``, ``1.5GiB``.

    :param maximum: the largest size accepted (by default :data:`~.limits.MAX_SIZE`, exact as a
        float, so no later arithmetic overflows).
    :param limit: why, for the problem's hint when a size is above ``maximum``.
    """

    doc: str = ""
    maximum: int = MAX_SIZE
    limit: str = ""

    def describe(self) -> str:
        text = "a size such as 64MiB, 512KiB or a number of bytes"
        return text if self.maximum == MAX_SIZE else f"{text}, at most {human_size(self.maximum)}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        count: int | None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            count = value
        else:
            match = None if isinstance(value, bool) else _SIZE.match(str(value))
            if not match:
                v.problem(
                    node,
                    f"{where} {shown(value)} is not {self.describe()}",
                    "units: B, KiB, MiB, GiB (1024) or KB, MB, GB (1000)",
                )
                return None
            # As before (a float), but a number of 400 digits is infinite, not an OverflowError.
            number = _finite(float(match[1]) * _UNITS[match[2]])
            count = None if number is None else int(number)
        if count is None or count > self.maximum:
            size = f" is {human_size(count)}," if count is not None else " is"
            v.problem(
                node,
                f"{where} {shown(value)}{size} more than the {human_size(self.maximum)} allowed",
                self.limit,
            )
            return None
        return count

    def schema(self) -> dict[str, Any]:
        integer: dict[str, Any] = {"type": "integer", "minimum": 0}
        if self.maximum != MAX_SIZE:
            integer["maximum"] = self.maximum
        return {"oneOf": [integer, {"type": "string", "pattern": _SIZE_SCHEMA}]}

    def sample(self) -> str:
        return "64MiB"


@dataclass
class Duration(Spec):
    """Seconds: a number, or a string like ``90s``, ``5m``, ``1h30m``, ``250ms``."""

    negative: bool = False
    maximum: float | None = None
    doc: str = ""

    def describe(self) -> str:
        text = "a duration such as 90s, 5m, 1h30m or a number of seconds"
        if self.negative:
            text += " (may be negative)"
        if self.maximum is not None:
            text += f", at most {self.maximum:g}s"
        return text

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        seconds: float | None
        if isinstance(value, bool):
            seconds = None
        elif isinstance(value, int | float):
            seconds = float("inf") if _finite(value) is None else float(value)
        else:
            seconds = parse_duration(str(value))
        if seconds is None or (seconds < 0 and not self.negative) or math.isnan(seconds):
            v.problem(node, f"{where} {shown(value)} is not {self.describe()}")
            return None
        if self.maximum is not None and seconds > self.maximum:
            v.problem(node, f"{where} {shown(value)} is longer than {self.maximum:g}s")
            return None
        if abs(seconds) > MAX_DURATION_SECONDS:
            # Virtual time becomes dates (token lifetimes, SAS expiry): keep them in range.
            v.problem(
                node,
                f"{where} {shown(value)} is longer than {MAX_DURATION_SECONDS / 86400:.0f}d "
                "(100 years), the longest duration a scenario may give",
            )
            return None
        return seconds

    def schema(self) -> dict[str, Any]:
        number: dict[str, Any] = {"type": "number"}
        if not self.negative:
            number["minimum"] = 0
        if self.maximum is not None:
            number["maximum"] = self.maximum
        pattern = _DURATION_SCHEMA if self.negative else _DURATION_SCHEMA.replace("^-?", "^")
        return {"oneOf": [number, {"type": "string", "pattern": pattern}]}

    def sample(self) -> str:
        return "90s" if self.maximum is None or self.maximum >= 90 else "2s"


@dataclass(frozen=True)
class Bounds:
    """An inclusive range a measured value must fall in (``None``: unbounded on that side)."""

    at_least: float | None = None
    at_most: float | None = None

    def holds(self, value: float) -> bool:
        return (self.at_least is None or value >= self.at_least) and (
            self.at_most is None or value <= self.at_most
        )

    def describe(self, unit: str = "") -> str:
        def show(x: float) -> str:
            return f"{x:g}{unit}"

        if self.at_least is not None and self.at_least == self.at_most:
            return f"exactly {show(self.at_least)}"
        if self.at_least is not None and self.at_most is not None:
            return f"between {show(self.at_least)} and {show(self.at_most)}"
        if self.at_least is not None:
            return f"at least {show(self.at_least)}"
        if self.at_most is not None:
            return f"at most {show(self.at_most)}"
        return "anything"


@dataclass
class Count(Spec):
    """An exact value (``3``), or a range ``{at_least: 1, at_most: 3}`` (either bound optional).

    ``low``/``high`` name the bounds (``min``/``max`` for durations read better).
    """

    unit: Spec = field(default_factory=lambda: Int(minimum=0))
    low: str = "at_least"
    high: str = "at_most"
    doc: str = ""
    #: False: bounds only. A measured ratio is never exactly a given value, so ``0.3`` alone
    #: would be a mistake (meant ``{at_least: 0.3}``); it is reported at its line.
    exact: bool = True

    def describe(self) -> str:
        if not self.exact:
            return f"a mapping with {self.low} and/or {self.high}, each {self.unit.describe()}"
        return f"{self.unit.describe()}, or a mapping with {self.low} and/or {self.high}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if isinstance(node, yaml.MappingNode):
            bounds = Record(
                fields={self.low: Field(self.unit), self.high: Field(self.unit)},
                at_least_one=True,
            )._check(node, where, v)
            if not isinstance(bounds, dict):
                return None
            low, high = bounds.get(self.low), bounds.get(self.high)
            if low is not None and high is not None and low > high:
                v.problem(node, f"{where}: {self.low} {low:g} is more than {self.high} {high:g}")
                return None
            return Bounds(low, high)
        if not self.exact:
            # The scalar as written (a number here, unquoted), cut short like any echoed value.
            given = (
                clip(str(node.value), SHOWN_CHARS)
                if isinstance(node, yaml.ScalarNode)
                else "a list"
            )
            v.problem(
                node,
                f"{where} must be {self.describe()}, not {given}",
                f"a measured figure is never exact: write {{{self.low}: {given}}}"
                if isinstance(node, yaml.ScalarNode)
                else "",
            )
            return None
        value = self.unit._check(node, where, v)
        return None if value is None else Bounds(value, value)

    def schema(self) -> dict[str, Any]:
        unit = self.unit.schema()
        bounds = {
            "type": "object",
            "properties": {self.low: unit, self.high: unit},
            "additionalProperties": False,
            "minProperties": 1,
        }
        return {"oneOf": [unit, bounds]} if self.exact else bounds

    def sample(self) -> str:
        return f"{{{self.low}: {self.unit.sample()}}}"


@dataclass
class Anything(Spec):
    """Any YAML value; what it must be is decided where it is used (e.g. a ``set`` path)."""

    scalar: bool = False
    doc: str = ""

    def describe(self) -> str:
        return "a scalar value" if self.scalar else "any value"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if self.scalar:
            return self._scalar_of(node, where, v)
        try:
            return yaml.SafeLoader("").construct_document(node)
        except _CONSTRUCTION_ERRORS as exc:
            v.problem(node, f"{where} is not valid YAML: {_reason(exc)}")
            return None

    def schema(self) -> dict[str, Any]:
        return {"type": ["string", "number", "boolean"]} if self.scalar else {}

    def sample(self) -> str:
        return "certificate"


@dataclass
class ListOf(Spec):
    item: Spec = field(default_factory=Str)
    min_items: int = 0
    doc: str = ""

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not self._is_a(node, yaml.SequenceNode, where, v):
            return None
        if len(node.value) < self.min_items:
            v.problem(node, f"{where} needs at least {self.min_items} item(s)")
        return [self.item.check(child, f"{where}[{i}]", v) for i, child in enumerate(node.value)]

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "array", "items": self.item.schema()}
        if self.min_items:
            out["minItems"] = self.min_items
        return out

    def sample(self) -> str:
        return f"[{self.item.sample()}]"


@dataclass
class MapOf(Spec):
    """A mapping with free keys (e.g. package IDs) and values of one spec."""

    key: Str = field(default_factory=Str)
    value: Spec = field(default_factory=Str)
    doc: str = ""

    def describe(self) -> str:
        return f"a mapping of {self.key.describe()} to {self.value.describe()}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not self._is_a(node, yaml.MappingNode, where, v):
            return None
        out = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = self.key.check(key_node, f"{where}<key>", v)
            if key is None:
                continue
            if key in seen:
                v.problem(key_node, f"{where}.{key} is given twice")
                continue
            seen.add(key)
            out[key] = self.value.check(value_node, f"{where}.{key}", v)
        return out

    def schema(self) -> dict[str, Any]:
        return {
            "type": "object",
            "propertyNames": self.key.schema(),
            "additionalProperties": self.value.schema(),
        }

    def sample(self) -> str:
        return f"{{{self.key.sample()}: {self.value.sample()}}}"


@dataclass
class Marker(Spec):
    """A pytest marker: a name (``slow``), or one name with its arguments.

    ``{xfail: {reason: ..., strict: true}}`` gives keyword arguments, ``{name: [a, b]}``
    positional ones, ``{name: value}`` one positional argument. Known markers (``xfail``,
    ``skip``, ``skipif``) have their keywords checked; whether a name is registered is checked at
    collection, where pytest's configuration is known.
    """

    known: dict[str, Record] = field(default_factory=dict)
    doc: str = ""

    def describe(self) -> str:
        return "a marker name, or a mapping of one marker name to its arguments"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        name_spec = Str(pattern=_MARKER_NAME, example="slow")
        if isinstance(node, yaml.ScalarNode):
            name = name_spec._check(node, where, v)
            if name is None:
                return None
            if name in self.known and any(f.required for f in self.known[name].fields.values()):
                v.problem(node, f"{where}: marker {name} needs arguments", self.known[name].doc)
                return None
            return (name, (), {})
        if not isinstance(node, yaml.MappingNode) or len(node.value) != 1:
            v.problem(node, f"{where} must be {self.describe()}")
            return None
        key_node, value_node = node.value[0]
        name = name_spec._check(key_node, where, v)
        if name is None:
            return None
        if name in self.known:
            kwargs = self.known[name].check(value_node, f"{where}.{name}", v)
            if kwargs is None:
                return None
            return (name, (), {k: x for k, x in kwargs.items() if x is not None})
        if isinstance(value_node, yaml.MappingNode):
            kwargs = MapOf(key=Str(pattern=r"[A-Za-z_][A-Za-z0-9_]*"), value=Anything(scalar=True))
            given = kwargs.check(value_node, f"{where}.{name}", v)
            return None if given is None else (name, (), given)
        if isinstance(value_node, yaml.SequenceNode):
            args = ListOf(item=Anything(scalar=True)).check(value_node, f"{where}.{name}", v)
            return None if args is None else (name, tuple(args), {})
        arg = Anything(scalar=True).check(value_node, f"{where}.{name}", v)
        return None if arg is None else (name, (arg,), {})

    def schema(self) -> dict[str, Any]:
        scalar = {"type": ["string", "number", "boolean"]}
        free = {
            "anyOf": [
                scalar,
                {"type": "array", "items": scalar},
                {"type": "object", "additionalProperties": scalar},
            ]
        }
        return {
            "oneOf": [
                {"type": "string", "pattern": f"^{_MARKER_NAME}$"},
                {
                    "type": "object",
                    "minProperties": 1,
                    "maxProperties": 1,
                    "propertyNames": {"pattern": f"^{_MARKER_NAME}$"},
                    "properties": {name: r.schema() for name, r in self.known.items()},
                    "additionalProperties": free,
                },
            ]
        }

    def sample(self) -> str:
        return "slow"


@dataclass
class Field:
    spec: Spec
    required: bool = False
    default: Any = None
    doc: str = ""
    #: A YAML example of the value, for the reference (generated from the spec when empty).
    example: str = ""
    #: An absent all-optional section is filled from its keys' defaults; False keeps it None
    #: (e.g. a fault entry's kinds, where absence is how the kind is told).
    fill: bool = True


def _absent(item: Field) -> Any:  # noqa: ANN401 - any field's value
    """The value of an optional field the file leaves out.

    A section whose keys are all optional (``cmg:``, ``client:``) is filled from its keys'
    defaults, so code never has to ask whether the file mentioned it; a section with a required
    key (a step's ``condition``) is absent, ``None``, unless the file gives it.
    """
    spec = item.spec
    if (
        item.default is None
        and item.fill
        and isinstance(spec, Record)
        and not any(f.required for f in spec.fields.values())
    ):
        return spec.defaults()
    return item.default


def _key_text(node: yaml.Node) -> str:
    """A mapping key as the language reads it; ``?`` for a list or mapping used as a key."""
    if not isinstance(node, yaml.ScalarNode):
        return "?"
    try:
        return str(_scalar(node))
    except _CONSTRUCTION_ERRORS:
        # ``!!int abc: 1`` or ``2001-02-30: 1``: not a key of the language, reported as unknown.
        return str(node.value)


def _json_default(value: Any) -> bool:  # noqa: ANN401
    return value is not None and not isinstance(value, dict) and value != ""


@dataclass
class Record(Spec):
    """A mapping with a fixed set of keys; unknown keys are reported with the nearest valid one.

    :param required_unless: a key whose presence makes the required keys optional (a package
        given by ``ref`` takes them from its catalog entry).
    :param exactly_one: keys of which exactly one must be given (a fault's kind).
    :param at_least_one: at least one key must be given.
    """

    fields: dict[str, Field] = field(default_factory=dict)
    doc: str = ""
    required_unless: str | None = None
    exactly_one: tuple[str, ...] = ()
    at_least_one: bool = False

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.fields)

    def defaults(self) -> dict[str, Any]:
        """The value of this section when the file leaves it out: every field's default."""
        return {name: _absent(item) for name, item in self.fields.items() if not item.required}

    def relaxed(self, *, drop: tuple[str, ...] = (), keep: tuple[str, ...] = ()) -> Record:
        """This record with no required key, down through nested records (not list items).

        Shared files (worlds, catalog entries) give part of a scenario: what they leave out,
        the scenario or a later include must give.
        """
        fields = {}
        for name, item in self.fields.items():
            if name in drop:
                continue
            spec = item.spec.relaxed() if isinstance(item.spec, Record) else item.spec
            fields[name] = dataclasses.replace(item, spec=spec, required=name in keep)
        return dataclasses.replace(self, fields=fields, required_unless=None)

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not self._is_a(node, yaml.MappingNode, where, v):
            return None
        prefix = f"{where}." if where else ""
        out: dict[str, Any] = {}
        seen: set[str] = set()
        # Keys given a value: ``key:`` left empty means "not given", so it neither excuses a
        # required key nor counts as the one of ``exactly_one`` (an empty ``ref:`` or
        # ``service:`` once reached the loader as if given, and failed there with a traceback).
        valued: set[str] = set()
        for key_node, value_node in node.value:
            key = _key_text(key_node)
            if key in seen:
                v.problem(key_node, f"{prefix}{key} is given twice")
                continue
            seen.add(key)
            if key not in self.fields:
                near = nearest(key, self.fields)
                hint = f"did you mean {near!r}? " if near else ""
                v.problem(
                    key_node,
                    f"unknown key {shown(key)} in {_where(where)}",
                    f"{hint}allowed keys: {', '.join(self.fields)}",
                )
                continue
            item = self.fields[key]
            if is_null(value_node):
                # PyYAML marks an empty value at the next token, often lines later: report
                # at the key. Empty means "not given" only where absence is a value (default
                # None); an empty ``files:`` or ``seed:`` is a mistake, not a request for defaults.
                v.remember(prefix + key, key_node)
                if item.required or item.default is not None:
                    v.problem(key_node, f"{prefix}{key} must be {item.spec.describe()}, not empty")
                out[key] = None if item.required else _absent(item)
                continue
            valued.add(key)
            out[key] = item.spec.check(value_node, prefix + key, v)
        excused = self.required_unless is not None and self.required_unless in valued
        for name, item in self.fields.items():
            if name in seen:
                continue
            if item.required and not excused:
                v.problem(node, f"{_where(where)} is missing the required key {name!r}", item.doc)
            elif not item.required:
                out[name] = _absent(item)
        given = [k for k in self.exactly_one if k in valued]
        if self.exactly_one and len(given) != 1:
            v.problem(
                node,
                f"{_where(where)} needs exactly one of {', '.join(self.exactly_one)}",
                f"given: {', '.join(given) or 'none'}",
            )
        # An unknown key was reported already: one problem for one mistake.
        if self.at_least_one and not valued and seen <= set(self.fields):
            v.problem(node, f"{_where(where)} needs at least one of {', '.join(self.fields)}")
        return out

    def schema(self) -> dict[str, Any]:
        properties: dict[str, Any] = {}
        for name, item in self.fields.items():
            prop = item.spec.schema()
            if not item.required and item.default is None:
                prop = _or_null(prop)  # ``key:`` with no value means "not given"
            doc = item.doc or item.spec.doc
            if doc:
                prop = {"description": doc, **prop}
            if _json_default(item.default):
                prop["default"] = item.default
            properties[name] = prop
        out: dict[str, Any] = {"type": "object"}
        if self.doc:
            out["description"] = self.doc
        out["properties"] = properties
        out["additionalProperties"] = False
        required = [name for name, item in self.fields.items() if item.required]
        if required and self.required_unless:
            out["anyOf"] = [{"required": [self.required_unless]}, {"required": required}]
        elif required:
            out["required"] = required
        if self.exactly_one:
            out["oneOf"] = [{"required": [k]} for k in self.exactly_one]
        if self.at_least_one:
            out["minProperties"] = 1
        return out

    def sample(self) -> str:
        names = [n for n, f in self.fields.items() if f.required] or list(self.fields)[:1]
        return "{" + ", ".join(f"{n}: {self.fields[n].spec.sample()}" for n in names) + "}"
