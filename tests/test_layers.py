"""The rooms of the package import only downwards, as docs/architecture.md's module map says.

Every module under pytest_cmg/ is parsed with ast; every import of this package in it (at the
top, inside a function, or under TYPE_CHECKING) is checked against the "may import" column of
the map, and no module of a sub-package may import a private module of another sub-package.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import pytest_cmg

PACKAGE = Path(pytest_cmg.__file__).parent
MAP = PACKAGE.parent / "docs" / "architecture.md"
_ROW = re.compile(r"^\| `(?P<room>[\w.]+)` \|(?P<cells>.*)\|\s*$")
#: Known violations being removed, as (file, imported module) -> why it is still there. The test
#: fails as soon as one of them is gone, so its entry is deleted with the fix, never forgotten.
PENDING: dict[tuple[str, str], str] = {}


def allowed_imports(text: str) -> dict[str, set[str]]:
    """room -> the rooms it may import, from the map's table (its last column)."""
    allowed: dict[str, set[str]] = {}
    for line in text.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        last = match["cells"].split("|")[-1]
        allowed[match["room"]] = set(re.findall(r"`([\w.]+)`", last))
    return allowed


def room_of(module: str) -> str:
    """``pytest_cmg._net.proxy`` -> ``_net``; ``pytest_cmg.plugin`` -> ``plugin``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, package_root: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, dotted name) of every import of this package in ``path``, relative ones resolved.

    ``from pkg import name`` yields both ``pkg`` and ``pkg.name``, since ``name`` may be a module.
    """
    name = module_name(path, package_root)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return [(line, t) for line, t in found if t.split(".")[0] == "pytest_cmg"]


def is_room(name: str, package: Path) -> bool:
    return (package / name).is_dir() or (package / f"{name}.py").is_file()


def violations(package: Path, allowed: dict[str, set[str]]) -> list[str]:
    """Every import against the map, as ``file:line: what and which rule``."""
    problems: list[str] = []
    for path in sorted(package.rglob("*.py")):
        where = path.relative_to(package.parent)
        room = room_of(module_name(path, package))
        if room not in allowed:
            problems.append(f"{where}: room {room} has no row in docs/architecture.md; add one")
            continue
        for line, imported in imports_of(path, package):
            parts = imported.split(".")
            if len(parts) < 2 or not is_room(parts[1], package):
                continue  # ``import pytest_cmg`` or a name (not a module) of the package
            other = parts[1]
            # ``from pkg.mod import name`` is reported once, as the module it reaches.
            target = ".".join(parts[:3])
            if other != room and other not in allowed[room]:
                problems.append(
                    f"{where}:{line}: imports {target}, but room {room} may import only "
                    f"{', '.join(sorted(allowed[room])) or 'nothing'} (docs/architecture.md)"
                )
            private = (
                other != room
                and (package / room).is_dir()
                and (package / other).is_dir()
                and len(parts) > 2
                and parts[2].startswith("_")
                and (package / other / f"{parts[2]}.py").is_file()
            )
            if private:
                problems.append(
                    f"{where}:{line}: imports {target}, a private module of the sibling room "
                    f"{other}; import a public module of {other} instead"
                )
    return sorted(set(problems))


def test_the_map_names_every_room_and_only_rooms_it_knows():
    allowed = allowed_imports(MAP.read_text(encoding="utf-8"))
    rooms = {room_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(allowed), f"rooms without a row: {sorted(rooms - set(allowed))}"
    named = set().union(*allowed.values())
    assert named <= set(allowed), f"the map allows unknown rooms: {sorted(named - set(allowed))}"


def test_every_import_runs_the_way_the_map_allows():
    allowed = allowed_imports(MAP.read_text(encoding="utf-8"))
    problems = violations(PACKAGE, allowed)
    pending = {
        key: [p for p in problems if p.startswith(f"{key[0]}:") and f" {key[1]}," in p]
        for key in PENDING
    }
    gone = [key for key, found in pending.items() if not found]
    assert not gone, f"fixed, so delete from PENDING: {gone}"
    left = [p for p in problems if not any(p in found for found in pending.values())]
    assert not left, "\n".join(left)


def test_storage_and_gateway_never_import_each_other():
    # Said once more on its own: the loop the ground floor was built to break.
    allowed = allowed_imports(MAP.read_text(encoding="utf-8"))
    assert "_gateway" not in allowed["_storage"]
    assert "_storage" not in allowed["_gateway"]


@pytest.fixture
def tiny_package(tmp_path: Path) -> Path:
    root = tmp_path / "pytest_cmg"
    for room in ("_a", "_b"):
        (root / room).mkdir(parents=True)
        (root / room / "__init__.py").write_text("")
        (root / room / "_inner.py").write_text("")
        (root / room / "public.py").write_text("")
    (root / "__init__.py").write_text("")
    return root


def test_an_upward_import_and_a_reach_in_are_both_named(tiny_package):
    allowed = {"_a": set(), "_b": {"_a"}, "__init__": set()}
    (tiny_package / "_a" / "public.py").write_text(
        "def f():\n    from pytest_cmg._b import public\n"
    )
    (tiny_package / "_b" / "public.py").write_text("from .._a._inner import x\n")
    found = violations(tiny_package, allowed)
    assert any(
        "_a/public.py:2: imports pytest_cmg._b" in p and "may import only" in p for p in found
    )
    assert any(
        "_b/public.py:1: imports pytest_cmg._a._inner" in p and "private" in p for p in found
    )
    (tiny_package / "_a" / "public.py").write_text("")
    (tiny_package / "_b" / "public.py").write_text("from .._a import public\n")
    assert violations(tiny_package, allowed) == []
