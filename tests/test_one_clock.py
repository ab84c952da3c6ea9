"""One clock: smsts.log and the gateway's service log carry the scenario's virtual time.

The task sequence's retry delay (SMSTSDownloadRetryDelay, 15 s) costs no wall time in a
scenario; it must still read as 15 s between two log lines, in both logs.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

from pytest_cmg._client.log import SmstsLog
from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.runner import run_scenario

SCENARIO = (
    Path(__file__).parent.parent
    / "scenarios"
    / "faults"
    / "manifest-503-retried-by-the-task-sequence.cmg.yaml"
)
RETRY = "Content download for PS100012:3 failed (0x87D0027E); retry 1 of 2 in 15 seconds"


def _gateway_time(line: str) -> datetime:
    # "2026-11-22 23:59:50.250 CMGService: ..."
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f")


def test_a_15_s_retry_delay_reads_as_15_s_in_both_logs(cmg_harness: object, tmp_path: Path) -> None:
    scenario = load_scenario(SCENARIO)
    began = datetime.now().astimezone()
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    assert run.elapsed == 15

    entries = SmstsLog.read(run.workdir / "smsts.log")
    at = next(i for i, (_, message, _, _) in enumerate(entries) if message == RETRY)
    waited = entries[at + 1][3] - entries[at][3]
    assert abs(waited - timedelta(seconds=15)) < timedelta(milliseconds=2), entries[at + 1]
    # The whole log spans the virtual 15 s, however long the run took on the wall clock.
    span = entries[-1][3] - entries[0][3]
    assert timedelta(seconds=15) <= span < timedelta(seconds=16)
    assert entries[0][3] >= began - timedelta(seconds=1)

    refused = next(i for i, line in enumerate(run.gateway_log) if ": 503" in line)
    after = next(line for line in run.gateway_log[refused + 1 :] if "Content location for" in line)
    gap = _gateway_time(after) - _gateway_time(run.gateway_log[refused])
    assert abs(gap - timedelta(seconds=15)) < timedelta(milliseconds=2), (after, gap)
