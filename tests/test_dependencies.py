"""The dependency list matches the code: nothing declared and unused, nothing imported and
undeclared, and each optional import in the extra its error message names."""

from __future__ import annotations

import ast
import functools
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pytest_cmg"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))

#: Declared for a reason that is not an import of the package: tools CI runs, stubs for mypy,
#: the parallel runner the README's test command uses (`-n 2`), and libraries the tests import.
NOT_IMPORTED_BY_THE_PACKAGE = {
    "pytest-xdist": "runs the README's `pytest -n 2`; the plugin never imports it",
    "ruff": "CI's linter",
    "mypy": "CI's type checker",
    "types-pyyaml": "stubs for mypy",
    "types-requests": "stubs for mypy",
    "jsonschema": "tests/test_scenario_schema.py validates the shipped schema",
    "hypothesis": "property-based tests of the parsers",
    "setuptools": "tests/test_wheel.py builds the wheel without build isolation",
}


def _name(requirement: str) -> str:
    """The normalised distribution name of a requirement string (PEP 503)."""
    name = re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def _declared() -> dict[str, set[str]]:
    """Each declared distribution and where: "runtime" or the extras naming it."""
    where: dict[str, set[str]] = {}
    for requirement in PYPROJECT["project"]["dependencies"]:
        where.setdefault(_name(requirement), set()).add("runtime")
    for extra, requirements in PYPROJECT["project"]["optional-dependencies"].items():
        for requirement in requirements:
            where.setdefault(_name(requirement), set()).add(extra)
    where.pop("pytest-cmg", None)  # the test extra's self-reference pulls the other extras
    return where


def _imports(folder: Path) -> dict[str, list[str]]:
    """Top-level third-party modules imported anywhere under ``folder``, with where."""
    found: dict[str, list[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in {"pytest_cmg", "__future__"}:
                    continue
                found.setdefault(top, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@functools.cache
def _module_map() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once per run


def _distributions_of(module: str) -> set[str]:
    return {_name(dist) for dist in _module_map().get(module, [])}


def test_every_import_of_the_package_is_declared():
    declared = _declared()
    undeclared = {
        module: places[0]
        for module, places in _imports(PACKAGE).items()
        if not _distributions_of(module) & declared.keys()
    }
    assert undeclared == {}


def test_every_declared_runtime_or_feature_dependency_is_imported_by_the_package():
    imported = set().union(*(_distributions_of(module) for module in _imports(PACKAGE)))
    # Distributions that are imported under their own name through another's namespace
    # (azure-storage-blob as `azure`) are matched through packages_distributions above.
    unused = {
        name: sorted(extras)
        for name, extras in _declared().items()
        if name not in imported and name not in NOT_IMPORTED_BY_THE_PACKAGE
    }
    assert unused == {}


def test_the_allowances_are_still_true():
    # An allowance for something no longer declared, or now imported by the package, is stale.
    declared = _declared()
    imported = set().union(*(_distributions_of(module) for module in _imports(PACKAGE)))
    stale = {name for name in NOT_IMPORTED_BY_THE_PACKAGE if name not in declared or name in imported}
    assert stale == set()
    test_imports = set().union(*(_distributions_of(m) for m in _imports(ROOT / "tests")))
    for name in ("jsonschema", "hypothesis"):
        assert name in test_imports, f"{name} is declared for the tests but no test imports it"


def test_optional_features_live_in_the_extra_their_messages_name():
    declared = _declared()
    assert "runtime" not in declared["matplotlib"] and "bench" in declared["matplotlib"]
    assert "container" in declared["testcontainers"] and "container" in declared["docker"]
    assert "runtime" not in declared["pytest-xdist"]
    sources = {path: path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py")}
    for path, text in sources.items():
        for extra in re.findall(r'pip install \\?"pytest-cmg\[(\w+)\]', text):
            assert extra in PYPROJECT["project"]["optional-dependencies"], (path, extra)
            assert extra != "test", f"{path} tells users to install the development extra"
