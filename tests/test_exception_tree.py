"""One exception tree: every exception class of pytest-cmg derives from ``PytestCmgError``.

The package is walked (``pkgutil.walk_packages``, then ``ast`` over each module's source), so a
class added anywhere later is checked too. The rules (pytest_cmg/_errors.py says why):

1. Every class defined in ``pytest_cmg`` that derives from ``BaseException`` derives from
   ``PytestCmgError``, but for :data:`OUTSIDE`, each with its reason.
2. A mistake in a scenario file is a ``ScenarioError``: nothing in ``pytest_cmg/_scenario``
   raises ``RuntimeError`` or ``Exception``.
3. The same misuse raises the same type everywhere: every "not started" message (or "not
   running", "cannot be started again", "call start()", "until start()") is raised as
   ``NotRunningError``.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

import pytest_cmg
from pytest_cmg import NotRunningError, PytestCmgError

PACKAGE = Path(pytest_cmg.__file__).parent

#: Exception classes that stand outside the tree on purpose: qualified name -> why.
OUTSIDE = {
    "pytest_cmg._cli._Stop": (
        "a BaseException, as KeyboardInterrupt is, so that no `except Exception` on the way "
        "takes serve's signal stop for a failure"
    ),
}

#: The words of a "not started" misuse.
NOT_RUNNING = re.compile(
    r"not started|not running|cannot be started again|(call|until) start\(\)", re.IGNORECASE
)


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module


def _modules() -> list[Module]:
    found = [
        Module(
            "pytest_cmg", PACKAGE / "__init__.py", ast.parse((PACKAGE / "__init__.py").read_text())
        )
    ]
    for info in pkgutil.walk_packages([str(PACKAGE)], prefix="pytest_cmg."):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin is not None, info.name
        path = Path(spec.origin)
        found.append(Module(info.name, path, ast.parse(path.read_text(), filename=str(path))))
    return found


MODULES = _modules()


def _where(module: Module, node: ast.AST) -> str:
    return f"{module.path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"


def test_the_walk_sees_the_whole_package():
    # A walk that silently found nothing would pass every check below.
    names = {m.name for m in MODULES}
    assert {"pytest_cmg._errors", "pytest_cmg._scenario.runner", "pytest_cmg._cli"} <= names
    assert len(MODULES) == len(list(PACKAGE.rglob("*.py")))


def test_every_exception_class_derives_from_pytest_cmg_error():
    outside = []
    checked = 0
    for module in MODULES:
        imported = importlib.import_module(module.name)
        for node in ast.walk(module.tree):
            if not isinstance(node, ast.ClassDef):
                continue
            qualified = f"{module.name}.{node.name}"
            cls = vars(imported).get(node.name)
            if not isinstance(cls, type):
                # A class inside a function or a class: judge it by its bases' names.
                bases = [
                    vars(imported).get(ast.unparse(b), getattr(builtins, ast.unparse(b), None))
                    for b in node.bases
                ]
                if not any(isinstance(b, type) and issubclass(b, BaseException) for b in bases):
                    continue
                if any(isinstance(b, type) and issubclass(b, PytestCmgError) for b in bases):
                    checked += 1
                    continue
                outside.append(f"{_where(module, node)}: {node.name}")
                continue
            if not issubclass(cls, BaseException):
                continue
            checked += 1
            if not issubclass(cls, PytestCmgError) and qualified not in OUTSIDE:
                outside.append(
                    f"{_where(module, node)}: {node.name}{tuple(b.__name__ for b in cls.__bases__)}"
                )
    assert not outside, (
        "exception classes outside the PytestCmgError tree (derive from PytestCmgError, keeping "
        "an old builtin base second if callers catch it, or add it to OUTSIDE with the reason):\n"
        + "\n".join(outside)
    )
    assert checked >= 20  # the package defines dozens; far fewer means the walk went wrong


def test_scenario_package_raises_no_runtime_error():
    found = []
    for module in MODULES:
        if not module.name.startswith("pytest_cmg._scenario"):
            continue
        for node in ast.walk(module.tree):
            if isinstance(node, ast.Raise) and node.exc is not None:
                raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
                if ast.unparse(raised) in {"RuntimeError", "Exception"}:
                    found.append(f"{_where(module, node)}: raise {ast.unparse(raised)}")
    assert not found, (
        "a scenario mistake is a ScenarioError with file and line; an internal invariant an "
        "AssertionError:\n" + "\n".join(found)
    )


def _message_text(value: ast.expr) -> str:
    """The literal text of a message expression: its string constants, f-string parts included."""
    return " ".join(
        n.value for n in ast.walk(value) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    )


def _not_running_raises() -> list[tuple[str, str]]:
    """(raised type, place) of every raise whose message is a "not started" one."""
    found = []
    for module in MODULES:
        for function in ast.walk(module.tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assigned: dict[str, str] = {}
            # ast.walk is breadth-first; sort by line so each raise sees the assignment before it.
            nodes = sorted(
                (n for n in ast.walk(function) if isinstance(n, ast.Assign | ast.Raise)),
                key=lambda n: n.lineno,
            )
            for node in nodes:
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            assigned[target.id] = _message_text(node.value)
                    continue
                if not isinstance(node.exc, ast.Call) or not node.exc.args:
                    continue
                first = node.exc.args[0]
                text = (
                    assigned.get(first.id, "")
                    if isinstance(first, ast.Name)
                    else _message_text(first)
                )
                if NOT_RUNNING.search(text):
                    found.append((ast.unparse(node.exc.func), _where(module, node)))
    return found


def test_every_not_started_misuse_raises_not_running_error():
    found = _not_running_raises()
    # FakeCMG (two), the fault proxy (two): fewer means the scan lost them.
    assert len(found) >= 4, found
    wrong = [f"{place}: {raised}" for raised, place in found if raised != "NotRunningError"]
    assert not wrong, "a not-started misuse raises NotRunningError everywhere:\n" + "\n".join(wrong)


def test_not_running_error_is_caught_as_before():
    # It replaced FaultProxy's RuntimeError; an `except RuntimeError` still catches it.
    assert issubclass(NotRunningError, RuntimeError)
    from pytest_cmg.faults import FaultProxy

    proxy = FaultProxy("http://127.0.0.1:9")
    with pytest.raises(NotRunningError, match=r"not started; call start\(\)"):
        _ = proxy.port
    proxy.start()
    proxy.stop()
    with pytest.raises(RuntimeError, match="cannot be started again"):
        proxy.start()
