"""Issue 13's "done when", checked on every scenario: a power cut at a step boundary changes
nothing a scenario asserts, nor how the run ends (its exit code, steps, task sequence cache,
downloaded packages, variables and client paths equal those of a run where the machine stayed
up, run beside it).

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

from pytest_cmg._protocol.settings import CmgSettings
from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenarios
from pytest_cmg._scenario.model import Restart, RestartMidDownload, Scenario
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
    # Beyond what the file asserts: the same end as the run of a machine that stayed up.
    stayed = run_scenario(scenario, cmg_harness, tmp_path / "stayed")  # type: ignore[arg-type]
    assert _end_of(run) == _end_of(stayed), f"power cut before step {step} ({name})"


#: Variables a restart sets by itself (none so far): everything else must end as it would have.
RESTART_VARIABLES: frozenset[str] = frozenset()


def _end_of(run: object) -> dict[str, object]:
    """How a run ended, as far as a restart must not change it."""
    result = run.result  # type: ignore[attr-defined]
    return {
        "exit_code": hex(result.exit_code),
        "steps_run": result.steps_run,
        "failed_step": result.failed_step,
        "ts_cache": sorted(result.ts_cache),
        "downloaded": sorted({t.package_id for t in result.transfers if not t.from_cache}),
        "variables": {
            k: v for k, v in result.variables.items() if k not in RESTART_VARIABLES
        },
        "paths": result.paths,
    }


#: What a power cut in the middle of a download changes, as the product would (the scenarios
#: whose own faults or egress counts a restart necessarily changes are skipped, each with why): the next boot
#: asks the CMG for a fresh location and manifest (a SAS is never persisted), asks storage once
#: more for the rest of the file, and fetches again the bytes its journal did not hold (all of a
#: file smaller than one receive buffer). Every other expectation of the scenario must hold.
MID_DOWNLOAD_CHANGES = (
    "expect.requests.location",
    "expect.requests.manifest",
    "expect.storage_requests",
    "expect.storage_bytes",
)


def _first_cloud_file(scenario: Scenario) -> tuple[str, str, int] | None:
    """The package, file and size of the first file the sequence downloads from the cloud DP."""
    from pytest_cmg._scenario.content import package_file_names
    from pytest_cmg._scenario.limits import OS_UPGRADE_MAIN_SHARE, split_sizes

    specs = {p.id: p for p in scenario.packages if p.on_cloud_dp}
    for step in scenario.task_sequence.steps:
        for package_id in step.packages:
            spec = specs.get(package_id)
            if spec is None:
                continue
            share = OS_UPGRADE_MAIN_SHARE if spec.type == "os_upgrade" else None
            names = package_file_names(spec, scenario.seed)
            sizes = split_sizes(spec.size, spec.files, share)
            # The largest file: where a cut has the most bytes to lose.
            size, name = max(zip(sizes, names, strict=True))
            if size >= 2:
                return package_id, name.rsplit("/", 1)[-1], size
    return None


@pytest.mark.parametrize(("path", "index"), _restartable())
def test_a_power_cut_mid_download_changes_only_what_a_restart_changes(
    cmg_harness: object, tmp_path: Path, path: Path, index: int
) -> None:
    scenario = load_scenarios(path)[index]
    target = _first_cloud_file(scenario)
    if target is None:
        pytest.skip("the sequence downloads nothing from the cloud DP")
    if scenario.timeline:
        # Its faults are scripted for requests and times of a run with no restart (the flipped
        # byte of storage request #1, a wrong hash on manifest #1, a stop at 2 s of a throttled
        # download): the next boot's fresh requests are other requests, as in the product.
        pytest.skip("its timeline addresses requests and times that a restart renumbers")
    default = CmgSettings().egress_threshold_gb
    if scenario.cmg.egress_threshold_gb != default or scenario.expect.egress_bytes is not None:
        # The CMG counts egress per manifest it issues or per byte storage serves: the next
        # boot's fresh manifest and refetched bytes count, as they do in the product.
        pytest.skip("its expectations count egress, which the restart adds to")
    package_id, file, size = target
    cut = RestartMidDownload(
        where=f"faults[{len(scenario.timeline)}]",
        file=file,
        after_bytes=size // 2,
        optional=True,
    )
    restarted = dataclasses.replace(scenario, timeline=(*scenario.timeline, cut), restart_takes=0.0)
    run = run_scenario(restarted, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    failures = [
        str(f)
        for f in check_expectations(scenario, run)
        if not f.expectation.startswith(MID_DOWNLOAD_CHANGES)
    ]
    assert failures == [], f"power cut after {size // 2} of {package_id}/{file}:\n" + "\n".join(
        failures
    )
    stayed = run_scenario(scenario, cmg_harness, tmp_path / "stayed")  # type: ignore[arg-type]
    assert _end_of(run) == _end_of(stayed), f"power cut after {size // 2} of {package_id}/{file}"
