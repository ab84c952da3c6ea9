"""pytest's view of scenario files: one collector per file, one item per scenario.

Validation happens in :meth:`ScenarioFile.collect`, so a broken file is one collection error that
lists every problem with its line, not a failing test per problem (tavern's weakness). Items run
against the session's :class:`~pytest_cmg._harness.Harness`, reached through ``config.stash``:
no private pytest API is needed to share services between fixtures and items.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .._errors import ExpectationFailed, ScenarioError
from .model import Scenario, load_scenario
from .runner import check_expectations, run_scenario

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from _pytest._code.code import TerminalRepr

    from .._harness import Harness

__all__ = ["ScenarioFile", "ScenarioItem"]


class ScenarioFile(pytest.File):
    """A scenario file (``*.cmg.yaml`` by default).

    :param harness: called when an item runs, never at collection, so ``--collect-only`` starts
        no service. The plugin passes it in; this module never imports the plugin.
    """

    def __init__(self, *, harness: Callable[[], Harness], **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self.harness = harness

    def collect(self) -> Iterator[ScenarioItem]:
        scenario = load_scenario(self.path)
        yield ScenarioItem.from_parent(self, name=scenario.name, scenario=scenario)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> str | TerminalRepr:  # type: ignore[override]
        error = excinfo.value
        if isinstance(error, ScenarioError):
            # Paths as pytest prints node IDs: relative to where pytest was started.
            here = self.config.invocation_params.dir
            problems = [
                replace(p, path=Path(os.path.relpath(p.path, here)))
                if p.path.is_relative_to(here)
                else p
                for p in error.problems
            ]
            return str(ScenarioError(problems))
        return super().repr_failure(excinfo)


class ScenarioItem(pytest.Item):
    """One scenario, run end to end against real Azurite and the HTTPS fake CMG."""

    def __init__(self, *, scenario: Scenario, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self.scenario = scenario

    def runtest(self) -> None:
        assert isinstance(self.parent, ScenarioFile)
        harness = self.parent.harness()
        workdir = Path(tempfile.mkdtemp(prefix="pytest-cmg-"))
        keep = True
        try:
            run = run_scenario(self.scenario, harness, workdir)
            self.add_report_section(
                "call",
                "cmg",
                f"Azurite blob service: {run.blob_endpoint} (backend {harness.backend_name}, "
                f"pid {harness.backend_pid})\nFake CMG: {run.cmg_url}\nWork folder: {workdir}",
            )
            failures = check_expectations(self.scenario, run)
            if failures:
                raise ScenarioFailed(failures, workdir)
            keep = False
        finally:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> str | TerminalRepr:  # type: ignore[override]
        if isinstance(excinfo.value, ScenarioFailed):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        # 0-based line: pytest adds 1 when it prints the location.
        return self.path, self.scenario.line("scenario") - 1, f"scenario: {self.name}"


class ScenarioFailed(Exception):
    """One or more expectations of a scenario did not hold."""

    def __init__(self, failures: list[ExpectationFailed], workdir: Path) -> None:
        self.failures = failures
        text = "\n\n".join(str(f) for f in failures)
        super().__init__(f"{text}\n\n(smsts.log and the client cache are kept in {workdir})")
