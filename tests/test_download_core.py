"""The download core's resume, retry and integrity rules, through the storage fault proxy.

reliability.md tests 9, 14-19 and 21, on virtual time (``cmg_time``): waits are recorded, never
slept.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import random
import ssl
import threading
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client import download as download_module
from pytest_cmg._client._http import ConnectionPool, split_url
from pytest_cmg._client.download import DownloadCore
from pytest_cmg._client.retry import (
    RetryPolicy,
    VirtualTime,
    is_transient_status,
    parse_retry_after,
)
from pytest_cmg._errors import ContentError
from pytest_cmg._net.pki import CertificateAuthority
from pytest_cmg._protocol import codes
from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile
from pytest_cmg.faults import ignore_range, reset_after, respond

SIZE = 4 * 1024 * 1024
DATA = random.Random(9).randbytes(SIZE)
# The task sequence's own retries (SMSTSDownloadRetryCount) are off here, so each test sees the
# download core alone; the last tests switch them back on.
ONE_FILE = TaskSequence(
    "PS100020",
    "IPU",
    (Step("Upgrade", "upgrade_os", "PS100012"),),
    variables={"SMSTSDownloadRetryCount": "0"},
)


@pytest.fixture
def big_package(cloud_dp):
    return cloud_dp.distribute("PS100012", 1, {"sources/install.wim": DATA})


def run(cmg_client):
    engine = cmg_client()
    return engine, engine.run(ONE_FILE)


def assert_verified(engine):
    [entry] = engine.cache.entries()
    assert (entry.path / "sources/install.wim").read_bytes() == DATA
    assert engine.cache.staging_leftovers() == []


def requests_for(proxy):
    proxy.wait_idle(10)
    return [e for e in proxy.log if e.path.endswith("install.wim")]


def test_a_reset_resumes_from_the_last_byte_received(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # reliability.md 9: the second request asks for exactly what is missing, nothing is
    # fetched twice, and the hash covers the whole file across both responses.
    storage_faults.add(reset_after(2_500_000), request=1)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    first, second = requests_for(storage_faults)
    assert first.outcome == "reset" and first.range is None
    resumed_at = int(second.range.removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_at <= 2_500_000
    assert second.status == 206
    assert len(cmg_time.waits) == 1
    assert any("retry 1" in m and f"from byte {resumed_at}" in m for m in engine.log.messages)


def test_transient_statuses_are_retried_honouring_retry_after(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # reliability.md 15 and 17.
    storage_faults.add(
        respond(503, headers={"Retry-After": "7", "x-ms-error-code": "ServerBusy"}), request=1
    )
    storage_faults.add(respond(500), request=2)
    storage_faults.add(respond(408), request=3)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    assert cmg_time.waits[0] == 7.0
    assert len(cmg_time.waits) == 3
    assert [e.status for e in requests_for(storage_faults)] == [503, 500, 408, 200]


@pytest.mark.parametrize("status", [400, 404, 405, 501, 505])
def test_fatal_statuses_are_not_retried(
    cmg, cmg_client, cmg_time, big_package, storage_faults, status
):
    # reliability.md 16: exactly one attempt, a clear error, nothing cached.
    storage_faults.add(respond(status), request=1)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.BAD_HTTP_STATUS
    assert f"answered {status}" in str(result.error)
    assert len(requests_for(storage_faults)) == 1
    assert cmg_time.waits == []
    assert engine.cache.entries() == []


def test_the_retry_budget_ends_a_storm(cmg, cmg_client, cmg_time, big_package, storage_faults):
    # reliability.md 18: bounded attempts, then a clean failure with nothing cached.
    storage_faults.add(respond(503), times=50)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.CONNECTION_ABORTED
    assert "gave up after 6 failed tries" in str(result.error)
    assert len(requests_for(storage_faults)) == 6
    assert len(cmg_time.waits) == 5
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []


def test_a_200_to_a_resume_is_never_appended(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # reliability.md 7 and 14: the server "loses" range support after a reset; the core starts
    # the file again instead of appending a second copy of its first bytes.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(ignore_range(), request=2)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    statuses = [e.status for e in requests_for(storage_faults)]
    assert statuses[:2] == [200, 200]
    assert any("restarting from 0" in m and "range ignored" in m for m in engine.log.messages)


def test_a_changed_blob_restarts_the_file_never_splices(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # reliability.md 6: If-Match on the resume; 412 means another version, so start again.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(respond(412, headers={"x-ms-error-code": "ConditionNotMet"}), request=2)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    assert any("restarting from 0" in m and "412" in m for m in engine.log.messages)
    assert requests_for(storage_faults)[2].range is None  # the restart asks for the whole file


def test_an_expired_sas_is_renewed_through_the_gateway_once(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # reliability.md 21: 403 from storage mid-download -> one new manifest from the CMG, then
    # the download resumes from its offset.
    storage_faults.add(reset_after(2_500_000), request=1)
    storage_faults.add(respond(403, headers={"x-ms-error-code": "AuthenticationFailed"}), request=2)
    engine, result = run(cmg_client)
    assert result.succeeded, result.error
    assert_verified(engine)
    cmg.log.assert_request_made("manifest", count=2, package_id="PS100012")
    third = requests_for(storage_faults)[2]
    assert third.range is not None and third.status == 206
    assert any("SAS refused (AuthenticationFailed), renewing" in m for m in engine.log.messages)
    assert all("sig=" not in m for m in engine.log.messages)


def test_a_sas_refused_again_after_renewal_is_final(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    storage_faults.add(respond(403, headers={"x-ms-error-code": "AuthenticationFailed"}), times=5)
    engine, result = run(cmg_client)
    assert result.exit_code == codes.BAD_HTTP_STATUS
    assert len(requests_for(storage_faults)) == 2
    assert engine.cache.entries() == []


def test_backoff_grows_with_bounded_jitter_and_caps():
    # reliability.md 19: pure function of the policy, no network.
    policy = RetryPolicy(base_delay=1.0, max_delay=10.0, jitter=0.25, rng=random.Random(3))
    for failures in range(1, 9):
        base = min(2.0 ** (failures - 1), 10.0)
        for _ in range(50):
            wait = policy.backoff(failures)
            assert base * 0.75 <= wait <= base * 1.25
    assert policy.backoff(1, retry_after=7.0) == 7.0
    assert policy.backoff(1, retry_after=3600.0) == policy.max_retry_after


def test_status_classification_follows_bits_and_the_sdk():
    assert all(is_transient_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_transient_status(s) for s in (400, 401, 403, 404, 409, 412, 416, 501, 505))


def test_retry_after_accepts_seconds_and_http_dates():
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:10 GMT", now=1445412480.0) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_the_task_sequence_retries_a_failed_download_as_smstsdownloadretrycount_says(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    # The core gives up after 6 tries; the task sequence then waits SMSTSDownloadRetryDelay
    # (15 s by default, on virtual time) and tries the package again, up to 2 times.
    storage_faults.add(respond(503), times=6)
    engine = cmg_client()
    result = engine.run(TaskSequence("PS100020", "IPU", ONE_FILE.steps))
    assert result.succeeded, result.error
    assert_verified(engine)
    assert 15.0 in cmg_time.waits
    assert any("retry 1 of 2 in 15 seconds" in m for m in engine.log.messages)


def test_no_task_sequence_retry_when_the_retry_count_is_zero(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    storage_faults.add(respond(503), times=6)
    engine = cmg_client()
    sequence = TaskSequence(
        "PS100020", "IPU", ONE_FILE.steps, variables={"SMSTSDownloadRetryCount": "0"}
    )
    result = engine.run(sequence)
    assert result.exit_code == codes.CONNECTION_ABORTED
    assert 15.0 not in cmg_time.waits


def test_download_all_before_start_retries_too(
    cmg, cmg_client, cmg_time, big_package, storage_faults
):
    from pytest_cmg import DeploymentSettings, DownloadMode

    storage_faults.add(respond(503), times=6)
    engine = cmg_client(deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    result = engine.run(TaskSequence("PS100020", "IPU", ONE_FILE.steps))
    assert result.succeeded, result.error
    assert 15.0 in cmg_time.waits


# --- the core on its own: transport, large files, ranges ----------------------------------------

MiB = 1 << 20
LARGE = random.Random(12).randbytes(20 * MiB)


def signed(cloud_dp, manifest):
    now = datetime.now(UTC)
    return cloud_dp.signed_manifest(
        manifest, start=now - timedelta(minutes=15), expiry=now + timedelta(hours=1)
    )


def core_for(**kw):
    return DownloadCore(retry=VirtualTime().policy(), **kw)


def range_start(entry):
    return int(entry.range.removeprefix("bytes=").split("-")[0])


@pytest.fixture
def large(cloud_dp, storage_faults):
    return signed(cloud_dp, cloud_dp.distribute("PS100030", 1, {"big.bin": LARGE}))


def test_a_large_file_streams_resumes_at_the_byte_cut_and_keeps_the_hash_in_order(
    large, storage_faults, tmp_path
):
    # Files of 8 MiB and more are received by a helper thread while the caller hashes; a reset
    # still resumes at exactly the byte it cut (the bytes of the half-filled buffer are kept).
    storage_faults.add(reset_after(5_000_000), request=1)
    events = []
    core = core_for(on_event=events.append)
    stats = core.download(large, tmp_path)
    core.close()
    assert (tmp_path / "big.bin").read_bytes() == LARGE
    storage_faults.wait_idle(10)
    first, second = storage_faults.log
    assert first.range is None and first.outcome == "reset"
    assert second.range == f"bytes={first.body_bytes}-" and second.status == 206
    assert first.body_bytes + second.body_bytes == len(LARGE)  # nothing fetched twice
    assert stats.retries == 1 and stats.refetched == 0
    assert any(f"from byte {first.body_bytes}" in e for e in events)


def test_ranges_cover_the_file_once_and_a_cut_range_resumes_mid_range(
    large, storage_faults, tmp_path
):
    # issue 4: "parallel across ranges of large files over kept-alive connections".
    storage_faults.add(reset_after(1_500_000), request=2)
    core = core_for(range_parts=3, range_threshold=8 * MiB, range_size=4 * MiB)
    core.download(large, tmp_path)
    core.close()
    assert (tmp_path / "big.bin").read_bytes() == LARGE
    storage_faults.wait_idle(10)
    log = storage_faults.log
    assert all(e.status == 206 and e.range for e in log)
    starts = sorted(range_start(e) for e in log)
    aligned = [s for s in starts if s % (4 * MiB) == 0]
    assert aligned == [i * 4 * MiB for i in range(5)]  # 20 MiB in five 4 MiB ranges
    [resumed] = [s for s in starts if s % (4 * MiB)]
    cut = log[1]
    assert resumed == range_start(cut) + cut.body_bytes  # the cut range goes on where it stopped
    assert sum(e.body_bytes for e in log) == len(LARGE)
    assert storage_faults.connections <= 3 + 1  # three kept-alive connections (+1 for the reset)


def test_a_server_that_ignores_ranges_gets_one_stream_instead(large, storage_faults, tmp_path):
    storage_faults.add(ignore_range(), request=1)
    events = []
    core = core_for(
        range_parts=3, range_threshold=8 * MiB, range_size=4 * MiB, on_event=events.append
    )
    core.download(large, tmp_path)
    core.close()
    assert (tmp_path / "big.bin").read_bytes() == LARGE
    assert any("restarting from 0" in e and "range ignored" in e for e in events)
    storage_faults.wait_idle(10)
    assert storage_faults.log[-1].range is None and storage_faults.log[-1].status == 200


def test_a_sas_refused_on_one_range_is_renewed_once_for_the_file(
    cloud_dp, large, storage_faults, tmp_path
):
    storage_faults.add(respond(403, headers={"x-ms-error-code": "AuthenticationFailed"}), request=3)
    renewals = []

    def renew(item):
        renewals.append(item.relpath)
        return signed(cloud_dp, large).files[0].url

    core = core_for(range_parts=3, range_threshold=8 * MiB, range_size=4 * MiB)
    core.download(large, tmp_path, renew=renew)
    core.close()
    assert renewals == ["big.bin"]
    assert (tmp_path / "big.bin").read_bytes() == LARGE


def test_many_small_files_share_kept_alive_connections(cloud_dp, storage_faults, tmp_path):
    files = {f"k/f{i:03d}": random.Random(i).randbytes(16 * 1024) for i in range(60)}
    manifest = signed(cloud_dp, cloud_dp.distribute("PS100031", 1, files))
    progress = []
    core = core_for(workers=4, on_progress=lambda b, f: progress.append((b, f)))
    stats = core.download(manifest, tmp_path)
    core.close()
    assert all((tmp_path / name).read_bytes() == data for name, data in files.items())
    assert stats.files == 60 and stats.bytes == 60 * 16 * 1024
    assert core.connections_opened <= 4 and storage_faults.connections <= 4
    assert sum(b for b, _ in progress) == stats.bytes and sum(f for _, f in progress) == 60
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == sorted(n[2:] for n in files)


def test_the_reorder_window_bounds_memory_and_cannot_deadlock():
    # A receiver more than a window ahead of the hash waits; the one holding the next bytes never.
    window = download_module._Window(0, 2 * MiB)
    ahead = []

    def far_receiver():
        buf = window.buffer(2 * MiB)  # needs the hash to reach 1 MiB first
        ahead.append(buf is not None)

    thread = threading.Thread(target=far_receiver)
    thread.start()
    thread.join(0.2)
    assert thread.is_alive() and ahead == []
    first = window.buffer(0)
    window.put(0, first, MiB)
    buf, n = window.get()
    window.hashed(buf, n)
    thread.join(5)
    assert ahead == [True]
    window.abort()
    assert window.buffer(10 * MiB) is None


class _Blob(BaseHTTPRequestHandler):
    """A minimal blob server: Range, If-Match, optional chunked answers; records requests."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        server = self.server
        server.requests.append(dict(self.headers.items()))
        server.paths.append(self.path)
        data, etag = server.data, '"0xE1"'
        if self.headers.get("If-Match", etag) != etag:
            self.send_response(412)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end, status = 0, len(data) - 1, 200
        if "Range" in self.headers:
            first, _, last = self.headers["Range"].removeprefix("bytes=").partition("-")
            start, end, status = int(first), int(last) if last else len(data) - 1, 206
        body = data[start : end + 1]
        self.send_response(status)
        self.send_header("ETag", etag)
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        if server.chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(body), 70_000):
                piece = body[i : i + 70_000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        # Close without saying so ("Connection: close"), as a server dropping an idle one does.
        self.close_connection = server.close_after_answer


@pytest.fixture
def blob_server():
    servers = []

    def start(data, *, chunked=False, tls=None):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
        server.daemon_threads = True
        server.data, server.chunked, server.requests = data, chunked, []
        server.paths = []
        server.close_after_answer = False
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        scheme = "https" if tls else "http"
        return server, f"{scheme}://127.0.0.1:{server.server_address[1]}/c/blob.bin?sv=x&sig=secret"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def one_file(url, data):
    return ContentManifest(
        "PS100032", 1, (ManifestFile("blob.bin", len(data), hashlib.sha256(data).hexdigest(), url),)
    )


def test_every_range_after_the_first_answer_pins_its_etag(blob_server, tmp_path):
    server, url = blob_server(LARGE)
    core = core_for(range_parts=4, range_threshold=8 * MiB, range_size=2 * MiB)
    core.download(one_file(url, LARGE), tmp_path)
    core.close()
    assert (tmp_path / "blob.bin").read_bytes() == LARGE
    ranges = sorted(r["Range"] for r in server.requests)
    assert len(ranges) == 10 and len(set(ranges)) == 10
    assert sum(1 for r in server.requests if "If-Match" not in r) == 1
    assert all(r.get("If-Match", '"0xE1"') == '"0xE1"' for r in server.requests)


def test_chunked_bodies_are_read_and_the_connection_kept(blob_server, tmp_path):
    data = random.Random(5).randbytes(300_000)
    server, url = blob_server(data, chunked=True)
    core = core_for()
    for n in range(3):
        core.download(one_file(url, data), tmp_path / str(n))
        assert (tmp_path / str(n) / "blob.bin").read_bytes() == data
    core.close()
    assert core.connections_opened == 1 and len(server.requests) == 3


def test_https_storage_is_verified_against_the_ca_it_is_given(blob_server, tmp_path):
    ca = CertificateAuthority("Storage Test CA")
    creds = ca.issue(
        tmp_path, "127.0.0.1", usage="server", ip_addresses=(ipaddress.IPv4Address("127.0.0.1"),)
    )
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(creds.cert, creds.key)
    data = random.Random(6).randbytes(100_000)
    _, url = blob_server(data, tls=tls)

    untrusting = core_for()
    with pytest.raises(ContentError) as refused:
        untrusting.download(one_file(url, data), tmp_path / "a")
    untrusting.close()
    assert refused.value.hresult == codes.CONNECTION_ABORTED
    assert "CERTIFICATE_VERIFY_FAILED" in str(refused.value)
    assert "sig=" not in str(refused.value)

    trusting = core_for(ca_file=ca.write_pem(tmp_path / "ca.pem"))
    trusting.download(one_file(url, data), tmp_path / "b")
    trusting.close()
    assert (tmp_path / "b" / "blob.bin").read_bytes() == data


def test_the_transport_replaces_a_kept_alive_connection_the_server_closed(blob_server):
    # Azurite closes idle kept-alive connections after 5 s: the next GET on such a connection
    # finds it closed before any answer and goes out again on a new one, silently.
    data = b"x" * 1000
    server, url = blob_server(data)
    server.close_after_answer = True
    pool = ConnectionPool(timeout=5)
    origin, target = split_url(url)
    buf = memoryview(bytearray(4096))
    for count in (1, 2):
        response = pool.get(origin, target, {})
        assert response.read_into(buf) == 1000 and response.reusable
        pool.release(response.connection, response)
        assert pool.opened == count
    pool.close()
    assert len(server.requests) == 2


def test_a_full_disk_fails_the_download_and_leaves_no_partial(blob_server, tmp_path, monkeypatch):
    # reliability.md 39: ENOSPC mid-write -> the OSError reaches the engine (which reports
    # 0x87D01201), and neither a .part nor a journal is left.
    _, url = blob_server(LARGE)
    real = download_module.os.pwrite
    written = []

    def pwrite(fd, data, offset):
        if sum(written) > 3 * MiB:
            raise OSError(28, "No space left on device")
        written.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(download_module.os, "pwrite", pwrite)
    core = core_for(journal_bytes=MiB, journal_seconds=0.0)
    with pytest.raises(OSError) as full:
        core.download(one_file(url, LARGE), tmp_path)
    core.close()
    assert full.value.errno == 28
    assert list(tmp_path.iterdir()) == []


def test_an_unusable_url_is_a_clear_failure_not_a_retry_storm(tmp_path):
    manifest = one_file("ftp://example.invalid/blob.bin?sig=secret", b"abc")
    core = core_for()
    with pytest.raises(ContentError) as bad:
        core.download(manifest, tmp_path)
    assert bad.value.hresult == codes.BAD_HTTP_STATUS
    assert "sig=" not in str(bad.value)


@pytest.fixture(scope="module")
def https_azurite():
    from pytest_cmg._storage.azurite import AzuriteProcess

    with AzuriteProcess(https=True) as azurite:
        yield azurite.endpoint


def test_https_azurite_with_its_ca(https_azurite, tmp_path):
    # HTTPS storage (docs/emulation.md "HTTPS storage"): the client is given the storage CA.
    from pytest_cmg import CloudDP

    dp = CloudDP(https_azurite, "cmg-core-https")
    dp.create()
    try:
        data = random.Random(7).randbytes(9 * MiB)  # the streamed path, over TLS
        manifest = signed(dp, dp.distribute("PS100033", 1, {"a/big.bin": data, "b.bin": b"b" * 10}))
        assert manifest.files[0].url.startswith("https://")
        core = core_for(ca_file=https_azurite.ca_cert)
        stats = core.download(manifest, tmp_path)
        core.close()
        assert stats.files == 2 and (tmp_path / "a" / "big.bin").read_bytes() == data
    finally:
        dp.delete()


@pytest.fixture
def flushes(monkeypatch):
    """Every fdatasync and fsync the core makes, as (call, path of the descriptor), in order."""
    calls = []
    for name in ("fdatasync", "fsync"):
        real = getattr(download_module.os, name)

        def spy(fd, name=name, real=real):
            calls.append((name, os.readlink(f"/proc/self/fd/{fd}")))
            real(fd)

        monkeypatch.setattr(download_module.os, name, spy)
    return calls


@pytest.mark.parametrize("fsync", [False, True], ids=["process-durable", "power-durable"])
def test_fsync_decides_whether_checkpoints_and_the_rename_wait_for_the_disk(
    blob_server, tmp_path, monkeypatch, flushes, fsync
):
    # The journal always records only written and hashed bytes; fsync=True also flushes them
    # before each record, flushes the file before its rename and the folder after it.
    _, url = blob_server(LARGE)
    calls = flushes
    records = []
    real_write = download_module._journal.write

    def write(path, record, *, durable=True):
        records.append((record.offset, durable))
        real_write(path, record, durable=durable)

    monkeypatch.setattr(download_module._journal, "write", write)
    core = core_for(journal_bytes=4 * MiB, journal_seconds=0.0, fsync=fsync)
    stats = core.download(one_file(url, LARGE), tmp_path)
    core.close()
    assert stats.bytes == len(LARGE)
    assert (tmp_path / "blob.bin").read_bytes() == LARGE
    assert records, "a 20 MiB file with 4 MiB checkpoints records its progress"
    assert all(0 < offset <= len(LARGE) for offset, _ in records)
    assert {durable for _, durable in records} == {fsync}
    if not fsync:
        assert calls == []
        return
    part = str(tmp_path / "blob.bin.part")
    # One flush of the .part per record, one more before the rename, then the folder.
    assert calls.count(("fdatasync", part)) == len(records) + 1
    assert calls[-1] == ("fsync", str(tmp_path))


def test_with_fsync_every_file_and_folder_is_flushed_before_the_download_returns(
    blob_server, tmp_path, flushes
):
    # Small files have no journal, but fsync=True still promises power-cut durability: each
    # is flushed before its rename, and every folder of the download once at the end.
    _, url = blob_server(b"0123456789" * 100)
    data = b"0123456789" * 100
    digest = hashlib.sha256(data).hexdigest()
    manifest = ContentManifest(
        "PS100032",
        1,
        (
            ManifestFile("a/b/x.bin", len(data), digest, url),
            ManifestFile("y.bin", len(data), digest, url),
        ),
    )
    calls = flushes
    core = core_for(fsync=True, workers=1)
    core.download(manifest, tmp_path)
    core.close()
    assert sorted(calls[:2]) == [
        ("fdatasync", str(tmp_path / "a" / "b" / "x.bin.part")),
        ("fdatasync", str(tmp_path / "y.bin.part")),
    ]
    # Deepest first, so each folder's new entries are durable before its parent's.
    assert calls[2:] == [
        ("fsync", str(tmp_path / "a" / "b")),
        ("fsync", str(tmp_path / "a")),
        ("fsync", str(tmp_path)),
    ]
    assert (tmp_path / "a" / "b" / "x.bin").read_bytes() == data


def _sas(url, seconds_left):
    se = (datetime.now(UTC) + timedelta(seconds=seconds_left)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{url}&se={se.replace(':', '%3A')}"


@pytest.mark.parametrize(
    ("seconds_left", "margin", "renewed"),
    [(30, 60.0, True), (-60, 60.0, True), (3600, 60.0, False), (-60, 0.0, False)],
    ids=["lapses-within-the-margin", "already-lapsed", "far-from-lapsing", "margin-off"],
)
def test_a_sas_close_to_its_expiry_is_renewed_before_it_is_used(
    blob_server, tmp_path, seconds_left, margin, renewed
):
    # reliability.md C4: renew before se, rather than wait for storage's 403 mid-transfer. The
    # renewal shares the once-per-file budget with renewals after a refusal.
    server, url = blob_server(LARGE)
    fresh = url.replace("sig=secret", "sig=fresh")
    asked = []

    def renew(item):
        asked.append(item.relpath)
        return _sas(fresh, 3600)

    events = []
    core = core_for(sas_margin=margin, on_event=events.append)
    core.download(one_file(_sas(url, seconds_left), LARGE), tmp_path, renew=renew)
    core.close()
    assert (tmp_path / "blob.bin").read_bytes() == LARGE
    assert asked == (["blob.bin"] if renewed else [])
    assert all(("sig=fresh" in p) == renewed for p in server.paths)
    assert any("renewing before the request" in e for e in events) == renewed
    assert not any("sig=" in e for e in events)


def test_a_renewal_before_use_spends_the_files_one_renewal(blob_server, tmp_path):
    # The renewed URL lapses too: it is used as it is, and storage's verdict is final (here the
    # test server accepts it, so the download completes with exactly one renewal).
    _, url = blob_server(LARGE)
    asked = []

    def renew(item):
        asked.append(item.relpath)
        return _sas(url, 5)

    core = core_for()
    core.download(one_file(_sas(url, 5), LARGE), tmp_path, renew=renew)
    core.close()
    assert asked == ["blob.bin"]
