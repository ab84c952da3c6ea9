"""``pytest --cmg-bench``: the benchmark as test items, one per workload.

Benchmark mode replaces the session's items with one ``cmg-bench::<workload>`` item per workload
(the normal suite is deselected, so ``-k big`` still selects among workloads). The first item
starts the :class:`~._runner.Bench`; each runs its workload's rounds and fails when a figure of
its workload breaches ``--cmg-bench-compare``. The table is printed in the terminal summary, and
the JSON and chart are written at the end of the session. Refused under xdist: parallel workers
would measure each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from .._errors import PytestCmgError
from ._workloads import parse_workloads
from .command import DEFAULT_ROUNDS, check_margin, check_rounds

if TYPE_CHECKING:
    from _pytest._code.code import TerminalRepr, TracebackStyle
    from _pytest.terminal import TerminalReporter

    from ._compare import Comparison
    from ._report import WorkloadResult
    from ._runner import Bench

__all__ = ["BenchItem", "BenchPlugin", "BenchSettings", "configure_bench"]

XDIST_MESSAGE = (
    "benchmarks refuse to run under xdist: parallel workers would share the CPUs being measured "
    "and each start its own Azurite; run with -n 0 / -p no:xdist"
)


@dataclass(frozen=True)
class BenchSettings:
    workloads: tuple[str, ...]
    rounds: int
    quick: bool
    json: Path | None
    chart: Path | None
    compare: str
    margin: float
    aria2: str


def _value(config: pytest.Config, name: str) -> str:
    value = config.getoption(name)
    return str(value) if value is not None else str(config.getini(name))


def _under_xdist(config: pytest.Config) -> bool:
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return True
    workers = getattr(config.option, "numprocesses", None)
    return workers not in (None, 0, "0")


def settings_from(config: pytest.Config) -> BenchSettings:
    """The ``--cmg-bench-*`` options and ini values; ``pytest.UsageError`` when one is wrong."""
    try:
        workloads = parse_workloads(_value(config, "cmg_bench_workloads"))
        rounds_text = config.getoption("cmg_bench_rounds")
        if rounds_text is None:
            ini = str(config.getini("cmg_bench_rounds")).strip()
            rounds_text = ini or (
                "1" if config.getoption("cmg_bench_quick") else str(DEFAULT_ROUNDS)
            )
        rounds = check_rounds(str(rounds_text))
        margin = check_margin(_value(config, "cmg_bench_margin"))
    except ValueError as exc:
        msg = f"--cmg-bench: {exc}"
        raise pytest.UsageError(msg) from None
    json_path = config.getoption("cmg_bench_json")
    chart = config.getoption("cmg_bench_chart")
    if chart:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            msg = '--cmg-bench-chart needs matplotlib: pip install "pytest-cmg[bench]"'
            raise pytest.UsageError(msg) from None
    return BenchSettings(
        workloads=workloads,
        rounds=rounds,
        quick=bool(config.getoption("cmg_bench_quick")),
        json=Path(json_path) if json_path else None,
        chart=Path(chart) if chart else None,
        compare=_value(config, "cmg_bench_compare").strip(),
        margin=margin,
        aria2="auto" if config.getoption("cmg_bench_with_aria2") else "cached",
    )


def configure_bench(config: pytest.Config) -> None:
    """Called by the plugin's ``pytest_configure`` when ``--cmg-bench`` is given."""
    if _under_xdist(config):
        raise pytest.UsageError(XDIST_MESSAGE)
    settings = settings_from(config)
    baseline: dict[str, Any] | None = None
    if settings.compare:
        from ._compare import load_baseline

        try:
            baseline = load_baseline(settings.compare)
        except ValueError as exc:
            msg = f"--cmg-bench-compare: {exc}"
            raise pytest.UsageError(msg) from None
    config.pluginmanager.register(BenchPlugin(settings, baseline), "pytest-cmg-bench")


class BenchFailure(PytestCmgError):
    """A workload's figures breached the compare margin, or its measurement failed."""


class BenchItem(pytest.Item):
    # pytest's Node.from_parent passes its own keyword arguments through.
    def __init__(self, *, plugin: BenchPlugin, **kwargs: Any) -> None:  # noqa: ANN401
        super().__init__(**kwargs)
        self.plugin = plugin

    def runtest(self) -> None:
        self.plugin.run_workload(self.name)

    def repr_failure(
        self, excinfo: pytest.ExceptionInfo[BaseException], style: TracebackStyle | None = None
    ) -> str | TerminalRepr:
        from ._runner import BenchError

        if isinstance(excinfo.value, BenchFailure | BenchError):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self) -> tuple[Path, int | None, str]:
        return self.path, None, f"cmg-bench {self.name}"


class BenchPlugin:
    """Registered for the session when ``--cmg-bench`` is given."""

    def __init__(self, settings: BenchSettings, baseline: dict[str, Any] | None) -> None:
        self.settings = settings
        self.baseline = baseline
        self.bench: Bench | None = None
        self.report: dict[str, Any] | None = None
        self.comparison: Comparison | None = None
        self.written: list[str] = []
        self.errors: list[str] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_collection_modifyitems(
        self, session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        # tryfirst: -k and -m, which deselect in this same hook, then see the bench items.
        if items:
            config.hook.pytest_deselected(items=list(items))
        items[:] = [
            BenchItem.from_parent(session, name=name, nodeid=f"cmg-bench::{name}", plugin=self)
            for name in self.settings.workloads
        ]

    def _bench(self) -> Bench:
        if self.bench is None:
            from ._runner import Bench, BenchConfig

            self.bench = Bench(
                BenchConfig(
                    workloads=self.settings.workloads,
                    rounds=self.settings.rounds,
                    quick=self.settings.quick,
                    aria2=self.settings.aria2,
                )
            )
        return self.bench

    def run_workload(self, name: str) -> WorkloadResult:
        from ._compare import compare

        bench = self._bench()
        result = bench.run_workload(name)
        if self.settings.compare:
            comparison = compare(
                bench.report([result]),
                self.baseline,
                self.settings.margin,
                against=self.settings.compare,
            )
            breaches = comparison.for_workload(name)
            if breaches:
                lines = [
                    f"{name}: {len(breaches)} figure(s) more than {self.settings.margin:.0%} "
                    f"worse than {self.settings.compare}:"
                ] + [f"  {b.describe()}" for b in breaches]
                raise BenchFailure("\n".join(lines))
        return result

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        bench, self.bench = self.bench, None
        if bench is None:
            return
        try:
            if bench.results:
                self.report = bench.report()
        finally:
            bench.stop()
        if self.report is None:
            return
        if self.settings.compare:
            from ._compare import compare

            self.comparison = compare(
                self.report, self.baseline, self.settings.margin, against=self.settings.compare
            )
        try:
            if self.settings.json is not None:
                self.settings.json.write_text(json.dumps(self.report, indent=2) + "\n", "utf-8")
                self.written.append(f"JSON written to {self.settings.json}")
            if self.settings.chart is not None:
                from ._chart import write_chart

                write_chart(self.report, self.settings.chart)
                self.written.append(f"chart written to {self.settings.chart}")
        except (OSError, RuntimeError) as exc:
            self.errors.append(f"cannot write the benchmark results: {exc}")
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter: TerminalReporter) -> None:
        if self.report is None:
            return
        from ._report import render_table

        terminalreporter.section("pytest-cmg benchmark")
        terminalreporter.write_line(render_table(self.report))
        if self.comparison is not None:
            terminalreporter.write_line("")
            terminalreporter.write_line(self.comparison.render())
        for line in self.written + self.errors:
            terminalreporter.write_line(line)
