"""A small declarative spec language for scenario files, validated on YAML nodes.

Validation walks PyYAML's composed node tree rather than loaded Python objects because only nodes
remember their line: every problem is reported with the file and line it was found on, and all
problems in a file are collected before anything is reported. The same definitions will generate
the published JSON Schema (issue 5), so the rules live in exactly one place.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from .._errors import ScenarioProblem

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "Bool",
    "Choice",
    "Field",
    "Int",
    "ListOf",
    "MapOf",
    "Number",
    "Record",
    "Size",
    "Spec",
    "Str",
    "Validation",
]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
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


@dataclass
class Validation:
    """Collects problems and remembers the line of every validated path (``a.b[0].c``)."""

    path: Path
    problems: list[ScenarioProblem] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)

    def problem(self, node: yaml.Node, rule: str, hint: str = "") -> None:
        self.problems.append(ScenarioProblem(self.path, _line(node), rule, hint))

    def line(self, where: str) -> int:
        """The line of ``where`` or of its nearest validated ancestor."""
        while where:
            if where in self.lines:
                return self.lines[where]
            parent = re.sub(r"(\.[^.\[]+|\[\d+\]|^[^.\[]+)$", "", where)
            # Every step must shorten the path, or a never-validated key would loop forever.
            where = parent if parent != where else ""
        return self.lines.get("", 1)


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


_NULL_TAG = "tag:yaml.org,2002:null"


def is_null(node: yaml.Node) -> bool:
    """``key:``, ``key: ~`` and ``key: null`` all mean "no value"."""
    return isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG


def _scalar(node: yaml.Node) -> Any:  # noqa: ANN401 - YAML scalars are of any type
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _where(where: str) -> str:
    return where or "the document"


class Spec:
    """Base of every rule; ``doc`` feeds the scenario reference."""

    doc: str = ""

    def check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        v.lines[where] = _line(node)
        return self._check(node, where, v)

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

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
        except (yaml.YAMLError, ValueError) as exc:
            # Explicit tags (!!int abc, !custom) and impossible dates fail in the constructor.
            reason = str(exc).splitlines()[0]
            v.problem(
                node, f"{_where(where)} {node.value!r} is not valid YAML for its tag: {reason}"
            )
            return None


@dataclass
class Str(Spec):
    pattern: str | None = None
    example: str = ""
    doc: str = ""

    def describe(self) -> str:
        return f"a string matching {self.pattern}" if self.pattern else "a string"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        # The text as written: YAML would turn 0x00000000 into 0, yes into True, 1.10 into 1.1.
        value = node.value if isinstance(node, yaml.ScalarNode) else str(value)
        if self.pattern and not re.fullmatch(self.pattern, value):
            hint = f"e.g. {self.example}" if self.example else ""
            v.problem(node, f"{where} {value!r} must match {self.pattern}", hint)
            return None
        return value


@dataclass
class Int(Spec):
    minimum: int | None = None
    choices: tuple[int, ...] = ()
    doc: str = ""

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(str, self.choices))
        return "an integer" + (f" >= {self.minimum}" if self.minimum is not None else "")

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            v.problem(node, f"{where} must be {self.describe()}, got {value!r}")
            return None
        if self.minimum is not None and value < self.minimum:
            v.problem(node, f"{where} must be {self.describe()}, got {value}")
            return None
        if self.choices and value not in self.choices:
            near = min(self.choices, key=lambda c: abs(c - value))
            v.problem(node, f"{where} {value} is not {self.describe()}", f"nearest: {near}")
            return None
        return value


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
            v.problem(node, f"{where} must be {self.describe()}, got {value!r}")
            return None
        return value


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
            near = difflib.get_close_matches(str(value), self.choices, n=1)
            hint = f"did you mean {near[0]!r}?" if near else ""
            v.problem(node, f"{where} {value!r} is not {self.describe()}", hint)
            return None
        return str(value)


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
        if isinstance(value, bool) or not isinstance(value, int | float) or value < self.minimum:
            v.problem(node, f"{where} must be {self.describe()}, got {value!r}")
            return None
        return float(value)


@dataclass
class Size(Spec):
    """A byte count: an integer, or a string like ``64MiB``, ``512KiB``, ``1.5GiB``."""

    doc: str = ""

    def describe(self) -> str:
        return "a size such as 64MiB, 512KiB or a number of bytes"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        value = self._scalar_of(node, where, v)
        if value is None:
            return None
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        match = _SIZE.match(str(value))
        if not match:
            v.problem(node, f"{where} {value!r} is not {self.describe()}")
            return None
        return int(float(match[1]) * _UNITS[match[2]])


@dataclass
class ListOf(Spec):
    item: Spec = field(default_factory=Str)
    min_items: int = 0
    doc: str = ""

    def describe(self) -> str:
        return f"a list of {self.item.describe()}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not isinstance(node, yaml.SequenceNode):
            v.problem(node, f"{_where(where)} must be {self.describe()}")
            return None
        if len(node.value) < self.min_items:
            v.problem(node, f"{where} needs at least {self.min_items} item(s)")
        return [self.item.check(child, f"{where}[{i}]", v) for i, child in enumerate(node.value)]


@dataclass
class MapOf(Spec):
    """A mapping with free keys (e.g. package IDs) and values of one spec."""

    key: Str = field(default_factory=Str)
    value: Spec = field(default_factory=Str)
    doc: str = ""

    def describe(self) -> str:
        return f"a mapping of {self.key.describe()} to {self.value.describe()}"

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not isinstance(node, yaml.MappingNode):
            v.problem(node, f"{_where(where)} must be {self.describe()}")
            return None
        out = {}
        for key_node, value_node in node.value:
            key = self.key.check(key_node, f"{where}<key>", v)
            if key is not None:
                out[key] = self.value.check(value_node, f"{where}.{key}", v)
        return out


@dataclass
class Field:
    spec: Spec
    required: bool = False
    default: Any = None
    doc: str = ""


def _absent(item: Field) -> Any:  # noqa: ANN401 - any field's value
    """The value of an optional field the file leaves out.

    A section whose keys are all optional (``cmg:``, ``client:``) is filled from its keys'
    defaults, so code never has to ask whether the file mentioned it; a section with a required
    key (a step's ``condition``) is absent, ``None``, unless the file gives it.
    """
    spec = item.spec
    if (
        item.default is None
        and isinstance(spec, Record)
        and not any(f.required for f in spec.fields.values())
    ):
        return spec.defaults()
    return item.default


@dataclass
class Record(Spec):
    """A mapping with a fixed set of keys; unknown keys are reported with the nearest valid one."""

    fields: dict[str, Field] = field(default_factory=dict)
    doc: str = ""

    def describe(self) -> str:
        return "a mapping with keys " + ", ".join(self.fields)

    def defaults(self) -> dict[str, Any]:
        """The value of this section when the file leaves it out: every field's default."""
        return {name: _absent(item) for name, item in self.fields.items() if not item.required}

    def _check(self, node: yaml.Node, where: str, v: Validation) -> Any:  # noqa: ANN401
        if not isinstance(node, yaml.MappingNode):
            v.problem(node, f"{_where(where)} must be {self.describe()}")
            return None
        prefix = f"{where}." if where else ""
        out: dict[str, Any] = {}
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(_scalar(key_node)) if isinstance(key_node, yaml.ScalarNode) else "?"
            if key in seen:
                v.problem(key_node, f"{prefix}{key} is given twice")
                continue
            seen.add(key)
            if key not in self.fields:
                near = difflib.get_close_matches(key, list(self.fields), n=1, cutoff=0.6)
                hint = f"did you mean {near[0]!r}? " if near else ""
                v.problem(
                    key_node,
                    f"unknown key {key!r} in {_where(where)}",
                    f"{hint}allowed keys: {', '.join(self.fields)}",
                )
                continue
            item = self.fields[key]
            if is_null(value_node):
                # PyYAML marks an empty value at the next token, often lines later: report
                # at the key. Empty means "not given" only where absence is a value (default
                # None); an empty ``files:`` or ``seed:`` is a mistake, not a request for defaults.
                v.lines[prefix + key] = _line(key_node)
                if item.required or item.default is not None:
                    v.problem(key_node, f"{prefix}{key} must be {item.spec.describe()}, not empty")
                out[key] = None if item.required else item.default
                continue
            out[key] = item.spec.check(value_node, prefix + key, v)
        for name, item in self.fields.items():
            if name in seen:
                continue
            if item.required:
                v.problem(node, f"{_where(where)} is missing the required key {name!r}", item.doc)
            else:
                out[name] = _absent(item)
        return out
