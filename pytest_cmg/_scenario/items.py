"""pytest's view of scenario files: one collector per file, one item per scenario case.

Validation happens in :meth:`ScenarioFile.collect`, so a broken file is one collection error that
lists every problem with its line, not a failing test per problem (tavern's weakness). Items run
against the session's :class:`~pytest_cmg._harness.Harness`, reached through ``config.stash``:
no private pytest API is needed to share services between fixtures and items.

A parametrised file (``matrix``, ``cases``) gives one item per case, named ``scenario[id]``; the
IDs come from the file alone, in the order it is written, so every xdist worker collects the same
items in the same order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .._client.acp import ABORT_CODE, ALLOW_TOKEN_AUTH, DOWNLOAD_PROGRAM
from .._errors import ExpectationFailed, PytestCmgError, ScenarioError, ScenarioProblem
from .benchmark import report_lines, throughput_properties
from .expectations import check_expectations
from .limits import nearest, shown
from .load import load_scenarios
from .runner import not_applicable, not_judged, run_scenario
from .spec import show_seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    from _pytest._code.code import TerminalRepr

    from .._harness import Harness
    from .model import Scenario

__all__ = [
    "BUILTIN_MARKERS",
    "CONFORMANCE_FAILED",
    "CONFORMANCE_ITEM",
    "ScenarioFailed",
    "ScenarioFile",
    "ScenarioItem",
]

#: Markers pytest knows without registration that make sense on a scenario item.
BUILTIN_MARKERS = ("skip", "skipif", "xfail", "filterwarnings")
#: ``user_properties`` names the conformance report reads from the reports (so also under
#: xdist, where only reports reach the controller): every scenario item carries the first,
#: ``{"file", "line", "not_applicable"}``; a failed one also the second, its failed expectations.
CONFORMANCE_ITEM = "cmg_conformance"
CONFORMANCE_FAILED = "cmg_conformance_failed"


def registered_markers(config: pytest.Config) -> list[str]:
    names = [
        str(line).split(":", 1)[0].split("(", 1)[0].strip() for line in config.getini("markers")
    ]
    return sorted({*BUILTIN_MARKERS, *(n for n in names if n)})


class ScenarioFile(pytest.File):
    """A scenario file (``*.cmg.yaml`` by default).

    :param harness: called when an item runs, never at collection, so ``--collect-only`` starts
        no service. The plugin passes it in; this module never imports the plugin.
    :param fixtures: the user's fixtures folders for includes and refs, searched in order
        (None: the nearest ``fixtures`` folder above the file), before the shipped worlds.
    """

    def __init__(
        self,
        *,
        harness: Callable[[], Harness],
        fixtures: Sequence[Path] | None = None,
        download_program: str | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> None:
        super().__init__(**kwargs)
        self.harness = harness
        self.fixtures = fixtures
        #: ``--cmg-download-program``: every item runs with it as the task sequence's alternate
        #: content provider, and an item whose scenario ``requires`` something else is skipped.
        self.download_program = download_program

    def collect(self) -> Iterator[ScenarioItem]:
        scenarios = load_scenarios(self.path, fixtures=self.fixtures)
        known = registered_markers(self.config)
        problems = []
        for scenario in scenarios:
            for marker in scenario.markers:
                if marker.name not in known:
                    path, line = scenario.location(marker.where)
                    near = nearest(marker.name, known)
                    problems.append(
                        ScenarioProblem(
                            path,
                            line,
                            f"marker {shown(marker.name)} is not registered",
                            (f"did you mean {near!r}? " if near else "")
                            + "register it in the markers ini option; known: "
                            + ", ".join(known),
                        )
                    )
            problems += _undeclared_acp_variables(scenario)
        if problems:
            raise ScenarioError(sorted(set(problems), key=lambda p: (str(p.path), p.line)))
        for scenario in scenarios:
            item = ScenarioItem.from_parent(self, name=scenario.item_name, scenario=scenario)
            for marker in scenario.markers:
                item.add_marker(getattr(pytest.mark, marker.name)(*marker.args, **marker.kwargs))
            reason = not_applicable(scenario) if self.download_program is not None else None
            path, line = scenario.location("requires" if reason else scenario.item_where)
            item.user_properties.append(
                (
                    CONFORMANCE_ITEM,
                    {
                        "scenario": scenario.item_name,
                        "file": _shown(path, self.config.rootpath),
                        "line": line,
                        "not_applicable": reason,
                        "not_judged": (
                            [f"expect.{key}" for key in scenario.builtin_expect]
                            if self.download_program is not None and reason is None
                            else []
                        ),
                    },
                )
            )
            if reason is not None:
                # Decided from the file before anything runs, as the issue asks: a skip, with
                # the declaration's line and reason, never a failure caught after the fact.
                item.add_marker(
                    pytest.mark.skip(
                        reason=f"not applicable to --cmg-download-program "
                        f"({path.name}:{line}): {reason}"
                    )
                )
            yield item

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> str | TerminalRepr:  # type: ignore[override]
        error = excinfo.value
        if isinstance(error, ScenarioError):
            # Paths as pytest prints node IDs: relative to where pytest was started.
            here = self.config.invocation_params.dir
            problems = [
                replace(p, path=Path(os.path.relpath(p.path, here)))
                if p.path.is_absolute() and p.path.is_relative_to(here)
                else p
                for p in error.problems
            ]
            return str(ScenarioError(problems))
        return super().repr_failure(excinfo)


class ScenarioItem(pytest.Item):
    """One scenario case, run end to end against real Azurite and the HTTPS fake CMG."""

    def __init__(self, *, scenario: Scenario, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self.scenario = scenario

    def runtest(self) -> None:
        assert isinstance(self.parent, ScenarioFile)
        harness = self.parent.harness()
        workdir = Path(tempfile.mkdtemp(prefix="pytest-cmg-"))
        keep = True
        try:
            run = run_scenario(
                self.scenario, harness, workdir, download_program=self.parent.download_program
            )
            section = (
                f"Azurite blob service: {run.blob_endpoint} (backend {harness.backend_name}, "
                f"pid {harness.backend_pid})\nFake CMG: {run.cmg_url}\nWork folder: {workdir}\n"
                f"Virtual time: {show_seconds(run.elapsed)} ({len(run.waits)} retry wait(s))"
            )
            if run.timeline:
                section += "\nTimeline:\n" + "\n".join(f"  {line}" for line in run.timeline)
            self.add_report_section("call", "cmg", section)
            if run.throughput:
                # Before the expectations are judged: the figures are reported pass or fail.
                floors = dict(self.scenario.expect.throughput or {})
                figures = list(run.throughput.values())
                self.user_properties.extend(throughput_properties(figures, floors))
                self.add_report_section("call", "cmg throughput", report_lines(figures, floors))
            failures = check_expectations(self.scenario, run)
            if self.parent.download_program is not None:
                # What the file says judges the built-in core only; the rest must still hold.
                failures, _ = not_judged(self.scenario, failures)
            if failures:
                self.user_properties.append(
                    (
                        CONFORMANCE_FAILED,
                        [_failure_record(f, self.config.rootpath) for f in failures],
                    )
                )
                raise ScenarioFailed(failures, workdir, self.scenario)
            keep = False
        finally:
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException]) -> str | TerminalRepr:  # type: ignore[override]
        if isinstance(excinfo.value, ScenarioFailed):
            return excinfo.value.render(self.config.invocation_params.dir)
        return super().repr_failure(excinfo)

    def reportinfo(self) -> tuple[Path, int, str]:
        # 0-based line: pytest adds 1 when it prints the location.
        _, line = self.scenario.location(self.scenario.item_where)
        return self.path, line - 1, f"scenario: {self.name}"


def _undeclared_acp_variables(scenario: Scenario) -> list[ScenarioProblem]:
    """A scenario that sets the ACP's own variables must say so (``requires: [acp_variables]``).

    ``--cmg-download-program`` replaces them, so such a scenario is not applicable to another
    downloader; the file has to declare it, since conformance mode never guesses from content.
    """
    if "acp_variables" in scenario.requires:
        return []
    problems = []
    for name in (DOWNLOAD_PROGRAM, ABORT_CODE, ALLOW_TOKEN_AUTH):
        if name in scenario.task_sequence.variables:
            path, line = scenario.location(f"task_sequence.variables.{name}")
            problems.append(
                ScenarioProblem(
                    path,
                    line,
                    f"task_sequence.variables.{name} is an alternate content provider variable, "
                    "which --cmg-download-program replaces",
                    "declare it with requires: [acp_variables]; the scenario is then not "
                    "applicable to another downloader",
                )
            )
    return problems


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the rootdir when it is below it: reports compare across machines."""
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def _failure_record(failure: ExpectationFailed, root: Path) -> dict[str, Any]:
    """A failed expectation as the conformance report gives it (JSON-ready)."""
    return {
        "key": failure.expectation,
        "file": _shown(failure.path, root),
        "line": failure.line,
        "expected": getattr(failure, "expected", None),
        "actual": getattr(failure, "actual", None),
    }


class ScenarioFailed(PytestCmgError):
    """One or more expectations of a scenario did not hold."""

    def __init__(
        self, failures: list[ExpectationFailed], workdir: Path, scenario: Scenario | None = None
    ) -> None:
        self.failures = failures
        self.workdir = workdir
        self.scenario = scenario
        super().__init__(self.render(None))

    def render(self, here: Path | None) -> str:
        def show(path: Path) -> str:
            if here is not None and path.is_absolute() and path.is_relative_to(here):
                return os.path.relpath(path, here)
            return str(path)

        parts = []
        scenario = self.scenario
        if scenario is not None and scenario.case_id is not None:
            values = ", ".join(
                f"{path}={value} (line {scenario.line(where)})"
                for path, value, where in scenario.case_values
            )
            parts.append(f"case {scenario.case_id}" + (f": {values}" if values else ""))
        for f in self.failures:
            parts.append(f"{show(f.path)}:{f.line}: expectation {f.expectation} failed\n{f.detail}")
        text = "\n\n".join(parts)
        return f"{text}\n\n(smsts.log and the client cache are kept in {self.workdir})"
