"""The scenario runner: virtual time, the timeline, storage accounting, and names through Azurite.

The pure parts run without services; the last tests run scenarios on the session's harness
(real Azurite and the HTTPS fake CMG).
"""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import unquote

from pytest_cmg._client.engine import StepEvent
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._gateway.faults import GatewayFault
from pytest_cmg._net.faults import delay, faults_from, reset_after
from pytest_cmg._scenario.content import generate_package
from pytest_cmg._scenario.expectations import (
    check_expectations,
    closest_lines,
    storage_bytes_by_package,
)
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.model import ClockJump, GatewayFaultEntry, ServiceEvent, StorageFaultEntry
from pytest_cmg._scenario.runner import run_scenario
from pytest_cmg._scenario.timeline import Timeline
from pytest_cmg._scenario.world import build_world
from pytest_cmg.faults import ProxiedRequest

if TYPE_CHECKING:
    from pathlib import Path

START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# the timeline on the engine's step hook (virtual time itself: tests/test_virtual_time.py)
# --------------------------------------------------------------------------------------------


def test_the_timeline_hears_the_start_of_each_step_not_its_end() -> None:
    timeline = Timeline((), None, None, VirtualTime(START))  # type: ignore[arg-type]
    started: list[int] = []
    timeline.before_step = started.append  # type: ignore[method-assign]
    timeline.on_step(StepEvent(0, "A", "start"))
    timeline.on_step(StepEvent(0, "A", "end", "succeeded"))
    timeline.on_step(StepEvent(1, "B", "start"))
    timeline.on_step(StepEvent(1, "B", "end", "skipped"))
    timeline.on_step(StepEvent(2, "C", "start"))
    timeline.on_step(StepEvent(2, "C", "end", "failed", 0x80091007))
    assert started == [0, 1, 2]


class _Gateway:
    """Records what the timeline asks of the gateway."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def fail(self, endpoint: str | None = None, **fault: object) -> None:
        self.calls.append(("fail", endpoint, fault))

    def stop_service(self, reason: str = "") -> None:
        self.calls.append(("stop", reason))

    def start_service(self) -> None:
        self.calls.append(("start",))


class _Proxy:
    def __init__(self) -> None:
        self.added: list[tuple[str, int | None, int]] = []
        self.paths: list[str | None] = []

    def add(
        self, fault: object, *, request: int | None = None, times: int = 1, path: str | None = None
    ) -> None:
        self.added.append((fault.name, request, times))  # type: ignore[attr-defined]
        self.paths.append(path)


def test_the_timeline_fires_each_event_at_its_moment() -> None:
    events = (
        GatewayFaultEntry(where="faults[0]", fault=GatewayFault("manifest", request=1, status=503, retry_after="5")),
        StorageFaultEntry(where="faults[1]", request=2, times=3, file="install.wim", faults=(delay(2.0), reset_after(1000))),
        ServiceEvent(where="faults[2]", service="stop", before_step=1),
        ClockJump(where="faults[3]", seconds=3600.0, at=30.0),
        ServiceEvent(where="faults[4]", service="start", at=7200.0),
    )
    gateway, proxy, time = _Gateway(), _Proxy(), VirtualTime(START)
    timeline = Timeline(events, gateway, proxy, time)  # type: ignore[arg-type]
    timeline.start()
    assert gateway.calls == [
        ("fail", "manifest", {f.name: getattr(events[0].fault, f.name) for f in fields(GatewayFault) if f.name != "endpoint"})
    ]
    # Each proxy fault names the entry that scripted it: how an entry that never fired is found.
    assert proxy.added == [("delay(2)@faults[1]", 2, 3), ("reset_after(1000)@faults[1]", 2, 3)]
    assert proxy.paths == ["install.wim", "install.wim"]  # both target the file the entry names
    timeline.before_step(0)
    assert len(gateway.calls) == 1
    timeline.before_step(1)
    timeline.before_step(1)  # a step is entered once per event
    assert gateway.calls[1:] == [("stop", "stopped by the scenario (faults[2])")]
    time.sleep(31)  # reaches 30 s: the clock jumps an hour, to 3631 s
    assert time.clock() == 3631
    assert [e.where for e in timeline.unfired()] == ["faults[4]"]
    report = timeline.report()
    assert report[-1] == "   never  faults[4]: service start (at 2h)"
    assert report[3].strip().startswith("31.0s  faults[3]: clock +1h (at 30s)")


def test_storage_entries_become_proxy_faults() -> None:
    names = [f.name for f in faults_from({"respond": 503, "retry_after": "3", "error_code": "ServerBusy", "stall_after": 10, "stall_for": 400.0, "throttle": 1024, "flip_byte": 7, "close_after": 99, "ignore_range": True, "close_before_headers": False})]
    # In the vocabulary's order; a flag given false asks for nothing.
    assert names == ["close_after(99)", "stall_after(10, 400)", "throttle(1024)", "flip_byte(7)", "respond(503)", "ignore_range()"]
    (respond,) = list(faults_from({"respond": 503, "error_code": "ServerBusy"}))
    assert dict(respond.headers)["x-ms-error-code"] == "ServerBusy"
    assert b"<Code>ServerBusy</Code>" in respond.body


# --------------------------------------------------------------------------------------------
# expectations' helpers
# --------------------------------------------------------------------------------------------


def _request(number: int, path: str, status: int, body: int) -> ProxiedRequest:
    return ProxiedRequest(number, 1, "GET", path, None, (), True, status, body, "complete")


def test_storage_bytes_count_content_answers_per_package() -> None:
    log = [
        _request(1, "/devstoreaccount1/cmg-1-1/PS100012.3/sources/install.wim", 403, 342),
        _request(2, "/devstoreaccount1/cmg-1-1/PS100012.3/sources/install.wim", 200, 1000),
        _request(3, "/devstoreaccount1/cmg-1-1/PS100012.3/sources/install.wim", 206, 24),
        _request(4, "/devstoreaccount1/cmg-1-1/PS100013.1/%E5%8B%95.sys", 200, 7),
        _request(5, "/devstoreaccount1/cmg-1-1", 200, 5),
    ]
    assert storage_bytes_by_package(log) == {"PS100012": 1024, "PS100013": 7}


def test_closest_lines_explain_a_regex_that_did_not_match() -> None:
    lines = [
        "TSManager: Resolving local content for PS100012:3",
        "CAS: Hash verification succeeded for content PS100012.3 downloaded under context System",
        "CAS: Hash verification succeeded for content PS100013.1 downloaded under context System",
        "TSManager: Task sequence completed 0x00000000",
    ]
    close = closest_lines(r"Hash verification succeeded for content PS100012\.4", lines, limit=2)
    assert close == lines[1:3]
    assert closest_lines("zzzz qqqq", lines) == []


# --------------------------------------------------------------------------------------------
# on the harness: names through Azurite, the gateway's clock, failures rendered
# --------------------------------------------------------------------------------------------

NAMES = """\
scenario: names in Italian and Japanese
seed: 81
packages:
  - {id: PS100050, type: package, files: 6, size: 96KiB, locale: it_IT}
  - {id: PS100051, type: driver, files: 6, size: 96KiB, locale: ja_JP}
task_sequence:
  id: PS100020
  name: Language packs
  steps:
    - {name: Italian, action: run_command_line, package: PS100050}
    - {name: Japanese, action: apply_driver_package, package: PS100051}
faults:
  - clock: 1h
    before_step: Japanese
expect:
  outcome: success
  cache: [PS100050.1, PS100051.1]
  storage_bytes: {PS100050: 96KiB, PS100051: 96KiB}
  absent_log: ["sig="]
  elapsed: 1h
"""


def test_italian_and_japanese_names_survive_blob_names_sas_urls_and_manifests(
    cmg_harness: object, tmp_path: Path
) -> None:
    path = tmp_path / "names.cmg.yaml"
    path.write_text(NAMES, encoding="utf-8")
    scenario = load_scenario(path)
    generated = {p.id: [f.relpath for f in generate_package(p, scenario.seed)] for p in scenario.packages}
    assert any(not name.isascii() for name in generated["PS100050"])  # an accented Italian word
    assert all(not name.split("/")[0].isascii() for name in generated["PS100051"])

    # Blob names, as Azurite lists them.
    world = build_world(scenario, cmg_harness)  # type: ignore[arg-type]
    try:
        listed = sorted(b.name for b in world.dp._container.list_blobs())
    finally:
        world.dp.delete()
    expected_blobs = sorted(
        [f"{pid}.1/{name}" for pid, names in generated.items() for name in names]
        + [f"{pid}.1.manifest.xml" for pid in generated]
    )
    assert listed == expected_blobs

    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    # Manifests as the gateway served them, SAS URL paths as storage was asked, cache files.
    for pid, names in generated.items():
        assert [f.relpath for f in run.manifests[pid].files] == names
        entry = next(e for e in run.cache.entries() if e.package_id == pid)
        on_disk = sorted(str(p.relative_to(entry.path)) for p in entry.path.rglob("*") if p.is_file())
        assert on_disk == sorted(names)
    assert run.storage is not None
    asked = sorted(unquote(r.path.split("/", 3)[3]) for r in run.storage)
    assert asked == sorted(f"{pid}.1/{name}" for pid, names in generated.items() for name in names)
    assert run.elapsed == 3600.0
    assert run.timeline[0].strip().startswith("0.0s  faults[0]: clock +1h (before step 1)")


def test_the_session_gateway_gets_its_clock_back(cmg_harness: object, tmp_path: Path) -> None:
    path = tmp_path / "clock.cmg.yaml"
    path.write_text(NAMES.replace("clock: 1h", "clock: 91d"), encoding="utf-8")
    scenario = load_scenario(path)
    gateway = cmg_harness.gateway  # type: ignore[attr-defined]
    before = gateway.authority.clock
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert gateway.authority.clock is before
    # 91 days on, the client's 90-day site token is refused: the second location fails.
    assert not run.result.succeeded
    assert any("IDX10223" in r.detail for r in run.requests)
    failures = {f.expectation: f for f in check_expectations(scenario, run)}
    assert set(failures) == {"expect.outcome", "expect.cache", "expect.storage_bytes.PS100051", "expect.elapsed"}
    elapsed = failures["expect.elapsed"]
    assert elapsed.line == NAMES.splitlines().index("  elapsed: 1h") + 1
    assert "  expected: exactly 1h of virtual time" in elapsed.detail
    assert "  actual:   91d" in elapsed.detail
    assert "faults[0]: clock +91d (before step 1)" in elapsed.detail
    storage = failures["expect.storage_bytes.PS100051"].detail
    assert "actual:   0 bytes" in storage
