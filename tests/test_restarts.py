"""Restarts in the middle of a task sequence (docs/emulation.md, "Restarts").

Unit tests cover the persisted state (``tsenv.py``) and the boot host; the others run the
engine, in-process and as boot processes, against real Azurite and the running fake CMG. The
scenarios in ``scenarios/ipu/`` tell the stories end to end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client import tsenv
from pytest_cmg._client.boot import BootError, BootHost, BootSpec
from pytest_cmg._client.engine import CMGConnection, Setup
from pytest_cmg._client.tsenv import TSENV_FILE, SetupState, TsEnv, TsEnvError
from pytest_cmg._scenario import runner
from pytest_cmg._scenario.expectations import check_expectations
from pytest_cmg._scenario.load import load_scenarios
from pytest_cmg._scenario.runner import run_scenario

ROOT = Path(__file__).resolve().parent.parent
KB = 1000


def data(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def state(**changes: object) -> TsEnv:
    sequence = TaskSequence("PS100020", "Upgrade", (Step("Restart", "restart_computer"),))
    base = TsEnv(sequence=sequence.to_dict(), launch="software_center", next_step=1, variables={})
    for name, value in changes.items():
        setattr(base, name, value)
    return base


# --- unit: the persisted state -----------------------------------------------------------------


def test_the_state_round_trips_with_the_sequence_and_setup(tmp_path: Path) -> None:
    sequence = TaskSequence(
        "PS100020",
        "Upgrade",
        (
            Step("Upgrade", "upgrade_os", "PS100012", setup=Setup(2, "rollback", 0xC1900101)),
            Step("Restart", "restart_computer"),
        ),
        package_versions={"PS100012": 3},
    )
    saved = state(
        sequence=sequence.to_dict(),
        variables={"OSDLanguage": "it-IT"},
        setup=SetupState(0, 1, "rollback", 0xC1900101),
        reboots=2,
    )
    tsenv.save(tmp_path, saved)
    loaded = tsenv.load(tmp_path)
    assert loaded == saved
    assert TaskSequence.from_dict(loaded.sequence) == sequence
    # Written by rename: no temporary file is left beside it.
    assert [p.name for p in tmp_path.iterdir()] == [TSENV_FILE]
    tsenv.remove(tmp_path)
    assert tsenv.load(tmp_path) is None


def test_the_state_never_holds_a_signature(tmp_path: Path) -> None:
    sas = "https://127.0.0.1:1/c/PS100012.3/install.wim?sv=2021&sig=abc%3D"
    with pytest.raises(TsEnvError, match="signature") as caught:
        tsenv.save(tmp_path, state(variables={"_SMSTSLastContentDownloadLocation": sas}))
    assert TSENV_FILE in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_a_state_the_engine_did_not_write_is_refused_with_its_path(tmp_path: Path) -> None:
    (tmp_path / TSENV_FILE).write_text('{"format": 99}', encoding="utf-8")
    with pytest.raises(TsEnvError, match="delete the file to start the sequence over"):
        tsenv.load(tmp_path)


def test_a_boot_that_fails_is_reported_with_its_traceback(tmp_path: Path) -> None:
    connection = CMGConnection(
        cmg_url="https://127.0.0.1:9",
        ca_cert=tmp_path / "ca.pem",
        site_code="PS1",
        mp_role_id="1",
        client_id="GUID:boot",
        token="t",
    )
    spec = BootSpec(connection, tmp_path, None, "software_center", 10)  # type: ignore[arg-type]
    host = BootHost(clock=lambda: 0.0, sleep=lambda s: None, pass_time=lambda s: None, timeout=120)
    with pytest.raises(BootError, match=r"boot 1 of the client .* failed:\n(.|\n)*AttributeError"):
        host.run(spec)
    assert len(host.pids) == 1 and host.pids[0] != os.getpid()


# --- the engine, in-process: a restart is a result, not an exception ------------------------------


@pytest.fixture
def os_package(cloud_dp):
    return cloud_dp.distribute(
        "PS100012", 1, {"sources/install.wim": data(300 * KB, 1), "setup.exe": b"MZ" * 50}
    )


def test_a_restart_step_persists_and_a_new_engine_resumes(cmg, cmg_client, os_package) -> None:
    sequence = TaskSequence(
        "PS100020",
        "Upgrade",
        (
            Step("Restart first", "restart_computer"),
            Step("Upgrade", "upgrade_os", "PS100012"),
        ),
        variables={"OSDLanguage": "it-IT"},
    )
    first = cmg_client()
    result = first.run(sequence)
    assert (result.restart, result.steps_run, result.exit_code) == (
        "restart_computer",
        ["Restart first"],
        0,
    )
    working = first.system_drive / "_SMSTaskSequence"
    saved = tsenv.load(working)
    assert saved is not None and saved.next_step == 1
    assert saved.variables["OSDLanguage"] == "it-IT"

    second = cmg_client()  # same folder, nothing shared in memory
    assert second.system_drive == first.system_drive
    resumed = second.resume()
    assert resumed is not None
    assert (resumed.restart, resumed.exit_code, resumed.reboots) == (None, 0, 1)
    assert resumed.steps_run == ["Restart first", "Upgrade"]
    assert second.variables["OSDLanguage"] == "it-IT"
    assert not (working / TSENV_FILE).exists()
    assert cmg_client().resume() is None


# --- boot processes ---------------------------------------------------------------------------------


def test_every_boot_is_a_process_and_no_signature_reaches_the_working_directory(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Looked at every step boundary of every boot: the boot saved its state just before."""
    scenario = load_scenarios(ROOT / "scenarios/ipu/full-upgrade-with-setup-restarts.cmg.yaml")[0]
    assert scenario.auth == "azure_ad"
    work = tmp_path / "work"
    seen: list[str] = []
    states: list[TsEnv] = []
    hosts: list[BootHost] = []
    before_step = runner.Timeline.before_step

    def look(self: runner.Timeline, index: int) -> None:
        for path in (work / "_SMSTaskSequence").rglob("*"):
            if path.is_file() and "Packages" not in path.parts:
                seen.append(path.name)
                assert "sig=" not in path.read_text(encoding="utf-8", errors="replace"), path
        loaded = tsenv.load(work / "_SMSTaskSequence")
        assert loaded is not None
        states.append(loaded)
        before_step(self, index)

    real_host = runner.BootHost

    def host(**kwargs: object) -> BootHost:
        made = real_host(**kwargs)  # type: ignore[arg-type]
        hosts.append(made)
        return made

    monkeypatch.setattr(runner.Timeline, "before_step", look)
    monkeypatch.setattr(runner, "BootHost", host)
    run = run_scenario(scenario, cmg_harness, work)  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    assert TSENV_FILE in seen
    assert states
    # The Azure AD client's CCM token is kept by the client, as the product caches it, beside the
    # task sequence's state, not in it: a JWT, not a SAS.
    kept = tsenv.load_ccm_token(work)
    assert kept is not None and kept.count(".") == 2 and "sig=" not in kept
    (used,) = hosts
    assert len(used.pids) == 3 == len(set(used.pids))
    assert os.getpid() not in used.pids
    assert used.boots == ["boot 1: setup", "boot 2: setup", "boot 3: ended"]
    assert run.result.reboots == 2


def _parent_of_a_sleeper(pid_file: str) -> None:
    import subprocess as sp
    import time as wall

    child = sp.Popen(["sleep", "60"], start_new_session=True)  # as a provider's own group
    Path(pid_file).write_text(str(child.pid))
    wall.sleep(60)


def test_a_power_cut_also_stops_what_the_boot_started(tmp_path: Path) -> None:
    import multiprocessing
    import time as wall

    pid_file = tmp_path / "child.pid"
    process = multiprocessing.get_context("spawn").Process(
        target=_parent_of_a_sleeper, args=(str(pid_file),), daemon=True
    )
    process.start()
    deadline = wall.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert wall.monotonic() < deadline, "the boot never started its program"
        wall.sleep(0.05)
    child = int(pid_file.read_text())
    host = BootHost(clock=lambda: 0.0, sleep=lambda s: None, pass_time=lambda s: None)
    host._process = process
    host.power_cut()
    assert not process.is_alive() and host.power_cuts == 1
    deadline = wall.monotonic() + 10
    while Path(f"/proc/{child}").exists():
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        if state == "Z":
            break  # killed, waiting for a parent that is gone to reap it
        assert wall.monotonic() < deadline, f"the program {child} outlived the power cut"
        wall.sleep(0.05)


@pytest.mark.parametrize("step", [0, 1, 2])
def test_a_power_cut_at_any_step_boundary_gives_the_run_of_a_machine_that_stayed_up(
    cmg_harness: object, tmp_path: Path, step: int
) -> None:
    """The in-place upgrade story's own expectations (cache, downloads, requests, log) hold when
    the power is cut before any of its steps; only time and the resume lines differ."""
    import dataclasses

    from pytest_cmg._scenario.model import Restart

    path = ROOT / "scenarios/ipu/on-demand-token-software-center.cmg.yaml"
    (scenario,) = load_scenarios(path)
    cut = Restart(where="faults[0]", before_step=step)
    restarted = dataclasses.replace(scenario, timeline=(cut,))
    assert restarted.restarts and not scenario.restarts
    run = run_scenario(restarted, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    assert run.result.reboots == 1
    assert run.result.steps_run == [s.name for s in scenario.task_sequence.steps]
    assert run.elapsed == 120.0
    resumed = [m for m in run.smsts if "after an unexpected restart (power cut)" in m]
    assert resumed == [
        f"TSManager: Resuming task sequence Windows 11 in-place upgrade (PS100020) after an "
        f"unexpected restart (power cut): restart 1, instruction pointer {step}"
    ]


RESTARTING = """\
scenario: restarts the language refuses
include: [worlds/small-ipu-world]
{extra}
task_sequence:
  steps:
    - {{name: Check readiness, action: run_command_line}}
    - {{name: Restart, action: restart_computer{step}}}
    - {{name: Apply drivers, action: apply_driver_package, package: PS100013}}
expect:
  outcome: success
"""


@pytest.mark.parametrize(
    ("extra", "step", "line", "rule"),
    [
        ("faults: [{restart: {file: install.wim}}]", "", 3, "names the file and the bytes"),
        ("faults: [{restart: {}}]", "", 3, "a restart needs a moment"),
        (
            "faults: [{restart: {file: install.wmi, after_bytes: 1KiB}}]",
            "",
            3,
            "restart file 'install.wmi' names no blob",
        ),
        (
            # small-ipu-world's PS100012 is 1 MiB, most of it install.wim: no cut at 1 MiB.
            "faults: [{restart: {file: install.wim, after_bytes: 1MiB}}]",
            "",
            3,
            "the download ends before the cut",
        ),
        ("", ", package: PS100012", 7, "a restart_computer step uses no package"),
        ("", ", setup: {restarts: 1}", 7, "setup belongs to upgrade_os steps"),
        ("benchmark: {baseline: hashlib}", "", 7, "this step restarts the computer"),
        (
            "benchmark: {baseline: hashlib}\nfaults: [{restart: {}, before_step: Restart}]",
            "",
            4,
            "a restart runs each boot as a process of its own",
        ),
    ],
)
def test_the_language_refuses_restarts_it_cannot_run(
    tmp_path: Path, extra: str, step: str, line: int, rule: str
) -> None:
    from pytest_cmg._errors import ScenarioError

    path = tmp_path / "restarts.cmg.yaml"
    path.write_text(RESTARTING.format(extra=extra, step=step), encoding="utf-8")
    with pytest.raises(ScenarioError) as caught:
        load_scenarios(path, fixtures=ROOT / "pytest_cmg" / "shipped")
    text = str(caught.value)
    assert rule in text
    assert f"restarts.cmg.yaml:{line}:" in text


def test_download_all_content_is_not_fetched_again_after_a_restart(
    cmg, cmg_client, os_package
) -> None:
    from pytest_cmg import DeploymentSettings, DownloadMode

    deployment = DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START)
    sequence = TaskSequence(
        "PS100020",
        "Upgrade",
        (Step("Restart first", "restart_computer"), Step("Upgrade", "upgrade_os", "PS100012")),
    )
    first = cmg_client(deployment=deployment)
    assert first.run(sequence).restart == "restart_computer"
    asked = len(cmg.log.entries)
    resumed = cmg_client(deployment=deployment).resume()
    assert resumed is not None and resumed.succeeded
    # Downloaded before the first step, in the first boot; the second found it in the cache.
    assert len(cmg.log.entries) == asked
    assert [(t.package_id, t.from_cache) for t in resumed.transfers] == [
        ("PS100012", False),
        ("PS100012", True),
    ]


def test_a_log_line_torn_by_a_power_cut_is_dropped(tmp_path: Path) -> None:
    from pytest_cmg._client.boot import _drop_torn_tail
    from pytest_cmg._client.log import SmstsLog

    log = tmp_path / "smsts.log"
    SmstsLog(log).info("TSManager", "whole")
    whole = log.read_bytes()
    log.write_bytes(whole + b'<![LOG[half a line]LOG]!><time="05:4')
    _drop_torn_tail(log)
    assert log.read_bytes() == whole
    assert [m for _, m, _, _ in SmstsLog.read(log)] == ["whole"]
    _drop_torn_tail(log)  # a whole log is left as it is
    assert log.read_bytes() == whole


# --- a power cut in the middle of a download ----------------------------------------------------

POWER_CUT = ROOT / "scenarios/ipu/power-cut-mid-download-resumes-from-the-journal.cmg.yaml"


def test_a_mid_download_cut_is_armed_where_the_download_core_hashes() -> None:
    # The core hashes (and journals) a body only where a receive buffer ends: the stalls a cut
    # is armed as must fall there, or no journal could ever equal what storage sent.
    from pytest_cmg._client._window import CHUNK
    from pytest_cmg._scenario.timeline import CUT_CHANCES, CUT_STEP, cut_offsets

    assert CUT_STEP == CHUNK
    mib = 1 << 20
    assert cut_offsets(2 * mib) == [2 * mib, 3 * mib, 4 * mib][:CUT_CHANCES]
    # An offset inside a buffer still marks when the entry fired; the cut falls after it.
    assert cut_offsets(2 * mib + 1) == [2 * mib + 1, 3 * mib, 4 * mib, 5 * mib][: CUT_CHANCES + 1]


def test_without_a_journal_the_boot_after_a_mid_download_cut_fetches_the_file_again(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The negative twin of the power-cut scenario: with the download core's journal off, the
    cut lands at the last armed stall and the next boot starts the file over, so storage serves
    more than its size, and the scenario's own expectations say so."""
    from pytest_cmg._scenario.expectations import storage_bytes_by_package
    from pytest_cmg._scenario.timeline import cut_offsets

    resumed = next(s for s in load_scenarios(POWER_CUT) if s.case_id == "resumed")
    monkeypatch.setattr(runner, "RESTART_JOURNAL_BYTES", 0)
    monkeypatch.setattr(runner, "_JOURNAL_WAIT", 0.2)  # no journal will come: do not wait long
    run = run_scenario(resumed, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert run.result.succeeded and run.result.reboots == 1
    cut_at = cut_offsets(2 << 20)[-1]
    assert storage_bytes_by_package(run.storage or [])["PS100012"] == cut_at + (8 << 20)
    assert not any("from an earlier run's journal" in m for m in run.smsts)
    failed = sorted(f.expectation for f in check_expectations(resumed, run))
    assert failed == ["expect.log[1]", "expect.storage_bytes.PS100012"]


# --- the engine's step hook (StepEvent) -----------------------------------------------------------


def _starts_and_ends(events: list[object]) -> list[tuple[object, ...]]:
    from pytest_cmg import StepEvent

    assert all(isinstance(e, StepEvent) for e in events)
    return [(e.index, e.name, e.phase, e.outcome, e.exit_code) for e in events]  # type: ignore[attr-defined]


def _hook_sequence(*rest: Step) -> TaskSequence:
    """The step hook tests' sequence: its first boot runs a step, skips one (its condition is
    false) and restarts; ``rest`` follows."""
    from pytest_cmg import Condition

    french = Condition("OSDLanguage", "equals", "fr-FR")
    first = (
        Step("Check readiness", "run_command_line"),
        Step("French only", "run_command_line", conditions=(french,)),
        Step("Restart", "restart_computer"),
    )
    return TaskSequence(
        "PS100020",
        "Upgrade",
        (*first, *rest),
        variables={"OSDLanguage": "it-IT"},
        package_versions={"PS100012": 1},
    )


#: What the hook hears in the first boot of :func:`_hook_sequence`.
FIRST_BOOT_EVENTS = [
    (0, "Check readiness", "start", None, 0),
    (0, "Check readiness", "end", "succeeded", 0),
    (1, "French only", "start", None, 0),
    (1, "French only", "end", "skipped", 0),
    (2, "Restart", "start", None, 0),
    (2, "Restart", "end", "succeeded", 0),
]


def test_the_step_hook_hears_each_step_start_and_end_in_process(
    cmg, cmg_client, os_package
) -> None:
    """A skipped step starts (before its condition is evaluated) and ends "skipped"; a step that
    fails ends "failed" with its code; a Restart Computer step ends before the restart."""
    events: list[object] = []
    sequence = _hook_sequence(
        Step("Upgrade", "upgrade_os", "PS100012"),
        Step("Drivers", "apply_driver_package", "PS100099"),
        Step("Never", "run_command_line"),
    )
    assert cmg_client(on_step=events.append).run(sequence).restart == "restart_computer"
    assert _starts_and_ends(events) == FIRST_BOOT_EVENTS
    events.clear()
    resumed = cmg_client(on_step=events.append).resume()
    assert resumed is not None and resumed.exit_code == 0x80040102  # PS100099 is nowhere
    assert _starts_and_ends(events) == [
        (3, "Upgrade", "start", None, 0),
        (3, "Upgrade", "end", "succeeded", 0),
        (4, "Drivers", "start", None, 0),
        (4, "Drivers", "end", "failed", 0x80040102),
    ]


def test_the_step_hook_hears_every_boot_in_the_parent_in_order(
    cmg, cloud_dp, os_package, tmp_path: Path
) -> None:
    """Each boot process sends its step events to the parent's hook; Setup's step ends in the
    boot where Setup hands the machine back, and a boot that only restarts hears nothing."""
    from pytest_cmg import VirtualTime
    from pytest_cmg._client.factory import connection_for

    endpoint = cloud_dp.endpoint
    storage_ca = endpoint.ca_cert if endpoint.url.startswith("https:") else None
    sequence = _hook_sequence(
        Step("Upgrade", "upgrade_os", "PS100012", setup=Setup(2, "success", 0)),
        Step("After", "run_command_line"),
    )
    time = VirtualTime()
    events: list[object] = []
    boots: list[int] = []

    def hear(event: object) -> None:
        events.append(event)
        boots.append(len(host.pids))

    host = BootHost(
        clock=time.clock, sleep=time.sleep, pass_time=time.pass_time, on_step=hear, timeout=300
    )
    spec = BootSpec(
        connection_for(cmg, "GUID:hook"),
        tmp_path / "client",
        sequence,
        "software_center",
        100,
        storage_ca_file=storage_ca,
    )
    result = host.run(spec)
    assert (result.exit_code, result.reboots) == (0, 3)
    assert host.boots == [
        "boot 1: restart_computer",
        "boot 2: setup",
        "boot 3: setup",
        "boot 4: ended",
    ]
    assert _starts_and_ends(events) == [
        *FIRST_BOOT_EVENTS,
        (3, "Upgrade", "start", None, 0),
        (3, "Upgrade", "end", "succeeded", 0),
        (4, "After", "start", None, 0),
        (4, "After", "end", "succeeded", 0),
    ]
    assert boots == [1, 1, 1, 1, 1, 1, 2, 4, 4, 4]


# --- Restart Computer's restart_to: Windows PE or the installed OS (engineer B) --------------------


def test_a_restart_out_of_windows_pe_goes_on_in_the_full_os_and_back(
    cmg, cmg_client, os_package
) -> None:
    sequence = TaskSequence(
        "PS100020",
        "Deploy",
        (
            Step("Apply the OS", "upgrade_os", "PS100012"),
            Step("Restart", "restart_computer"),
            Step("Check in the full OS", "run_command_line", "PS100012"),
            Step("Back to Windows PE", "restart_computer", restart_to="winpe"),
            Step("Check in Windows PE", "run_command_line", "PS100012"),
        ),
        boot_image=True,
    )
    first = cmg_client()
    assert first.run(sequence, launch="boot_media").restart == "restart_computer"
    assert first.variables["_SMSTSInWinPE"] == "TRUE"
    assert first.variables["_SMSTSLaunchMode"] == "UFD+FORMAT"
    working = first.system_drive / "_SMSTaskSequence"
    # The next boot's place is persisted: the default restarts to the installed OS.
    saved = tsenv.load(working)
    assert saved is not None and saved.in_windows_pe is False and saved.launch == "boot_media"

    second = cmg_client()
    assert second.resume().restart == "restart_computer"
    assert second.variables["_SMSTSInWinPE"] == "FALSE"
    assert second.variables["_SMSTSMDataPath"] == "C:\\_SMSTaskSequence"
    assert second.variables["_SMSTSLaunchMode"] == "UFD+FORMAT"  # how it started, still
    # In the full OS the content went to the client cache, which Windows PE does not have.
    assert [e.key for e in second.cache.entries()] == ["PS100012.1"]
    assert second.variables["_SMSTSLastContentDownloadLocation"] == (
        "C:\\Windows\\ccmcache\\PS100012.1"
    )
    saved = tsenv.load(working)
    assert saved is not None and saved.in_windows_pe is True

    third = cmg_client()
    resumed = third.resume()
    assert resumed is not None and resumed.succeeded, resumed.error
    assert third.variables["_SMSTSInWinPE"] == "TRUE"
    # Back in Windows PE: the client cache is not looked at; the package comes over the CMG
    # into the task sequence working directory.
    assert third.variables["_SMSTSLastContentDownloadLocation"] == (
        "C:\\_SMSTaskSequence\\Packages\\PS100012"
    )
    assert resumed.reboots == 2
    assert cmg.log.count("location") == 3


def test_a_restart_to_the_installed_os_before_one_was_applied_fails_the_step(
    cmg, cmg_client, os_package
) -> None:
    sequence = TaskSequence(
        "PS100020",
        "Deploy",
        (Step("Partition", "run_command_line"), Step("Restart", "restart_computer")),
        boot_image=True,
    )
    engine = cmg_client()
    result = engine.run(sequence, launch="boot_media")
    assert (result.restart, result.exit_code, result.failed_step) == (None, 0x80004005, "Restart")
    assert result.steps_run == ["Partition"] and result.reboots == 0
    assert tsenv.load(engine.system_drive / "_SMSTaskSequence") is None
    # From Software Center there is an installed OS: the same restart is a restart.
    assert cmg_client().run(sequence).restart == "restart_computer"


def test_restart_to_winpe_needs_a_boot_image_and_a_restart_step() -> None:
    with pytest.raises(ValueError, match="restart_to belongs to restart_computer steps"):
        Step("Check", "run_command_line", restart_to="os")
    with pytest.raises(ValueError, match="restart_to must be one of winpe, os"):
        Step("Restart", "restart_computer", restart_to="bios")
    with pytest.raises(ValueError, match="has none: set boot_image=True"):
        TaskSequence("PS100020", "Upgrade", (Step("R", "restart_computer", restart_to="winpe"),))


@pytest.mark.parametrize(
    ("extra", "step", "line", "rule"),
    [
        ("", ", restart_to: winpe", 7, "restart_to: winpe restarts to the boot image"),
        ("", ", restart_to: bios", 7, "restart_to"),
    ],
)
def test_the_language_checks_restart_to_at_its_line(
    tmp_path: Path, extra: str, step: str, line: int, rule: str
) -> None:
    from pytest_cmg._errors import ScenarioError

    path = tmp_path / "restarts.cmg.yaml"
    path.write_text(RESTARTING.format(extra=extra, step=step), encoding="utf-8")
    with pytest.raises(ScenarioError) as caught:
        load_scenarios(path, fixtures=ROOT / "pytest_cmg" / "shipped")
    assert rule in str(caught.value)
    assert f"restarts.cmg.yaml:{line}:" in str(caught.value)
    # On another step than restart_computer: refused at that step's line.
    other = RESTARTING.format(extra="", step="").replace(
        "action: run_command_line}", "action: run_command_line, restart_to: os}"
    )
    path.write_text(other, encoding="utf-8")
    with pytest.raises(ScenarioError) as caught:
        load_scenarios(path, fixtures=ROOT / "pytest_cmg" / "shipped")
    assert "restarts.cmg.yaml:6: restart_to belongs to restart_computer steps" in str(caught.value)
    # With a boot image, winpe is a valid choice.
    path.write_text(
        RESTARTING.format(extra="", step=", restart_to: winpe").replace(
            "task_sequence:\n", "task_sequence:\n  boot_image: true\n"
        ),
        encoding="utf-8",
    )
    [scenario] = load_scenarios(path, fixtures=ROOT / "pytest_cmg" / "shipped")
    assert scenario.task_sequence.steps[1].restart_to == "winpe"


SMALL_FILE_CUT = """\
scenario: a power cut inside a file smaller than one receive buffer
include: [worlds/small-ipu-world]
packages:
  - {id: PS100012, files: 1, size: 512KiB}
faults:
  - restart: {file: install.wim, after_bytes: 100KiB}
expect:
  outcome: success
  restarts: 1
  # The body is held at 100 KiB, inside the core's first 1 MiB buffer: nothing of it was
  # hashed, so nothing was journaled, and the next boot fetches the whole file again.
  storage_bytes: {PS100012: 612KiB}
  absent_log: ["from an earlier run's journal"]
"""


def test_a_cut_inside_a_file_smaller_than_a_buffer_happens_and_fetches_the_file_again(
    cmg_harness: object, tmp_path: Path
) -> None:
    """No stall at a buffer end falls inside a 512 KiB file: the power is cut at after_bytes
    itself, not never (the cut's offsets are clipped to the file's size)."""
    from pytest_cmg._scenario.timeline import cut_offsets

    mib = 1 << 20
    assert cut_offsets(100 * 1024, 512 * 1024) == [100 * 1024]
    assert cut_offsets(100 * 1024, 3 * mib) == [100 * 1024, mib, 2 * mib]
    path = tmp_path / "small.cmg.yaml"
    path.write_text(SMALL_FILE_CUT, encoding="utf-8")
    (scenario,) = load_scenarios(path, fixtures=ROOT / "pytest_cmg" / "shipped")
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert [str(f) for f in check_expectations(scenario, run)] == []
    assert run.boots == ["boot 1: power cut", "boot 2: ended"]


def test_a_ccm_token_got_in_the_step_a_power_cut_interrupts_is_not_asked_for_again(
    cmg_harness: object, tmp_path: Path
) -> None:
    """The client keeps its CCM token the moment CCM_STS issues it, not at the next step
    boundary: a power cut in the middle of the download of the step that got it does not make
    the next boot ask CCM_STS again (the token is still valid)."""
    from pytest_cmg._scenario.model import RestartMidDownload

    path = ROOT / "scenarios/auth/azure-ad-client-downloads-on-demand.cmg.yaml"
    (scenario,) = load_scenarios(path)
    assert scenario.auth == "azure_ad"
    cut = RestartMidDownload(where="faults[0]", file="install.wim", after_bytes=200 * 1024)
    restarted = dataclasses.replace(scenario, timeline=(cut,), restart_takes=0.0)
    run = run_scenario(restarted, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert run.result.succeeded and run.result.reboots == 1
    sts = [r for r in run.requests if r.endpoint == "sts"]
    assert len(sts) == 1, [r.summary() for r in run.requests]
    assert tsenv.load_ccm_token(tmp_path / "work") is not None
