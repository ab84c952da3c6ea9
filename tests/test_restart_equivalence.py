"""Issue 13's "done when", checked on every scenario: a power cut at a step boundary changes
nothing a scenario asserts.

Each scenario of ``scenarios/`` that can restart (not a benchmark, not one that already
restarts) is run once more with one ``restart`` entry added to its timeline, before a step
chosen from the file's path (so a run repeats, and each file gets its own step). The restart
takes no virtual time (``client.restart_takes: 0``), so timed entries of the timeline still
fall where they fell: what may differ is only what the product does differently across a
restart (the boot processes, the resume lines, a fresh device token), and none of the
scenarios' own expectations may notice it. The entry is ``optional``: a sequence that fails
before the chosen step never reaches it, as a machine that stayed up would not.

The scenarios' own runs (without the restart) are the scenario suite; this file adds the
restarted twin of each, against the same real Azurite and fake CMG.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenarios
from pytest_cmg._scenario.model import Restart, Scenario
from pytest_cmg._scenario.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "scenarios"


def _restartable() -> list[object]:
    cases = []
    for path in sorted(SCENARIOS.rglob("*.cmg.yaml")):
        for index, scenario in enumerate(load_scenarios(path)):
            if scenario.benchmark is not None or scenario.restarts:
                continue
            if not scenario.task_sequence.steps:
                continue
            name = f"{path.relative_to(SCENARIOS)}[{scenario.case_id or index}]"
            cases.append(pytest.param(path, index, id=name))
    return cases


def _step_for(path: Path, index: int, steps: int) -> int:
    # From the file's name, not a random draw: the same step in every run and on every machine.
    digest = hashlib.sha256(f"{path.relative_to(SCENARIOS)}#{index}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % steps


def with_power_cut(scenario: Scenario, step: int) -> Scenario:
    cut = Restart(where=f"faults[{len(scenario.timeline)}]", before_step=step, optional=True)
    return dataclasses.replace(scenario, timeline=(*scenario.timeline, cut), restart_takes=0.0)


def test_every_scenario_that_can_restart_is_checked() -> None:
    # A scenario language change that made ``_restartable`` skip everything would pass the test
    # below vacuously.
    assert len(_restartable()) >= 80


@pytest.mark.parametrize(("path", "index"), _restartable())
def test_a_power_cut_before_a_step_changes_nothing_the_scenario_asserts(
    cmg_harness: object, tmp_path: Path, path: Path, index: int
) -> None:
    scenario = load_scenarios(path)[index]
    step = _step_for(path, index, len(scenario.task_sequence.steps))
    restarted = with_power_cut(scenario, step)
    assert restarted.restarts, "the added entry did not make the scenario restart"
    run = run_scenario(restarted, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    steps = scenario.task_sequence.steps
    name = steps[step].name
    # Got to the step: ran it, skipped it by its condition, or went on past it.
    went = {*run.result.steps_run, run.result.failed_step}
    reached = run.result.succeeded or any(s.name in went for s in steps[step:])
    failures = [str(f) for f in check_expectations(scenario, run)]
    assert failures == [], f"power cut before step {step} ({name}):\n" + "\n".join(failures)
    # The cut happened when the sequence got there, and only then.
    assert run.result.reboots == (1 if reached else 0), (step, name, run.result.steps_run)
