"""Putting a scenario together before it is validated: includes, catalog refs, and cases.

Everything here works on PyYAML nodes, never on loaded values, so every value keeps the file and
line it was written at: a problem in an included world is reported at the world's line (and the
line that included it), a matrix value at the matrix's line.

Rules (documented in docs/scenarios.md):

* ``include: [a, b]``: ``a`` then ``b`` are merged under the including file; later files override
  earlier ones and the including file overrides them all. Mappings merge key by key, lists are
  replaced, except ``packages``, merged by ``id`` (a package given again overrides the keys it
  gives). A key given empty (``key:``) keeps the included value.
* ``./`` and ``../`` paths are relative to the file that names them. Other paths are looked up
  in order: the user's fixtures folders (each ``--cmg-fixtures``, else each line of ini
  ``cmg_fixtures``, in the order given; else the nearest ``fixtures`` folder above the scenario),
  then the worlds and catalogs shipped inside this package (:data:`SHIPPED`). The first folder
  that has the file wins, so a user's file shadows a shipped one of the same name, also where a
  shipped world refs it (a later release that ships a new name never changes what an existing
  include means). ``.yaml`` may be left off.
* ``packages: [{ref: catalog/x, version: 2}]`` takes the package from a catalog file; the keys
  given next to ``ref`` override the catalog's.
* ``matrix`` and ``cases`` make one scenario per combination, each validated with its values set.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

from .._errors import PytestCmgError
from .limits import (
    MAX_NESTING,
    MAX_SCENARIO_FILE_BYTES,
    MAX_VALUES,
    clip,
    human_size,
    nearest,
    shown,
)
from .spec import ListOf, MapOf, Record, Validation, is_null

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .spec import Spec

__all__ = [
    "SHIPPED",
    "Assembler",
    "CasePlan",
    "compose_file",
    "find_fixtures",
    "merge_nodes",
    "plan_cases",
    "read_text",
]

_MAP = "tag:yaml.org,2002:map"
_STR = "tag:yaml.org,2002:str"
#: Nesting of includes, far beyond any sensible world; a guard against runaway chains.
MAX_INCLUDE_DEPTH = 16
#: Keys a case or a matrix may not change: they are the file's identity and plan.
_FIXED = ("scenario", "description", "include", "matrix", "cases", "markers")
_PATH_TOKEN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)|\[([A-Za-z0-9]+)\]")
#: Characters no include or ref path may hold: a NUL is refused by every filesystem call
#: (ValueError), and the others only ever arrive by mistake.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def show(path: Path) -> str:
    """A path as a reader wants it: relative to the working folder when it is inside it."""
    try:
        return os.path.relpath(path)
    except ValueError:
        return str(path)


#: The worlds and catalogs that ship inside the package (package data, see pyproject.toml), so
#: ``include: [worlds/ipu-world]`` resolves after a plain ``pip install pytest-cmg``.
SHIPPED = Path(__file__).resolve().parent.parent / "shipped"


def find_fixtures(scenario: Path) -> Path | None:
    """The nearest ``fixtures`` folder at or above the scenario's folder."""
    for folder in scenario.resolve().parents:
        candidate = folder / "fixtures"
        if candidate.is_dir():
            return candidate
    return None


def _nearest_in(folder: Path, name: str) -> str:
    """``did you mean 'x'? `` for the YAML file in ``folder`` closest to ``name``, or ''."""
    if not folder.is_dir():
        return ""
    close = difflib.get_close_matches(name, [p.name for p in folder.glob("*.y*ml")], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


class _Mark(Protocol):
    """What is read of a YAML mark (PyYAML's pure and libyaml marks are different classes)."""

    line: int


class _TooMuch(PytestCmgError):
    """A document broke one of the size limits while it was composed."""

    def __init__(self, mark: _Mark | None, rule: str, hint: str) -> None:
        super().__init__(rule)
        self.line = mark.line + 1 if mark is not None else 1
        self.rule, self.hint = rule, hint


class _BoundedLoader(yaml.SafeLoader):
    """A SafeLoader that stops at ``budget`` values or :data:`MAX_NESTING` levels.

    An alias counts as many values as the node it names (its expanded size), so a few lines of
    anchors cannot make the validation walk millions of values (the "billion laughs").
    """

    def __init__(self, text: str, budget: int) -> None:
        super().__init__(text)
        self.budget = budget
        self.values = 0
        self._depth = 0
        #: Expanded size of each anchored node, by id, for the aliases that name it.
        self._sizes: dict[int, int] = {}

    def _charge(self, count: int, mark: _Mark | None) -> None:
        self.values += count
        if self.values > self.budget:
            raise _TooMuch(
                mark,
                f"the scenario holds more than {MAX_VALUES:,} YAML values here (with the files it "
                "includes, aliases counted at each use)",
                "a scenario needs a few hundred: describe content by size, never list it",
            )

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            named = self.anchors.get(event.anchor) if event.anchor is not None else None
            if named is not None:
                self._charge(self._sizes.get(id(named), 1), event.start_mark)
            return super().compose_node(parent, index)
        self._depth += 1
        try:
            if self._depth > MAX_NESTING:
                raise _TooMuch(
                    event.start_mark,
                    f"lists and mappings nest deeper than {MAX_NESTING} levels",
                    "a scenario needs about 6",
                )
            before = self.values
            self._charge(1, event.start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if node is not None and getattr(event, "anchor", None) is not None:
            self._sizes[id(node)] = self.values - before
        return node


def read_text(path: Path, v: Validation) -> str | None:
    """The text of a scenario file, or None when it breaks the input rules (reported to ``v``).

    The size is judged from the file system before anything is read (and the read is bounded
    too, for files that grow or report no size), so a huge file costs neither time nor memory.
    A byte that is not UTF-8 is reported at its line and column. OSError is the caller's.
    """
    limit = MAX_SCENARIO_FILE_BYTES
    size = path.stat().st_size
    data = b""
    if size <= limit:
        with path.open("rb") as handle:
            data = handle.read(limit + 1)
    if size > limit or len(data) > limit:
        v.problems.append(
            v.make(
                path,
                1,
                f"the file is {human_size(max(size, len(data)))} ({max(size, len(data)):,} "
                f"bytes); a scenario file may have at most {human_size(limit)}",
                "a scenario describes content by its size, packages[].size, and never holds "
                "it: is this the right file?",
            )
        )
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        start = data.rfind(b"\n", 0, exc.start) + 1
        # Everything before the first bad byte decodes, so the column counts characters.
        column = len(data[start : exc.start].decode("utf-8")) + 1
        v.problems.append(
            v.make(
                path,
                line,
                f"byte 0x{data[exc.start]:02x} at column {column} is not UTF-8 ({exc.reason}): "
                "scenario files are UTF-8",
                "save the file as UTF-8, e.g. with iconv -f latin1 -t utf-8; its strings and "
                "comments may then hold any character",
            )
        )
        return None


def compose_file(path: Path, v: Validation, *, empty_is_problem: bool = True) -> yaml.Node | None:
    """Compose one YAML document whose marks carry ``path``; problems go to ``v``.

    The file's size, encoding, values and nesting are checked against the input limits
    (:mod:`.limits`); ``v.composed`` counts the values of every file composed for one scenario,
    so includes share one budget. OSError (a missing or unreadable file) is the caller's.
    """
    text = read_text(path, v)
    if text is None:
        return None
    try:
        loader = _BoundedLoader(text, MAX_VALUES - v.composed)
    except yaml.reader.ReaderError as exc:
        # Raised for the whole text at once: a control character (NUL, ESC...) anywhere.
        position = exc.position
        line = text.count("\n", 0, position) + 1
        column = position - (text.rfind("\n", 0, position) + 1) + 1
        character = exc.character if isinstance(exc.character, str) else chr(exc.character)
        v.problems.append(
            v.make(
                path,
                line,
                f"character U+{ord(character):04X} at column {column} is not allowed in YAML "
                "(control characters other than tab and line breaks)",
                'remove it, or write it as an escape in a double-quoted string, e.g. "\\x1b"',
            )
        )
        return None
    # Marks copy the reader's name when they are made, so every node of this file knows it.
    loader.name = str(path)
    try:
        node = loader.get_single_node()
    except _TooMuch as exc:
        v.problems.append(v.make(path, exc.line, exc.rule, exc.hint))
        return None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = clip(str(exc.problem or exc.context or "cannot be parsed"))
        v.problems.append(v.make(path, mark.line + 1 if mark else 1, f"not valid YAML: {problem}"))
        return None
    finally:
        v.composed += loader.values
        loader.dispose()
    if node is None and empty_is_problem:
        v.problems.append(v.make(path, 1, "the file is empty"))
    return node


def _key(node: yaml.Node) -> str:
    return str(node.value) if isinstance(node, yaml.ScalarNode) else "?"


def get(node: yaml.Node | None, key: str) -> yaml.Node | None:
    """The value node of ``key`` in a mapping node (the first, if given twice)."""
    if not isinstance(node, yaml.MappingNode):
        return None
    return next((v for k, v in node.value if _key(k) == key), None)


def _mapping(like: yaml.Node, pairs: list[tuple[yaml.Node, yaml.Node]]) -> yaml.MappingNode:
    tag = like.tag if isinstance(like, yaml.MappingNode) else _MAP
    flow = like.flow_style if isinstance(like, yaml.MappingNode) else None
    return yaml.MappingNode(tag, pairs, like.start_mark, like.end_mark, flow_style=flow)


def _sequence(like: yaml.SequenceNode, items: list[yaml.Node]) -> yaml.SequenceNode:
    return yaml.SequenceNode(
        like.tag, items, like.start_mark, like.end_mark, flow_style=like.flow_style
    )


def _with(node: yaml.MappingNode, key: str, value: yaml.Node) -> yaml.MappingNode:
    pairs = list(node.value)
    for i, (k, _) in enumerate(pairs):
        if _key(k) == key:
            pairs[i] = (k, value)
            return _mapping(node, pairs)
    key_node = yaml.ScalarNode(_STR, key, value.start_mark, value.end_mark)
    return _mapping(node, [*pairs, (key_node, value)])


def _package_id(node: yaml.Node) -> str | None:
    value = get(node, "id")
    return str(value.value) if isinstance(value, yaml.ScalarNode) and not is_null(value) else None


def _is_file(path: Path) -> bool:
    """``path.is_file()``, False where the OS refuses the name itself (too long a name or path:
    ``Path.is_file`` lets ENAMETOOLONG through), so the caller reports "no such file"."""
    try:
        return path.is_file()
    except OSError:
        return False


def merge_nodes(base: yaml.Node, over: yaml.Node, where: str = "") -> yaml.Node:
    """``over`` merged onto ``base``: mappings key by key, packages by id, anything else replaced."""
    if not (isinstance(base, yaml.MappingNode) and isinstance(over, yaml.MappingNode)):
        return over
    over_keys = {_key(k) for k, _ in over.value}
    pairs = [
        (k, v)
        for k, v in base.value
        # A world's own include list was resolved already: it is not the including file's.
        if _key(k) not in over_keys and not (where == "" and _key(k) == "include")
    ]
    merged_keys: set[str] = set()
    for k, given in over.value:
        name = _key(k)
        below = get(base, name) if name not in merged_keys else None
        merged_keys.add(name)
        value = given
        if below is not None and is_null(given):
            value = below  # ``key:`` given empty keeps what was included
        elif below is not None:
            child = f"{where}.{name}" if where else name
            if (
                child == "packages"
                and isinstance(below, yaml.SequenceNode)
                and isinstance(given, yaml.SequenceNode)
            ):
                value = _merge_by_id(below, given)
            else:
                value = merge_nodes(below, given, child)
        pairs.append((k, value))
    return _mapping(over, pairs)


def _merge_by_id(base: yaml.SequenceNode, over: yaml.SequenceNode) -> yaml.SequenceNode:
    items = list(base.value)
    index = {pid: i for i, n in enumerate(items) if (pid := _package_id(n)) is not None}
    merged: set[str] = set()
    for item in over.value:
        pid = _package_id(item)
        if pid is not None and pid in index and pid not in merged:
            items[index[pid]] = merge_nodes(items[index[pid]], item, "packages[]")
            merged.add(pid)
        else:
            # A package declared twice in one file stays twice, so the duplicate is reported.
            items.append(item)
    return _sequence(over, items)


@dataclass
class Assembler:
    """Resolves a scenario's includes and package refs into one node tree.

    ``fixtures`` is the user's folder, or folders searched in order (``--cmg-fixtures`` given
    several times); None looks for the nearest ``fixtures`` folder above the scenario (``find``).
    """

    v: Validation
    fragment: Record
    catalog: Record
    fixtures: Path | Sequence[Path] | None = None
    find: Callable[[Path], Path | None] = find_fixtures
    _root_looked: bool = False
    _catalogs: dict[Path, yaml.Node | None] = field(default_factory=dict)

    def assemble(self, root: yaml.Node) -> yaml.Node:
        return self._includes(root, [self.v.path.resolve()])

    def _fixtures(self) -> list[Path]:
        if self.fixtures is None and not self._root_looked:
            self._root_looked = True
            self.fixtures = self.find(self.v.path)
        if self.fixtures is None:
            return []
        return [self.fixtures] if isinstance(self.fixtures, Path) else list(self.fixtures)

    def _origin(self, target: Path, entry: yaml.Node, verb: str) -> None:
        source = self.v.file_of(entry)
        text = f"{verb} {show(source)}:{entry.start_mark.line + 1}"
        if source in self.v.included_from:
            text += f", {self.v.included_from[source]}"
        self.v.included_from.setdefault(target, text)

    def _folders(self) -> list[tuple[str, Path]]:
        """Where a name that is not ``./``-relative is looked up, in order, each described."""
        folders: list[tuple[str, Path]] = []
        given = self.fixtures is not None
        for root in self._fixtures():
            how = (
                "--cmg-fixtures or ini cmg_fixtures" if given else "the nearest above the scenario"
            )
            missing = "" if root.is_dir() else ", no such folder"
            folders.append((f"the fixtures folder {show(root)} ({how}{missing})", root))
        # The installed package is rarely below the working folder: show it whole, not ../../..
        shipped = show(SHIPPED)
        shipped = str(SHIPPED) if shipped.startswith("..") else shipped
        folders.append((f"the shipped folder {shipped}", SHIPPED))
        return folders

    def _locate(self, entry: yaml.ScalarNode, kind: str) -> Path | None:
        text = str(entry.value).strip()
        origin = self.v.file_of(entry)
        name = text if text.endswith((".yaml", ".yml")) else f"{text}.yaml"
        bad = _CONTROL.search(text)
        if bad is not None:
            self.v.problem(
                entry,
                f"{kind} {shown(text)} holds the control character U+{ord(bad.group()):04X} at "
                f"character {bad.start()}",
                "name a file by its path: a world such as worlds/ipu-world, a catalog entry "
                "such as catalog/os-upgrade-win11, or ./ and ../ for a file next to this one",
            )
            return None
        if text.startswith(("./", "../")) or Path(text).is_absolute():
            target = (origin.parent / name).resolve()
            if _is_file(target):
                return target
            near = _nearest_in(target.parent, target.name)
            self.v.problem(
                entry,
                f"{kind} {shown(text)}: no such file {show(target)}",
                f"{near}./ and ../ paths are relative to the file that names them "
                f"({show(origin)}); leave them off to look in the fixtures folder and the "
                "shipped worlds",
            )
            return None
        folders = self._folders()
        for _, folder in folders:
            target = (folder / name).resolve()
            if _is_file(target):
                return target
        known = sorted(
            {
                p.relative_to(folder).with_suffix("").as_posix()
                for _, folder in folders
                for p in folder.glob("*/*.y*ml")
            }
        )
        close = difflib.get_close_matches(text.removesuffix(".yaml"), known, n=1)
        near = f"did you mean {close[0]!r}? " if close else ""
        # Catalog files hold one package, worlds anything else: offer the kind that fits.
        shipped = sorted(
            named
            for p in SHIPPED.glob("*/*.y*ml")
            if (named := p.relative_to(SHIPPED).with_suffix("").as_posix()).startswith("catalog/")
            == (kind == "ref")
        )
        searched = "; ".join(description for description, _ in folders)
        user = (
            ""
            if len(folders) > 1
            else (f" (no fixtures folder is set, and none is above {show(self.v.path)})")
        )
        self.v.problem(
            entry,
            f"{kind} {shown(text)}: no file {name} in {searched}{user}",
            f"{near}put the file in a fixtures folder of yours (--cmg-fixtures DIR, given once "
            "per folder, or ini cmg_fixtures, one folder a line), start the path with ./ or ../ "
            "for a file next to this one, or use a "
            f"shipped one: {', '.join(shipped) or 'none (is the package installed whole?)'}",
        )
        return None

    def _load(
        self, target: Path, entry: yaml.ScalarNode, verb: str, spec: Record
    ) -> yaml.Node | None:
        self._origin(target, entry, verb)
        try:
            node = compose_file(target, self.v)
        except OSError as exc:
            self.v.problem(entry, f"cannot read {show(target)}: {exc.strerror or exc}")
            return None
        if node is None:
            return None
        spec.check(
            node, "", Validation(target, self.v.problems, included_from=self.v.included_from)
        )
        return node

    def _includes(self, node: yaml.Node, stack: list[Path]) -> yaml.Node:
        node = self.refs(node)
        include = get(node, "include")
        base: yaml.Node | None = None
        for entry in include.value if isinstance(include, yaml.SequenceNode) else []:
            if not isinstance(entry, yaml.ScalarNode) or is_null(entry):
                continue  # the spec reports it
            target = self._locate(entry, "include")
            if target is None:
                continue
            if target in stack:
                chain = " -> ".join(show(p) for p in [*stack[stack.index(target) :], target])
                self.v.problem(entry, f"include cycle: {chain}")
                continue
            if len(stack) > MAX_INCLUDE_DEPTH:
                self.v.problem(entry, f"includes nest deeper than {MAX_INCLUDE_DEPTH} files")
                continue
            world = self._load(target, entry, "included from", self.fragment)
            if world is None:
                continue
            world = self._includes(world, [*stack, target])
            base = world if base is None else merge_nodes(base, world)
        return node if base is None else merge_nodes(base, node)

    def refs(self, node: yaml.Node) -> yaml.Node:
        """``node`` with each of its ``packages`` that has a ``ref`` taken from the catalog.

        Also for a case's tree: a case that sets ``packages`` may ref catalog entries too, and
        its list arrives after the file was assembled.
        """
        packages = get(node, "packages")
        if not isinstance(node, yaml.MappingNode) or not isinstance(packages, yaml.SequenceNode):
            return node
        items, changed = [], False
        for item in packages.value:
            ref = get(item, "ref")
            resolved = item
            if isinstance(item, yaml.MappingNode) and isinstance(ref, yaml.ScalarNode):
                entry = None if is_null(ref) else self._catalog_entry(ref)
                if entry is not None:
                    own = [(k, v) for k, v in item.value if _key(k) != "ref"]
                    resolved = merge_nodes(entry, _mapping(item, own), "packages[]")
                    changed = True
            items.append(resolved)
        return _with(node, "packages", _sequence(packages, items)) if changed else node

    def _catalog_entry(self, ref: yaml.ScalarNode) -> yaml.Node | None:
        target = self._locate(ref, "ref")
        if target is None:
            return None
        if target not in self._catalogs:
            self._catalogs[target] = self._load(target, ref, "referenced from", self.catalog)
        return self._catalogs[target]


@dataclass
class _Setting:
    path: str
    segments: list[tuple[str, str]]
    value: yaml.Node
    key: yaml.Node
    where: str


@dataclass
class CasePlan:
    """One item of a parametrised file: its ID and the values it sets."""

    id: str
    where: str
    settings: list[_Setting]
    expect: yaml.Node | None = None
    case_index: int | None = None

    @property
    def values(self) -> tuple[tuple[str, str, str], ...]:
        return tuple((s.path, _text(s.value), s.where) for s in self.settings)

    def apply(self, tree: yaml.Node, v: Validation) -> yaml.Node | None:
        for setting in self.settings:
            changed = _set(tree, setting.segments, setting.value, setting, v)
            if changed is None:
                return None
            tree = changed
        if self.expect is not None and isinstance(tree, yaml.MappingNode):
            below = get(tree, "expect")
            merged = merge_nodes(below, self.expect, "expect") if below is not None else self.expect
            tree = _with(tree, "expect", merged)
        return tree

    def markers(self, data: dict[str, Any]) -> list[tuple[str, Any]]:
        if self.case_index is None:
            return []
        case = (data.get("cases") or [])[self.case_index] or {}
        base = f"cases[{self.case_index}].markers"
        return [(f"{base}[{i}]", m) for i, m in enumerate(case.get("markers") or [])]


def _text(node: yaml.Node) -> str:
    if isinstance(node, yaml.ScalarNode):
        return str(node.value)
    return str(yaml.serialize(node)).strip().replace("\n", " ")


def _id_part(node: yaml.Node, fallback: str) -> str:
    if isinstance(node, yaml.ScalarNode) and str(node.value):
        return re.sub(r"[^A-Za-z0-9_.+]", "_", str(node.value))
    return fallback


def resolve_path(
    text: str, key: yaml.Node, spec: Spec, v: Validation, what: str
) -> list[tuple[str, str]] | None:
    """The steps of a ``set`` path through the language, or None (reported) if it leads nowhere."""
    segments: list[tuple[str, str]] = []
    walked = ""
    for match in _PATH_TOKEN.finditer(text):
        name, bracket = match.group(1), match.group(2)
        if name is not None:
            if isinstance(spec, Record):
                if name not in spec.fields or (not walked and name in _FIXED):
                    allowed = [f for f in spec.fields if walked or f not in _FIXED]
                    near = nearest(name, allowed)
                    hint = f"did you mean {near!r}? " if near else ""
                    rule = (
                        f"{what} {shown(text)}: {name!r} cannot be set per case"
                        if name in _FIXED and not walked
                        else f"{what} {shown(text)}: unknown key {shown(name)} in "
                        f"{walked or 'the document'}"
                    )
                    v.problem(key, rule, f"{hint}allowed keys: {', '.join(allowed)}")
                    return None
                spec = spec.fields[name].spec
            elif isinstance(spec, MapOf):
                spec = spec.value
            else:
                v.problem(key, f"{what} {shown(text)}: {walked} is not a mapping")
                return None
            segments.append(("key", name))
            walked = f"{walked}.{name}" if walked else name
        else:
            if not isinstance(spec, ListOf):
                v.problem(key, f"{what} {shown(text)}: {walked or 'the document'} is not a list")
                return None
            segments.append(("index" if bracket.isdigit() else "id", bracket))
            spec = spec.item
            walked = f"{walked}[{bracket}]"
    return segments


def _set(
    node: yaml.Node | None,
    segments: list[tuple[str, str]],
    value: yaml.Node,
    setting: _Setting,
    v: Validation,
) -> yaml.Node | None:
    if not segments:
        return value
    (kind, token), rest = segments[0], segments[1:]
    if kind == "key":
        if node is None or is_null(node):
            node = yaml.MappingNode(_MAP, [], value.start_mark, value.end_mark)
        if not isinstance(node, yaml.MappingNode):
            v.problem(
                setting.key,
                f"cannot set {shown(setting.path)}: {shown(token)} is under a non-mapping",
            )
            return None
        child = _set(get(node, token), rest, value, setting, v)
        return None if child is None else _with(node, token, child)
    if not isinstance(node, yaml.SequenceNode):
        v.problem(setting.key, f"cannot set {shown(setting.path)}: there is no list at [{token}]")
        return None
    items = list(node.value)
    if kind == "index":
        index = int(token)
        if index >= len(items):
            v.problem(
                setting.key, f"cannot set {shown(setting.path)}: the list has {len(items)} item(s)"
            )
            return None
    else:
        ids = [_package_id(n) for n in items]
        if token not in ids:
            known = ", ".join(i for i in ids if i) or "none"
            v.problem(
                setting.key,
                f"cannot set {shown(setting.path)}: no item with id {token}",
                f"ids: {known}",
            )
            return None
        index = ids.index(token)
    child = _set(items[index], rest, value, setting, v)
    if child is None:
        return None
    items[index] = child
    return _sequence(node, items)


def plan_cases(tree: yaml.Node, spec: Record, v: Validation, *, max_cases: int) -> list[CasePlan]:
    """The items a file's ``matrix`` and ``cases`` make, in the order they are written."""
    matrix, cases = get(tree, "matrix"), get(tree, "cases")
    axes: list[list[_Setting]] = []
    if isinstance(matrix, yaml.MappingNode):
        for key, values in matrix.value:
            if not isinstance(key, yaml.ScalarNode) or not isinstance(values, yaml.SequenceNode):
                continue
            segments = resolve_path(str(key.value), key, spec, v, "matrix key")
            if segments is None or not values.value:
                continue
            axes.append(
                [
                    _Setting(str(key.value), segments, value, key, f"matrix.{key.value}[{i}]")
                    for i, value in enumerate(values.value)
                ]
            )
    entries: list[tuple[str, int, list[_Setting], yaml.Node | None, yaml.Node] | None] = []
    if isinstance(cases, yaml.SequenceNode):
        seen: set[str] = set()
        for index, case in enumerate(cases.value):
            id_node = get(case, "id")
            if not isinstance(id_node, yaml.ScalarNode) or is_null(id_node):
                continue
            case_id = str(id_node.value)
            if case_id in seen:
                v.problem(id_node, f"case id {shown(case_id)} is given twice")
                continue
            seen.add(case_id)
            settings = []
            given = get(case, "set")
            for key, value in given.value if isinstance(given, yaml.MappingNode) else []:
                if not isinstance(key, yaml.ScalarNode):
                    continue
                segments = resolve_path(str(key.value), key, spec, v, "case set path")
                if segments is not None:
                    where = f"cases[{index}].set.{key.value}"
                    settings.append(_Setting(str(key.value), segments, value, key, where))
            expect = get(case, "expect")
            expect = expect if isinstance(expect, yaml.MappingNode) else None
            entries.append((case_id, index, settings, expect, id_node))
    if not axes and not entries:
        return []
    combos = list(itertools.product(*axes)) if axes else [()]
    total = max(len(entries), 1) * len(combos)
    if total > max_cases:
        anchor = matrix if matrix is not None else cases
        assert anchor is not None
        v.problem(anchor, f"this file makes {total} items; at most {max_cases} are allowed")
        return []
    plans: list[CasePlan] = []
    for entry in [*entries] or [None]:
        for combo in combos:
            parts = [entry[0]] if entry else []
            parts += [_id_part(s.value, f"{s.path}{i}") for i, s in enumerate(combo)]
            settings = [*combo, *(entry[2] if entry else [])]
            plans.append(
                CasePlan(
                    id="-".join(parts),
                    where=f"cases[{entry[1]}]" if entry else "matrix",
                    settings=settings,
                    expect=entry[3] if entry else None,
                    case_index=entry[1] if entry else None,
                )
            )
    ids = [p.id for p in plans]
    for duplicate in sorted({i for i in ids if ids.count(i) > 1}):
        anchor = matrix if matrix is not None else cases
        assert anchor is not None
        v.problem(
            anchor, f"two items would have the same ID {shown(duplicate)}", "make the values differ"
        )
    return plans
