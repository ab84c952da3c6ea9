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
4. No builtin exception escapes to a user: a ``raise`` of a builtin exception class
   (``ValueError``, ``RuntimeError``, ``LookupError``...) stands inside a ``try`` of the same
   function whose handler catches that class or a base of it, or is listed in
   :data:`BUILTIN_ALLOWED` with why no user sees it; an abstract method (its body only
   ``raise NotImplementedError``) is the Python idiom, not an error. A bad value is an
   ``InvalidValueError`` (also a ``ValueError``), a missing item a ``NotFoundError`` (also a
   ``LookupError``).
5. A bad value raises the same type everywhere: a message that
   reads "choose one of", "is not one of" or "must be ..." is an ``InvalidValueError`` (a
   command-line option's a ``pytest.UsageError``).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import pytest_cmg
from pytest_cmg import (
    CheckFailed,
    InvalidValueError,
    NotFoundError,
    NotRunningError,
    PytestCmgError,
)

if TYPE_CHECKING:
    from collections.abc import Callable

PACKAGE = Path(pytest_cmg.__file__).parent

#: Exception classes that stand outside the tree on purpose: qualified name -> why.
OUTSIDE = {
    "pytest_cmg._cli.serve._Stop": (
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


def _raises_saying(words: re.Pattern[str]) -> list[tuple[str, str]]:
    """(raised type, place) of every raise whose message matches ``words``."""
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
                if words.search(text):
                    found.append((ast.unparse(node.exc.func), _where(module, node)))
    return found


def test_every_not_started_misuse_raises_not_running_error():
    found = _raises_saying(NOT_RUNNING)
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


#: Builtin raises that rule 4 lets stand: (module, exception) -> why no user sees it as such.
BUILTIN_ALLOWED = {
    ("pytest_cmg", "AttributeError"): (
        "the module __getattr__ of the lazy public API: Python's attribute protocol (hasattr, "
        "from pytest_cmg import x) reads exactly AttributeError for an unknown name"
    ),
    ("pytest_cmg._net.connection", "AssertionError"): (
        "the unreachable end of the bounded two-try upstream loop: reaching it is a bug"
    ),
    ("pytest_cmg._scenario.timeline", "AssertionError"): (
        "a fault the runner refuses before the run (a ScenarioError with file and line) "
        "reaching the timeline: a bug, not a scenario mistake"
    ),
}

_BUILTIN_EXCEPTIONS = {
    name: cls
    for name, cls in vars(builtins).items()
    if isinstance(cls, type) and issubclass(cls, BaseException)
}


def _caught_by(handler: ast.ExceptHandler) -> list[type[BaseException]]:
    """The builtin classes an ``except`` clause catches (a bare ``except`` catches them all)."""
    if handler.type is None:
        return [BaseException]
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return [c for n in names if (c := _BUILTIN_EXCEPTIONS.get(ast.unparse(n))) is not None]


def _is_abstract(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """A method whose whole body (after its docstring) is ``raise NotImplementedError``: the
    Python idiom for "a subclass overrides this", not an error anyone meets."""
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    if len(body) != 1 or not isinstance(body[0], ast.Raise) or body[0].exc is None:
        return False
    raised = body[0].exc
    raised = raised.func if isinstance(raised, ast.Call) else raised
    return ast.unparse(raised) == "NotImplementedError"


def unguarded_builtin_raises(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, class name) of each ``raise`` of a builtin exception class no handler of the same
    function catches: the raise is in a ``try`` body (not its handlers, ``else`` or
    ``finally``) whose ``except`` names the class or a base of it. An abstract method
    (:func:`_is_abstract`) is no such raise."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST, caught: tuple[type[BaseException], ...]) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_abstract(node):
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda | ast.ClassDef):
            caught = ()  # a try around a definition does not guard the body's later calls
        if isinstance(node, ast.Raise) and node.exc is not None:
            raised = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            cls = _BUILTIN_EXCEPTIONS.get(ast.unparse(raised))
            if cls is not None and not any(issubclass(cls, c) for c in caught):
                found.append((node.lineno, cls.__name__))
        if isinstance(node, ast.Try | ast.TryStar):
            inner = caught + tuple(c for h in node.handlers for c in _caught_by(h))
            for child in node.body:
                visit(child, inner)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, caught)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, caught)

    visit(tree, ())
    return sorted(found)


def test_the_builtin_raise_scan_tells_guarded_from_escaping():
    source = """
def caught():
    try:
        raise KeyError("k")  # caught by a base: guarded
    except LookupError:
        pass

def other_handler():
    try:
        raise ValueError("v")  # line 10: this handler does not catch it
    except TypeError:
        pass

def in_handler():
    try:
        pass
    except ValueError:
        raise ValueError("again")  # line 18: the handler's own raise escapes

def nested():
    try:
        def inner():
            raise RuntimeError("r")  # line 23: another function's raise
    except RuntimeError:
        pass

def plain():
    raise LookupError("x")  # line 28

def ours():
    raise SomethingOfOurs("not a builtin")

class Base:
    def overridden(self):
        'Subclasses say.'
        raise NotImplementedError

    def not_abstract(self, x):
        if x:
            raise NotImplementedError  # line 40: a real refusal, not an abstract method
        return x
"""
    assert unguarded_builtin_raises(ast.parse(source)) == [
        (10, "ValueError"),
        (18, "ValueError"),
        (23, "RuntimeError"),
        (28, "LookupError"),
        (40, "NotImplementedError"),
    ]


def test_no_builtin_exception_escapes_to_a_user():
    escaping = []
    used = set()
    for module in MODULES:
        for line, name in unguarded_builtin_raises(module.tree):
            key = (module.name, name)
            if key in BUILTIN_ALLOWED:
                used.add(key)
                continue
            place = f"{module.path.relative_to(PACKAGE.parent)}:{line}"
            escaping.append(f"{place}: raise {name}")
    assert not escaping, (
        "a builtin exception a user can see: raise the tree's class instead (InvalidValueError "
        "for a bad value, NotFoundError for a missing item: both keep the builtin as a base), "
        "catch it in the same function, or add (module, class) to BUILTIN_ALLOWED with why no "
        "user sees it:\n" + "\n".join(escaping)
    )
    stale = sorted(set(BUILTIN_ALLOWED) - used)
    assert not stale, f"BUILTIN_ALLOWED entries that match no raise any more: remove them: {stale}"


def _bad_values() -> list[tuple[str, Callable[[], object]]]:
    from pytest_cmg import ContentLocationRequest, ContentManifest, RequestLog
    from pytest_cmg.faults import FaultProxy

    return [
        ("FaultProxy(https upstream)", lambda: FaultProxy("https://127.0.0.1:9")),
        ("FaultProxy(timeout=0)", lambda: FaultProxy("http://127.0.0.1:9", timeout=0)),
        ("RequestLog(max_entries=0)", lambda: RequestLog(max_entries=0)),
        ("ContentManifest.from_xml(other root)", lambda: ContentManifest.from_xml("<x/>")),
        ("ContentLocationRequest.from_xml(not XML)", lambda: ContentLocationRequest.from_xml("{")),
    ]


@pytest.mark.parametrize("call", _bad_values(), ids=lambda c: c[0])
def test_a_bad_value_is_an_invalid_value_error_everywhere(
    call: tuple[str, Callable[[], object]],
) -> None:
    # The same misuse, the same type: the tree's class, still caught by `except ValueError`.
    with pytest.raises(InvalidValueError) as caught:
        call[1]()
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, PytestCmgError)


def test_a_missing_cache_entry_is_a_not_found_error(tmp_path: Path) -> None:
    from pytest_cmg import CacheEntry, ClientCache

    cache = ClientCache(tmp_path / "cache", size_mb=1)
    gone = CacheEntry("PS100099", 1, tmp_path / "cache" / "PS100099.1")
    with pytest.raises(NotFoundError, match=r"PS100099\.1") as caught, cache.use(gone):
        pass
    assert isinstance(caught.value, LookupError)


def test_a_failed_request_log_check_is_check_failed() -> None:
    from pytest_cmg import RequestLog

    log = RequestLog()
    with pytest.raises(CheckFailed, match="expected at least 1 request") as caught:
        log.assert_request_made("location")
    # pytest shows it as a failed check, as the AssertionError it was before.
    assert isinstance(caught.value, AssertionError)
    log.assert_no_requests("location")


#: The words of a bad value: a choice outside its set, a number outside its range.
BAD_VALUE = re.compile(r"choose one of|is not one of|must be (at least|>=|>|positive|one of|a )")


def test_every_bad_value_raises_invalid_value_error():
    found = list(_raises_saying(BAD_VALUE))
    # FakeCMG, the gateway's faults and TLS, the fault proxy's faults, the client: far fewer
    # means the scan lost them.
    assert len(found) >= 15, found
    allowed = {"InvalidValueError", "pytest.UsageError"}
    wrong = [f"{place}: {raised}" for raised, place in found if raised not in allowed]
    assert not wrong, (
        "a bad value raises InvalidValueError (a command-line option's, pytest.UsageError):\n"
        + "\n".join(wrong)
    )


def test_a_public_container_is_a_provisioning_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from types import SimpleNamespace

    from pytest_cmg import BlobEndpoint, CloudDP, ProvisioningError
    from pytest_cmg._storage.endpoint import DEV_ACCOUNT_KEY, DEV_ACCOUNT_NAME

    # The container as Azurite reports one that allows anonymous reads: no service is needed
    # to see which type CloudDP.create raises for it (tests/test_sas_and_inputs.py does it live).
    public = SimpleNamespace(
        create_container=lambda: None,
        get_container_properties=lambda: SimpleNamespace(public_access="blob"),
    )
    monkeypatch.setattr(CloudDP, "_container", property(lambda self: public))
    endpoint = BlobEndpoint(
        "http://127.0.0.1:9/devstoreaccount1", DEV_ACCOUNT_NAME, DEV_ACCOUNT_KEY, "external"
    )
    with pytest.raises(ProvisioningError, match="allows public access") as caught:
        CloudDP(endpoint).create()
    # Still the RuntimeError it was.
    assert isinstance(caught.value, RuntimeError)
