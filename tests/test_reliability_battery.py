"""The rows of reliability.md's test battery that had no test of their own: 1, 2, 3, 6, 8, 10,
13, 14 and 17, against real Azurite through the storage fault proxy.

docs/reliability.md maps every row of the battery to the tests that cover it; these fill the
gaps it found (a fault the row names that no test injected, or an outcome the row asks for that
no test asserted). Each test injects the row's fault (F) and asserts what the row says must
hold (H), plus the battery's standing rule: no SAS signature or token in the client's log.

Time is virtual (``cmg_time`` / :class:`VirtualTime`): retry waits are recorded, never slept.
The only real waits are the sub-second socket timeouts of row 13, whose stalls must be seen by
a real read timing out.
"""

from __future__ import annotations

import random
import time
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import TYPE_CHECKING

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client import _journal
from pytest_cmg._client.download import DownloadCore
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._errors import ContentError
from pytest_cmg._protocol import codes
from pytest_cmg.faults import (
    close_after,
    flip_byte,
    ignore_range,
    reset_after,
    respond,
    stall_after,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from pytest_cmg import CloudDP, FakeCMG, TaskSequenceEngine
    from pytest_cmg._protocol.manifest import ContentManifest
    from pytest_cmg.faults import FaultProxy, ProxiedRequest

MiB = 1 << 20
RELPATH = "sources/install.wim"
#: 9 MiB: past the core's 8 MiB threshold, so the file takes the streamed (pipelined) path that
#: an OS image takes, and row 1's byte at offset 7 MiB exists.
LARGE = random.Random(401).randbytes(9 * MiB)
#: 4 MiB: the inline path (received, written and hashed on one thread).
SMALL = random.Random(402).randbytes(4 * MiB)
BUSY = {"x-ms-error-code": "ServerBusy"}


def sequence(*, retries: int | None = None, version: int = 1) -> TaskSequence:
    """One upgrade step on PS100012; ``retries`` sets SMSTSDownloadRetryCount (None: default 2)."""
    variables = {} if retries is None else {"SMSTSDownloadRetryCount": str(retries)}
    return TaskSequence(
        "PS100020",
        "IPU",
        (Step("Upgrade", "upgrade_os", "PS100012"),),
        variables=variables,
        package_versions={"PS100012": version},
    )


def wim_requests(proxy: FaultProxy) -> list[ProxiedRequest]:
    assert proxy.wait_idle(10)
    return [e for e in proxy.log if e.path.endswith("install.wim")]


def assert_no_secret(engine: TaskSequenceEngine) -> None:
    # The battery's standing rule: no SAS signature and no token in what the client wrote.
    text = engine.log.path.read_text(encoding="utf-8")
    token = engine.client.connection.token
    assert "sig=" not in text
    assert "Bearer" not in text
    assert token and token not in text


def assert_nothing_cached(engine: TaskSequenceEngine) -> None:
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []


def assert_cached(engine: TaskSequenceEngine, data: bytes) -> None:
    [entry] = engine.cache.entries()
    assert (entry.path / RELPATH).read_bytes() == data
    assert engine.cache.staging_leftovers() == []


# --- T-INT -----------------------------------------------------------------------------------


def test_row01_a_byte_flipped_at_7_mib_is_fatal_with_no_retry_storm(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 1: the proxy flips the byte at offset 7 MiB. The task sequence's own
    # retries are left at their default (2) to show a hash mismatch is not one of the things
    # they repeat: one GET, one manifest, no wait at all.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    storage_faults.add(flip_byte(7 * MiB), request=1, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence())
    assert result.exit_code == codes.HASH_MISMATCH
    assert f"{RELPATH}: SHA-256" in str(result.error)
    [request] = wim_requests(storage_faults)
    assert request.faults == (f"flip_byte({7 * MiB})",)
    assert (request.status, request.outcome, request.body_bytes) == (200, "complete", len(LARGE))
    assert cmg.log.count("manifest") == 1
    assert cmg_time.waits == []
    assert_nothing_cached(engine)
    assert "TSManager: Hash could not be matched for the downloaded content" in engine.log.messages
    assert_no_secret(engine)


def test_row02_a_sas_for_the_older_version_is_a_hash_failure(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # reliability.md 2: version 2 is the one located and described by the manifest, but the
    # CMG signs its SAS for version 1's blob (same size, other bytes), which Azurite serves.
    older = random.Random(403).randbytes(len(SMALL))
    cloud_dp.distribute("PS100012", 1, {RELPATH: older})
    cloud_dp.distribute("PS100012", 2, {RELPATH: SMALL})
    real = cloud_dp.signed_url

    def signed_for_version_1(
        package_id: str, version: int, relpath: str, *, start: datetime, expiry: datetime
    ) -> str:
        return real(package_id, 1, relpath, start=start, expiry=expiry)

    monkeypatch.setattr(cloud_dp, "signed_url", signed_for_version_1)
    engine = cmg_client()
    result = engine.run(sequence(version=2))
    assert result.exit_code == codes.HASH_MISMATCH
    [request] = wim_requests(storage_faults)
    assert "/PS100012.1/" in request.path and request.status == 200  # the old blob, served
    cmg.log.assert_request_made("manifest", count=1, package_id="PS100012")
    assert cmg_time.waits == []
    assert_nothing_cached(engine)
    assert_no_secret(engine)


def test_row03_a_blob_one_byte_short_is_refused_at_its_first_answer(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 3: the stored blob is one byte short and Azurite's headers say so
    # truthfully. The size is checked against the manifest before any byte is hashed; the
    # failure is fatal (not retried by the core or by the task sequence) and nothing is kept.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    cloud_dp._container.upload_blob(
        cloud_dp.blob_name("PS100012", 1, RELPATH), LARGE[:-1], overwrite=True
    )
    engine = cmg_client()
    result = engine.run(sequence())
    assert result.exit_code == codes.HASH_MISMATCH
    assert f"storage holds {len(LARGE) - 1} bytes, manifest says {len(LARGE)}" in str(result.error)
    [request] = wim_requests(storage_faults)
    assert request.status == 200 and request.range is None
    assert cmg.log.count("manifest") == 1
    assert cmg_time.waits == []
    assert_nothing_cached(engine)
    assert_no_secret(engine)


@pytest.mark.parametrize("replacement", ["same bytes", "other bytes"])
def test_row06_a_blob_overwritten_mid_download_is_never_spliced(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
    replacement: str,
) -> None:
    # reliability.md 6: after the first 4 MiB the connection is reset, and while the core waits
    # to resume the blob is overwritten in Azurite (a new ETag). The resume carries If-Match, so
    # Azurite itself answers 412; the core drops its 4 MiB and starts again from byte 0. With
    # the same bytes that ends verified; with other bytes it ends in a hash failure and nothing
    # cached: never the old first half glued to the new second half.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    new = LARGE if replacement == "same bytes" else random.Random(404).randbytes(len(LARGE))
    storage_faults.add(reset_after(4 * MiB), request=1, path="install.wim")
    overwritten: list[float] = []
    virtual_sleep = cmg_time.sleep

    def sleep(seconds: float) -> None:
        if not overwritten:
            cloud_dp._container.upload_blob(
                cloud_dp.blob_name("PS100012", 1, RELPATH), new, overwrite=True
            )
            overwritten.append(seconds)
        virtual_sleep(seconds)

    cmg_time.sleep = sleep  # type: ignore[method-assign]  # the engine's policy reads it
    engine = cmg_client()
    result = engine.run(sequence(retries=0))
    first, resumed, restart = wim_requests(storage_faults)
    assert (first.status, first.outcome, first.body_bytes) == (200, "reset", 4 * MiB)
    assert resumed.range == f"bytes={4 * MiB}-"
    assert resumed.forwarded and resumed.status == 412  # Azurite's own answer, not a script
    assert restart.range is None and restart.status == 200
    assert any(
        "restarting from 0 (the blob changed since the download began (412" in m
        for m in engine.log.messages
    )
    if replacement == "same bytes":
        assert result.succeeded, result.error
        assert_cached(engine, LARGE)
    else:
        assert result.exit_code == codes.HASH_MISMATCH
        assert_nothing_cached(engine)
    assert_no_secret(engine)


@pytest.mark.parametrize("data", [SMALL, LARGE], ids=["inline", "streamed"])
def test_row08_a_206_starting_elsewhere_than_asked_is_not_written(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
    data: bytes,
) -> None:
    # reliability.md 8, wrong start: the resume asks for bytes=2500000- and gets a 206 whose
    # Content-Range starts at 0 (with those bytes as its body). Written at the offset asked
    # for, they would corrupt the file; the core refuses the answer, starts the file again from
    # 0, and ends with exact bytes.
    cloud_dp.distribute("PS100012", 1, {RELPATH: data})
    cut = 2_500_000
    storage_faults.add(reset_after(cut), request=1, path="install.wim")
    lying = respond(
        206,
        headers={"Content-Range": f"bytes 0-65535/{len(data)}", "Accept-Ranges": "bytes"},
        body=data[:65536],
    )
    storage_faults.add(lying, request=2, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence(retries=0))
    assert result.succeeded, result.error
    assert_cached(engine, data)
    first, lied, again = wim_requests(storage_faults)
    assert first.outcome == "reset" and lied.range == f"bytes={cut}-" and lied.status == 206
    assert again.range is None and again.status == 200
    assert any(
        f"restarting from 0 (206 for bytes 0- when bytes {cut}- were asked)" in m
        for m in engine.log.messages
    )
    assert_no_secret(engine)


def test_row08_a_206_with_another_total_size_is_refused(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 8, wrong total: the resume's 206 starts where asked but says the blob is
    # 512 bytes longer than the manifest. That is not the content the manifest describes: the
    # answer is refused, the failure is fatal (0x80091007, not retried), nothing is cached.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    cut = 3 * MiB
    total = len(LARGE) + 512
    storage_faults.add(reset_after(cut), request=1, path="install.wim")
    storage_faults.add(
        respond(
            206,
            headers={"Content-Range": f"bytes {cut}-{total - 1}/{total}"},
            body=LARGE[cut:] + b"\0" * 512,
        ),
        request=2,
        path="install.wim",
    )
    engine = cmg_client()
    result = engine.run(sequence())
    assert result.exit_code == codes.HASH_MISMATCH
    assert f"storage holds {total} bytes, manifest says {len(LARGE)}" in str(result.error)
    first, lied = wim_requests(storage_faults)
    assert first.outcome == "reset" and lied.range == f"bytes={cut}-"
    assert cmg.log.count("manifest") == 1  # the task sequence does not try again
    assert len(cmg_time.waits) == 1  # the backoff before the resume, nothing after
    assert_nothing_cached(engine)
    assert_no_secret(engine)


# --- T-RES -----------------------------------------------------------------------------------


def test_row10_fin_fin_404_and_a_bogus_200_still_end_byte_exact(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 10, curl's test3035 pattern on real Azurite: a clean close after 5 %, the
    # resume closed after another 10 %, the next resume answered 404, then a bogus 200 (30
    # bytes, far from the file's size) to a resume. Each non-resumable answer answers a resume
    # request, as in curl's test.
    #
    # Where this engine differs from curl --retry-all-errors: a 404 is fatal for the download
    # core (row 16, as for BITS and the Azure SDK), so the core gives up there, and it is the
    # task sequence's download retry (SMSTSDownloadRetryCount, 2 by default, 15 s apart) that
    # goes on, with a fresh manifest, from byte 0 (a failed package's staging folder is
    # removed). That retry's first answer is closed after 5 % too, so the bogus 200 answers a
    # resume: it is never appended; the file restarts from 0 and completes byte-exact.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    five, ten = len(LARGE) // 20, len(LARGE) // 10
    script = [
        close_after(five),
        close_after(ten),
        respond(404, headers={"x-ms-error-code": "BlobNotFound"}),
        close_after(five),
        respond(200, headers={"Accept-Ranges": "bytes"}, body=b"X" * 30),
    ]
    for number, fault in enumerate(script, start=1):
        storage_faults.add(fault, request=number, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence())
    assert result.succeeded, result.error
    assert_cached(engine, LARGE)
    seen = [(e.range, e.status) for e in wim_requests(storage_faults)]
    assert seen == [
        (None, 200),  # closed after 5 %
        (f"bytes={five}-", 206),  # closed after 10 % more
        (f"bytes={five + ten}-", 404),  # the core gives up; the task sequence retries
        (None, 200),  # the retry starts over; closed after 5 %
        (f"bytes={five}-", 200),  # bogus: not appended
        (None, 200),  # from byte 0 again, to the end
    ]
    # Bounded: six GETs, two manifests, one task-sequence wait of 15 s and four backoffs.
    cmg.log.assert_request_made("manifest", count=2, package_id="PS100012")
    assert len(cmg_time.waits) == 5 and cmg_time.waits.count(15.0) == 1
    messages = engine.log.messages
    # The 404 reaches the task sequence as a bad HTTP status, which it retries.
    assert (
        "TSManager: Content download for PS100012:1 failed (0x87D0027E); retry 1 of 2 in 15 seconds"
        in messages
    )
    assert any("restarting from 0" in m and "range ignored" in m for m in messages)
    assert_no_secret(engine)


# Row 13 runs the core directly, to give it a sub-second read timeout: a stall is a real
# silence on the socket (the proxy sleeps for real, cut short when the fixture stops it), while
# retry waits and the no-progress deadline run on virtual time. So virtual time counts the
# waits between tries, not the read timeouts themselves.
#: Long enough that a busy Azurite on a loaded 2-core machine does not pause that long mid-body.
READ_TIMEOUT = 0.8


def signed(cloud_dp: CloudDP, manifest: ContentManifest) -> ContentManifest:
    now = datetime.now(UTC)
    return cloud_dp.signed_manifest(
        manifest, start=now - timedelta(minutes=15), expiry=now + timedelta(hours=1)
    )


@pytest.fixture
def small_file(cloud_dp: CloudDP, storage_faults: FaultProxy) -> ContentManifest:
    return signed(cloud_dp, cloud_dp.distribute("PS100012", 1, {RELPATH: SMALL}))


def stalling_core(clock: VirtualTime, events: list[str]) -> DownloadCore:
    # Waits of exactly 4 s (no jitter) and a no-progress deadline of 10 s, so the arithmetic
    # of the deadline is visible in the test; tries are not the bound here.
    policy = clock.policy(
        attempts=100, base_delay=4.0, max_delay=4.0, jitter=0.0, no_progress_timeout=10.0
    )
    return DownloadCore(timeout=READ_TIMEOUT, retry=policy, on_event=events.append)


def test_row13_a_stall_past_the_read_timeout_resumes_where_the_bytes_stopped(
    small_file: ContentManifest, storage_faults: FaultProxy, tmp_path: Path
) -> None:
    # reliability.md 13: after 1 000 000 bytes the proxy sends nothing more (no FIN) for far
    # longer than the read timeout. The read times out, the core retries from the byte where
    # the bytes stopped, and the file verifies.
    storage_faults.add(stall_after(1_000_000, 60.0), request=1)
    clock, events = VirtualTime(), list[str]()
    core = stalling_core(clock, events)
    began = time.monotonic()
    try:
        stats = core.download(small_file, tmp_path)
    finally:
        core.close()
    assert time.monotonic() - began < 30  # one read timeout, not the 60 s stall
    assert (tmp_path / RELPATH).read_bytes() == SMALL
    stalled, resumed = storage_faults.log  # the stalled one may still be "in flight"
    assert stalled.faults == ("stall_after(1000000, 60)",)
    assert resumed.range == "bytes=1000000-" and resumed.status == 206
    assert stats.retries == 1 and clock.waits == [4.0]
    assert any("timed out" in e and "from byte 1000000" in e for e in events), events


def test_row13_a_stall_that_persists_past_the_no_progress_deadline_fails_cleanly(
    small_file: ContentManifest, storage_faults: FaultProxy, tmp_path: Path
) -> None:
    # reliability.md 13: every try stalls, and after the first no byte arrives any more. At
    # the fourth failure 12 s (virtual) have passed since the last progress, more than the
    # 10 s deadline: the core gives up with a clear error, keeps nothing at the final name,
    # and leaves only the verified prefix and its journal for a later try.
    storage_faults.add(stall_after(1_000_000, 60.0), request=1)
    storage_faults.add(stall_after(0, 60.0), request=2, times=20)
    clock, events = VirtualTime(), list[str]()
    core = stalling_core(clock, events)
    try:
        with pytest.raises(ContentError) as failed:
            core.download(small_file, tmp_path)
    finally:
        core.close()
    assert failed.value.hresult == codes.CONNECTION_ABORTED
    assert "12 s without progress, 1000000 of" in str(failed.value)
    assert "sig=" not in str(failed.value)
    assert len(storage_faults.log) == 4 and clock.waits == [4.0, 4.0, 4.0]
    assert not (tmp_path / RELPATH).exists()
    part = tmp_path / f"{RELPATH}.part"
    record = _journal.read(_journal.journal_path(part))
    assert record is not None and record.offset == 1_000_000
    assert part.read_bytes() == SMALL[:1_000_000]


def test_row13_the_no_progress_timer_restarts_when_bytes_flow_again(
    small_file: ContentManifest, storage_faults: FaultProxy, tmp_path: Path
) -> None:
    # reliability.md 13 (BITS: "if there is progress, the timer is reset"): the same policy
    # and the same kind of stalls as above, but the third try brings another 1 000 000 bytes
    # before it stalls. The stalls add up to 20 s of waiting, twice the 10 s deadline, yet no
    # stretch without progress reaches it, so the download goes on and verifies.
    for number, fault in enumerate(
        [
            stall_after(1_000_000, 60.0),  # progress to 1 000 000
            stall_after(0, 60.0),  # 4 s without progress
            stall_after(1_000_000, 60.0),  # progress to 2 000 000: the timer restarts
            stall_after(0, 60.0),  # 4 s
            stall_after(0, 60.0),  # 8 s: still under 10 s
        ],
        start=1,
    ):
        storage_faults.add(fault, request=number)
    clock, events = VirtualTime(), list[str]()
    core = stalling_core(clock, events)
    try:
        stats = core.download(small_file, tmp_path)
    finally:
        core.close()
    assert (tmp_path / RELPATH).read_bytes() == SMALL
    assert clock.waits == [4.0] * 5 and clock.now == 20.0
    assert stats.retries == 5
    log = storage_faults.log
    assert [e.range for e in log] == [
        None,
        "bytes=1000000-",
        "bytes=1000000-",
        "bytes=2000000-",
        "bytes=2000000-",
        "bytes=2000000-",
    ]
    assert log[-1].status == 206


def test_row14_206_answers_then_a_200_mid_way_restart_the_file(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 14: a first resume is answered 206 as it should be; the next one loses
    # range support on the way (200, whole blob). The 200 is not appended: the file restarts
    # from byte 0 and verifies.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    storage_faults.add(reset_after(2 * MiB), request=1, path="install.wim")
    storage_faults.add(reset_after(2 * MiB), request=2, path="install.wim")
    storage_faults.add(ignore_range(), request=3, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence(retries=0))
    assert result.succeeded, result.error
    assert_cached(engine, LARGE)
    seen = [(e.range, e.status) for e in wim_requests(storage_faults)]
    assert seen == [
        (None, 200),
        (f"bytes={2 * MiB}-", 206),
        (f"bytes={4 * MiB}-", 200),
        (None, 200),
    ]
    assert any("restarting from 0" in m and "range ignored" in m for m in engine.log.messages)
    assert_no_secret(engine)


def test_row14_ranges_answered_206_then_200_fall_back_to_one_stream(
    cloud_dp: CloudDP, storage_faults: FaultProxy, tmp_path: Path
) -> None:
    # reliability.md 14 with ranges on: 12 MiB in six 2 MiB ranges over two connections. The
    # first three ranges are answered 206; the fourth loses range support (200). The core
    # stops the ranges and fetches the file again as one stream from byte 0.
    data = random.Random(405).randbytes(12 * MiB)
    manifest = signed(cloud_dp, cloud_dp.distribute("PS100012", 1, {RELPATH: data}))
    storage_faults.add(ignore_range(), request=4, path="install.wim")
    events: list[str] = []
    core = DownloadCore(
        retry=VirtualTime().policy(),
        range_parts=2,
        range_threshold=8 * MiB,
        range_size=2 * MiB,
        on_event=events.append,
    )
    try:
        core.download(manifest, tmp_path)
    finally:
        core.close()
    assert (tmp_path / RELPATH).read_bytes() == data
    log = wim_requests(storage_faults)
    # The first three ranges were answered 206 (one may have been cut by the restart before its
    # head was forwarded, so it has no status).
    assert {e.status for e in log[:3]} <= {206, None} and log[0].status == 206
    assert log[3].range is not None and log[3].status == 200
    whole = [e for e in log if e.range is None]
    assert whole == [log[-1]] and whole[0].status == 200 and whole[0].outcome == "complete"
    assert any("restarting from 0" in e and "range ignored" in e for e in events)


# --- T-RETRY ---------------------------------------------------------------------------------


def test_row17_retry_after_as_an_http_date_and_a_too_long_one_capped(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # reliability.md 17: 429 with Retry-After as an HTTP date 30 s ahead (of the wall clock,
    # which is what the date means), 503 ServerBusy with Retry-After: 3600, then a 408. The
    # first wait is the date's distance, the second is capped at the policy's 60 s, the 408
    # gets an ordinary backoff; then the file verifies.
    cloud_dp.distribute("PS100012", 1, {RELPATH: SMALL})
    when = formatdate(time.time() + 30, usegmt=True)
    storage_faults.add(respond(429, headers={"Retry-After": when}), request=1, path="install.wim")
    storage_faults.add(
        respond(503, headers={"Retry-After": "3600", **BUSY}), request=2, path="install.wim"
    )
    storage_faults.add(respond(408), request=3, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence(retries=0))
    assert result.succeeded, result.error
    assert_cached(engine, SMALL)
    assert [e.status for e in wim_requests(storage_faults)] == [429, 503, 408, 200]
    date_wait, capped, backoff = cmg_time.waits
    assert 20.0 < date_wait <= 30.0  # whole seconds, and the answer took a moment to arrive
    assert capped == engine.core.retry.max_retry_after == 60.0
    assert 3.0 <= backoff <= 5.0  # the third failure in a row: 4 s with 25 % jitter
    assert_no_secret(engine)


def test_row17_retry_after_waits_count_against_the_no_progress_budget(
    small_file: ContentManifest, storage_faults: FaultProxy, tmp_path: Path
) -> None:
    # reliability.md 17, "honours a total time budget" (curl test366): storage keeps answering
    # 429 with Retry-After: 60. Each wait is honoured, but the time without progress is bounded
    # too (100 s here): at the third refusal 120 s have passed and the core gives up, however
    # many tries it would still allow.
    storage_faults.add(respond(429, headers={"Retry-After": "60"}), request=1, times=20)
    clock = VirtualTime()
    core = DownloadCore(retry=clock.policy(attempts=100, no_progress_timeout=100.0))
    try:
        with pytest.raises(ContentError) as failed:
            core.download(small_file, tmp_path)
    finally:
        core.close()
    assert failed.value.hresult == codes.CONNECTION_ABORTED
    assert "120 s without progress" in str(failed.value)
    assert clock.waits == [60.0, 60.0]
    assert len(storage_faults.log) == 3
    assert list(tmp_path.rglob("*.wim")) == []


# --- beyond the rows: progress kept across the task sequence's own retries ---------------------


def test_a_task_sequence_retry_continues_where_the_core_gave_up(
    cmg: FakeCMG,
    cmg_client: Callable[..., TaskSequenceEngine],
    cmg_time: VirtualTime,
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # B1 at the task-sequence level: the first answer is reset after 3 MiB, and the next five
    # resumes at once, so the core gives up (5 failed tries in a row without progress). Its
    # verified prefix is kept in staging, and the task sequence's retry (15 s later) resumes
    # from it, as a BITS job keeps its progress, instead of fetching those bytes again.
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    storage_faults.add(reset_after(3 * MiB), request=1, path="install.wim")
    storage_faults.add(reset_after(0), request=2, times=5, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence())
    assert result.succeeded, result.error
    assert_cached(engine, LARGE)
    requests = wim_requests(storage_faults)
    assert len(requests) == 7
    last = requests[-1]
    assert last.range is not None and last.status == 206
    resumed_at = int(last.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 3 * MiB
    assert last.body_bytes == len(LARGE) - resumed_at
    # Bytes served in all: the file once, plus what the five empty resets cost (nothing).
    assert sum(r.body_bytes for r in requests) == len(LARGE) + 3 * MiB - resumed_at
    assert cmg_time.waits.count(15.0) == 1
    messages = engine.log.messages
    assert any(f"resuming at byte {resumed_at}" in m for m in messages)
    assert_no_secret(engine)


def test_after_the_last_try_no_partial_is_left_in_staging(
    cmg_client: Callable[..., TaskSequenceEngine],
    cloud_dp: CloudDP,
    storage_faults: FaultProxy,
) -> None:
    # The kept prefix only lives while a retry may use it: with no retry left the task sequence
    # fails and staging is emptied (reliability.md A1: no partial outlives a terminal failure).
    cloud_dp.distribute("PS100012", 1, {RELPATH: LARGE})
    storage_faults.add(reset_after(3 * MiB), request=1, path="install.wim")
    storage_faults.add(reset_after(0), request=2, times=5, path="install.wim")
    engine = cmg_client()
    result = engine.run(sequence(retries=0))
    assert not result.succeeded
    assert isinstance(result.error, ContentError) and result.error.resumable
    assert len(wim_requests(storage_faults)) == 6
    assert_nothing_cached(engine)
