"""The one exception hierarchy of pytest-cmg.

Every message names the object, the place, the rule broken and, where there is one, the fix::

    PytestCmgError
    ├── ProvisioningError        Node or Azurite could not be made available
    ├── ServiceStartError        a service process did not become ready (command + last output)
    ├── ScenarioError            a scenario file breaks the language (file, line, rule, nearest key)
    ├── GatewayError             the fake CMG hit an error while handling a request (re-raised in the test)
    ├── ContentError             the client engine could not obtain verified content (carries an HRESULT)
    └── ExpectationFailed        a scenario's expectation did not hold (scenario file and line)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = [
    "ContentError",
    "ExpectationFailed",
    "GatewayError",
    "ProvisioningError",
    "PytestCmgError",
    "ScenarioError",
    "ScenarioProblem",
    "ServiceStartError",
]


class PytestCmgError(Exception):
    """Base class of every error raised by pytest-cmg."""


class ProvisioningError(PytestCmgError):
    """Node or the Azurite package could not be found or installed."""


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

    ``hresult`` is the code the real client reports for the same failure (protocol.md section 5).
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
