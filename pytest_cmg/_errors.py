"""The one exception hierarchy of pytest-cmg.

Every message names the object, the place, the rule broken and, where there is one, the fix::

    PytestCmgError
    ├── InvalidValueError        a value given to a call breaks its rule (ValueError)
    ├── NotFoundError            an item asked for by name or key is not there (LookupError)
    ├── CheckFailed              an assertion helper's check did not hold (AssertionError)
    ├── ProvisioningError        Node, Azurite or a private container could not be made available
    ├── ServiceStartError        a service process did not become ready (command + last output)
    ├── NotRunningError          a service was used before start() or after stop() (RuntimeError)
    ├── ScenarioError            a scenario file breaks the language (file, line, rule, nearest key)
    ├── GatewayError             the fake CMG hit an error while handling a request (re-raised in the test)
    ├── ContentError             the client engine could not obtain verified content (carries an HRESULT)
    │   └── CacheSpaceError      the client cache has no room for the content
    ├── ExpectationFailed        a scenario's expectation did not hold (scenario file and line)
    ├── ScenarioFailed           a scenario item failed: its failed expectations (_scenario/items.py)
    └── BenchError               the benchmark could not measure honestly (RuntimeError)

The exceptions the parts raise and catch among themselves (a refused token, a broken connection,
a malformed CCM message, a download restart) derive from ``PytestCmgError`` too, so that one that
escapes is still of this tree; ``tests/test_exception_tree.py`` checks every class in the package.
The one exception is the CLI's signal stop, a ``BaseException`` as ``KeyboardInterrupt`` is.

A bad argument to a Python call (a negative timeout, an unknown name, a malformed document
handed to a parser) raises ``InvalidValueError``, which is also the ``ValueError`` Python's own
functions raise for it; an item asked for that is not there raises ``NotFoundError``, also a
``LookupError``; a mistake in a scenario *file* is a ``ScenarioError`` with its file and line.
Where a type changed, it keeps the old builtin type as a second base (say so in its docstring),
so that an ``except`` written for the old one still catches it. ``tests/test_exception_tree.py``
walks every module: a ``raise`` of a builtin exception class is allowed only where the same
function catches it, or on the test's short list, each entry with why no user sees it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = [
    "BenchError",
    "CheckFailed",
    "ContentError",
    "ExpectationFailed",
    "GatewayError",
    "InvalidValueError",
    "NotFoundError",
    "NotRunningError",
    "ProvisioningError",
    "PytestCmgError",
    "ScenarioError",
    "ScenarioProblem",
    "ServiceStartError",
]


class PytestCmgError(Exception):
    """Base class of every error raised by pytest-cmg."""


class InvalidValueError(PytestCmgError, ValueError):
    """A value given to a pytest-cmg call breaks its rule.

    A bad argument (a negative timeout, an unknown name, a fault on an endpoint the gateway does
    not serve) or a malformed document handed to a parser (``ContentManifest.from_xml``,
    ``ContentLocationRequest.from_xml``). Also a ``ValueError``, the type these raised before and
    the one Python's own functions raise for a bad value, so ``except ValueError`` still works;
    the package's own readers of untrusted input catch it that way and answer as the product
    would (a 400, a refused message).
    """


class NotFoundError(PytestCmgError, LookupError):
    """An item asked for by name or key is not there (a cache entry evicted meanwhile).

    Also a ``LookupError``, the type ``ClientCache.use`` raised before.
    """


class CheckFailed(PytestCmgError, AssertionError):
    """An assertion helper of the public API found that what it checks did not hold.

    Raised by ``RequestLog.assert_request_made`` and ``assert_no_requests``; the message lists
    what arrived instead. Also an ``AssertionError``, so pytest reports it as a failed check, as
    it did before.
    """


class ProvisioningError(PytestCmgError, RuntimeError):
    """Node, the Azurite package or a private storage container could not be made available.

    Raised when Node or Azurite cannot be found or installed, and by ``CloudDP.create`` when
    the container allows public access (cloud DP content must be private). Also a
    ``RuntimeError``, the type ``CloudDP.create`` raised for that before.
    """


class ServiceStartError(PytestCmgError):
    """A service process (Azurite) exited or did not report readiness in time."""

    def __init__(self, service: str, command: Sequence[str], reason: str, last_output: str) -> None:
        self.service = service
        self.command = list(command)
        self.reason = reason
        self.last_output = last_output
        shown = last_output.rstrip() or "(it printed nothing)"
        msg = (
            f"{service} did not start: {reason}\n"
            f"  command: {' '.join(self.command)}\n"
            f"  last output:\n    " + shown.replace("\n", "\n    ")
        )
        super().__init__(msg)


class NotRunningError(PytestCmgError, RuntimeError):
    """A service was used while it is not running: before ``start()``, or after ``stop()``.

    Every "not started" misuse raises this one type (``FakeCMG``, ``FaultProxy``, the
    benchmark), and so does starting a stopped service that cannot start again. It is also a
    ``RuntimeError``, the type ``FaultProxy`` raised for it before. ``FakeCMG`` raised
    ``GatewayError`` for it before; that type now means only a request the gateway failed to
    handle, which a misuse is not.
    """


@dataclass(frozen=True)
class ScenarioProblem:
    """One rule broken at one place of a scenario file."""

    path: Path
    line: int
    rule: str
    hint: str = ""

    def __str__(self) -> str:
        text = f"{self.path}:{self.line}: {self.rule}"
        return f"{text} ({self.hint})" if self.hint else text


class ScenarioError(PytestCmgError):
    """A scenario file breaks the scenario language; every problem in the file is listed."""

    def __init__(self, problems: Sequence[ScenarioProblem]) -> None:
        self.problems = list(problems)
        count = len(self.problems)
        head = f"{count} problem{'s' if count != 1 else ''} in scenario file"
        super().__init__(head + ":\n" + "\n".join(f"  {p}" for p in self.problems))


class GatewayError(PytestCmgError):
    """The fake CMG raised while handling a request; re-raised in the test by ``check()``."""


class ContentError(PytestCmgError):
    """The client engine could not obtain verified content.

    ``hresult`` is the code the real client reports for the same failure (docs/emulation.md,
    "Client", names each code and its source).
    ``resumable`` says the bytes fetched so far were kept (a give-up on transient errors): a
    later try on the same staging folder continues from them instead of starting over.
    """

    def __init__(self, hresult: int, message: str, *, resumable: bool = False) -> None:
        self.hresult = hresult
        self.resumable = resumable
        super().__init__(f"0x{hresult:08X}: {message}")


class ExpectationFailed(PytestCmgError):
    """A scenario expectation did not hold; rendered as the scenario's own text."""

    def __init__(self, path: Path, line: int, expectation: str, detail: str) -> None:
        self.path = path
        self.line = line
        self.expectation = expectation
        self.detail = detail
        super().__init__(f"{path}:{line}: expectation {expectation} failed\n{detail}")


class BenchError(PytestCmgError, RuntimeError):
    """The benchmark could not measure honestly: a service failed or an output was wrong.

    Raised by ``pytest-cmg bench`` and by a scenario's throughput baseline (a raw read that did
    not come to the package's size). Also a ``RuntimeError``, the type the scenario baseline
    raised for it before.
    """
