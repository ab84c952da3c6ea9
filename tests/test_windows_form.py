"""The Windows form in a scenario run: variables and log lines read C:\\..., never a host path."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pytest_cmg._client.log import SmstsLog
from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.runner import run_scenario

SCENARIO = (
    Path(__file__).parent.parent
    / "scenarios"
    / "content"
    / "download-package-content-to-a-custom-path.cmg.yaml"
)


def test_variables_and_cache_read_as_on_a_windows_client(
    cmg_harness: object, tmp_path: Path
) -> None:
    scenario = load_scenario(SCENARIO)
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    lines = [f"{c}: {m}" for c, m, _, _ in SmstsLog.read(run.workdir / "smsts.log")]
    assert "TSManager: Set a global environment variable _SMSTSMDataPath=C:\\_SMSTaskSequence" in (
        lines
    )
    assert (
        "TSManager: Set a global environment variable DRIVERS01=C:\\Drivers\\HP\\PS100013" in lines
    )
    # C:\Windows\ccmcache is <work>/Windows/ccmcache on disk; C:\Drivers\HP is <work>/Drivers/HP.
    assert run.cache.root == run.workdir / "Windows" / "ccmcache"
    assert (run.workdir / "Drivers" / "HP" / "PS100013").is_dir()
    assert not any(str(run.workdir) in line for line in lines)

    # The always-on rule: a host path in a line fails the run, naming the line.
    leaked = f"TSManager: using content PS100013.1 at {run.workdir / 'Drivers' / 'HP'}"
    failures = check_expectations(scenario, replace(run, smsts=[*run.smsts, leaked]))
    assert [f.expectation for f in failures] == ["no machine path in smsts.log"]
    assert leaked in str(failures[0])
