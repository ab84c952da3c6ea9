"""Resume after the client process is killed (reliability.md B4; tests 11, 12 and 28).

A real client process (``python -c`` running :class:`DownloadCore` on a manifest given as JSON on
stdin) downloads through the storage fault proxy from the session's Azurite; the test SIGKILLs
it by pid, then a second process on the same staging folder must resume from the journal, not
from zero, and end with a verified file and nothing else in the folder. The in-process tests
below cover what the journal must refuse (another manifest, a replaced blob).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from pytest_cmg._client import _journal
from pytest_cmg._client.download import DownloadCore
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._errors import ContentError
from pytest_cmg._protocol import codes
from pytest_cmg.faults import reset_after, throttle

if TYPE_CHECKING:
    from pytest_cmg._protocol.manifest import ContentManifest

MiB = 1 << 20
SIZE = 24 * MiB
RATE = 8 * MiB  # bytes per second through the proxy: the first run lasts about 3 s
JOURNAL = 2 * MiB  # checkpoint interval of the child processes
RELPATH = "sources/install.wim"
DATA = random.Random(11).randbytes(SIZE)

CHILD = r"""
import json, sys, time
from pathlib import Path
from pytest_cmg._client.download import DownloadCore
from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile

spec = json.loads(sys.stdin.read())
manifest = ContentManifest(
    spec["package_id"], spec["version"], tuple(ManifestFile(**f) for f in spec["files"])
)
core = DownloadCore(
    workers=2,
    timeout=20,
    journal_bytes=spec["journal_bytes"],
    journal_seconds=0.0,
    on_event=lambda line: print("event:", line, file=sys.stderr, flush=True),
)
if spec.get("hang_before_commit"):
    def hang(relpath, part):
        Path(spec["hang_before_commit"]).write_text(relpath)
        time.sleep(60)  # the test kills this process here
    core.before_commit = hang
stats = core.download(manifest, Path(spec["dest"]))
core.close()
print(json.dumps({"resumed": stats.resumed, "skipped": stats.skipped, "bytes": stats.bytes}))
"""


@pytest.fixture
def package(cloud_dp):
    return cloud_dp.distribute("PS1000K1", 1, {RELPATH: DATA})


def signed(cloud_dp, manifest: ContentManifest) -> ContentManifest:
    """The manifest with fresh SAS URLs (through the fault proxy when it is routed)."""
    now = datetime.now(UTC)
    return cloud_dp.signed_manifest(
        manifest, start=now - timedelta(minutes=15), expiry=now + timedelta(hours=1)
    )


def start_child(manifest: ContentManifest, dest, **extra) -> subprocess.Popen[str]:
    spec = {
        "package_id": manifest.package_id,
        "version": manifest.version,
        "files": [
            {"relpath": f.relpath, "size": f.size, "sha256": f.sha256, "url": f.url}
            for f in manifest.files
        ],
        "dest": str(dest),
        "journal_bytes": JOURNAL,
        **extra,
    }
    # The SAS travels on stdin, never on a command line other processes can read.
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    proc.stdin.write(json.dumps(spec))
    proc.stdin.close()
    proc.stdin = None  # communicate() must not flush it again
    return proc


def kill(proc: subprocess.Popen[str]) -> str:
    """SIGKILL our child by its pid; return what it wrote to stderr."""
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    return err


def finish(proc: subprocess.Popen[str]) -> tuple[dict, str]:
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)
        raise
    assert proc.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1]), err


def wait_until(condition, proc, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the child ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            kill(proc)
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


def size_of(path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def files_in(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_no_secret(*texts: str, secrets: tuple[str, ...] = ()) -> None:
    # reliability.md 28: no SAS signature and no token anywhere on disk or in logs.
    for text in texts:
        assert "sig=" not in text
        assert not any(secret in text for secret in secrets)


def test_a_killed_download_resumes_from_its_journal_in_a_new_process(
    cloud_dp, storage_faults, package, tmp_path
):
    # reliability.md 11 (and 28 for the journal and the logs).
    dest = tmp_path / ".staging" / "PS1000K1.1"
    part = dest / f"{RELPATH}.part"
    journal = _journal.journal_path(part)
    manifest = signed(cloud_dp, package)
    storage_faults.add(throttle(RATE), request=1)

    first = start_child(manifest, dest)
    wait_until(lambda: size_of(part) >= SIZE * 0.4 and journal.exists(), first, 30, "40 % on disk")
    first_log = kill(first)

    on_disk = size_of(part)
    assert SIZE * 0.4 <= on_disk < SIZE * 0.8
    assert not (dest / RELPATH).exists()
    journal_text = journal.read_text()
    assert_no_secret(journal_text, first_log)
    record = json.loads(journal_text)
    durable = record["offset"]
    assert record["etag"] and record["sha256"] == package.files[0].sha256
    assert 0 < durable <= on_disk
    # What the second run fetches again: the bytes on disk past the last checkpoint. At most one
    # journal interval, plus the 1 MiB buffer being hashed and what arrived while the last
    # checkpoint's fdatasync was running.
    assert on_disk - durable <= JOURNAL + 2 * MiB

    storage_faults.wait_idle(10)
    storage_faults.clear()
    second = start_child(signed(cloud_dp, package), dest)
    stats, second_log = finish(second)

    assert stats == {"resumed": durable, "skipped": 0, "bytes": SIZE}
    storage_faults.wait_idle(10)
    [request] = [e for e in storage_faults.log if e.path.endswith(RELPATH)]
    assert request.range == f"bytes={durable}-"
    assert request.status == 206 and request.body_bytes == SIZE - durable
    assert hashlib.sha256((dest / RELPATH).read_bytes()).hexdigest() == package.files[0].sha256
    assert files_in(dest) == [RELPATH]
    assert f"resuming at byte {durable}" in second_log
    assert_no_secret(second_log)


def test_a_kill_between_verification_and_rename_never_leaves_an_unverified_final_file(
    cloud_dp, storage_faults, package, tmp_path
):
    # reliability.md 12: killed after "hash OK", before "rename": on restart the file is
    # verified-complete or absent, never final-named and unverified.
    dest = tmp_path / ".staging" / "PS1000K1.1"
    marker = tmp_path / "verified"
    manifest = signed(cloud_dp, package)

    first = start_child(manifest, dest, hang_before_commit=str(marker))
    wait_until(marker.exists, first, 60, "the hash check")
    assert not (dest / RELPATH).exists()
    assert size_of(dest / f"{RELPATH}.part") == SIZE
    first_log = kill(first)
    assert not (dest / RELPATH).exists()
    leftovers = [
        (dest / name).read_text(errors="replace")
        for name in files_in(dest)
        if name.endswith(".journal")
    ]
    assert_no_secret(first_log, *leftovers)

    storage_faults.wait_idle(10)
    storage_faults.clear()
    stats, _ = finish(start_child(signed(cloud_dp, package), dest))

    assert hashlib.sha256((dest / RELPATH).read_bytes()).hexdigest() == package.files[0].sha256
    assert files_in(dest) == [RELPATH]
    storage_faults.wait_idle(10)
    fetched = sum(e.body_bytes for e in storage_faults.log)
    # Only what lay past the last checkpoint is fetched again.
    assert fetched == SIZE - stats["resumed"]


def test_a_file_already_complete_is_not_fetched_again(cloud_dp, storage_faults, tmp_path):
    # A restarted download (a new core: nothing carried over) re-hashes each file at its final
    # name from disk, skips those that match without fetching them, and removes a journal left
    # between the rename and its deletion. The final name alone proves nothing (test_integrity).
    files = {f"f{i}.bin": random.Random(i).randbytes(100_000) for i in range(3)}
    manifest = signed(cloud_dp, cloud_dp.distribute("PS1000K2", 1, files))
    dest = tmp_path / "staging"
    core = DownloadCore(retry=VirtualTime().policy())
    core.download(manifest, dest)
    stray = _journal.journal_path(dest / "f1.bin.part")
    stray.write_text("{}")
    (dest / "f2.bin").unlink()
    storage_faults.clear()

    core.close()
    core = DownloadCore(retry=VirtualTime().policy())
    stats = core.download(manifest, dest)
    core.close()
    assert stats.skipped == 2 and stats.rehashed == 2 * 100_000
    assert stats.digests == {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
    storage_faults.wait_idle(10)
    assert [e.path.rsplit("/", 1)[1] for e in storage_faults.log] == ["f2.bin"]
    assert files_in(dest) == sorted(files)


def give_up_halfway(cloud_dp, storage_faults, manifest, dest) -> int:
    """A download that gives up after a reset keeps its .part and journal; the kept offset."""
    storage_faults.add(reset_after(SIZE // 2), request=1)
    core = DownloadCore(retry=VirtualTime().policy(attempts=0), journal_bytes=JOURNAL)
    with pytest.raises(ContentError) as failure:
        core.download(manifest, dest)
    core.close()
    assert failure.value.hresult == codes.CONNECTION_ABORTED
    record = _journal.read(_journal.journal_path(dest / f"{RELPATH}.part"))
    # Everything received before the reset is kept: a final checkpoint when giving up.
    assert record is not None and SIZE // 2 - MiB < record.offset <= SIZE // 2
    storage_faults.wait_idle(10)
    storage_faults.clear()
    return record.offset


def test_a_blob_replaced_between_runs_restarts_the_file_on_412(
    cloud_dp, storage_faults, package, tmp_path
):
    # The journal's ETag goes out as If-Match: the same bytes under a new ETag still answer
    # 412, and the file starts again rather than splicing two uploads.
    dest = tmp_path / "staging"
    manifest = signed(cloud_dp, package)
    kept = give_up_halfway(cloud_dp, storage_faults, manifest, dest)
    cloud_dp.distribute("PS1000K1", 1, {RELPATH: DATA})  # same content, new ETag

    events: list[str] = []
    core = DownloadCore(retry=VirtualTime().policy(), on_event=events.append)
    stats = core.download(manifest, dest)
    core.close()
    storage_faults.wait_idle(10)
    assert [(e.range, e.status) for e in storage_faults.log] == [
        (f"bytes={kept}-", 412),
        (None, 200),
    ]
    assert stats.resumed == kept
    assert any("restarting from 0" in e and "412" in e for e in events)
    assert (dest / RELPATH).read_bytes() == DATA
    assert files_in(dest) == [RELPATH]


def test_a_journal_for_other_content_is_ignored(cloud_dp, storage_faults, package, tmp_path):
    dest = tmp_path / "staging"
    manifest = signed(cloud_dp, package)
    kept = give_up_halfway(cloud_dp, storage_faults, manifest, dest)
    path = _journal.journal_path(dest / f"{RELPATH}.part")
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "sha256": "0" * 64}))

    core = DownloadCore(retry=VirtualTime().policy())
    stats = core.download(manifest, dest)
    core.close()
    storage_faults.wait_idle(10)
    assert kept > 0 and stats.resumed == 0
    assert [e.range for e in storage_faults.log] == [None]
    assert (dest / RELPATH).read_bytes() == DATA


def test_bad_bytes_on_disk_after_a_crash_cost_a_restart_not_a_failure(
    cloud_dp, storage_faults, package, tmp_path
):
    # The durable prefix is re-hashed from disk; if the disk returned other bytes, the final
    # hash fails, and that is the disk's fault: the file is fetched again once, from zero.
    dest = tmp_path / "staging"
    manifest = signed(cloud_dp, package)
    give_up_halfway(cloud_dp, storage_faults, manifest, dest)
    with (dest / f"{RELPATH}.part").open("r+b") as handle:
        handle.seek(1000)
        handle.write(b"\x00" * 16)

    events: list[str] = []
    core = DownloadCore(retry=VirtualTime().policy(), on_event=events.append)
    core.download(manifest, dest)
    core.close()
    assert (dest / RELPATH).read_bytes() == DATA
    assert any("mismatch after resuming from disk" in e for e in events)


def test_journal_records_round_trip_and_refuse_garbage(tmp_path):
    record = _journal.JournalRecord("PS1", 2, "a/b.bin", 10, "ab" * 32, '"0x1"', 4)
    path = tmp_path / "b.bin.part.journal"
    _journal.write(path, record)
    assert _journal.read(path) == record
    assert not path.with_name(path.name + ".tmp").exists()
    for bad in (
        b"",
        b"[]",
        b'{"format": 1}',
        json.dumps({**json.loads(record.to_json()), "offset": 11}).encode(),
    ):
        path.write_bytes(bad)
        assert _journal.read(path) is None
    assert set(json.loads(record.to_json())) == {
        "format",
        "package_id",
        "version",
        "relpath",
        "size",
        "sha256",
        "etag",
        "offset",
    }


def test_the_client_resumes_a_killed_package_download_through_the_gateway(
    cmg, cloud_dp, storage_faults, tmp_path
):
    # reliability.md 11 end to end: ``python -m pytest_cmg client`` (engine, cache, core with
    # their defaults) killed mid-download; the next run finds the stable staging folder, gets
    # fresh URLs from the gateway and resumes from the journal.
    cloud_dp.distribute("PS1000K3", 1, {RELPATH: DATA})
    contract = tmp_path / "connection.json"
    contract.write_text(
        json.dumps(
            {
                "cmg_url": cmg.url,
                "ca_cert": str(cmg.ca_pem),
                "site_code": cmg.site_code,
                "mp_role_id": cmg.role_id,
                "client_id": "GUID:killed",
                "token": cmg.issue_token("GUID:killed"),
            }
        )
    )
    token = json.loads(contract.read_text())["token"]
    cache = tmp_path / "ccmcache"
    argv = [
        sys.executable, "-m", "pytest_cmg", "client", str(contract), "--package", "PS1000K3:1",
        "--cache", str(cache), "--log", str(tmp_path / "smsts.log"), "--no-progress",
    ]  # fmt: skip
    staging = cache / ".staging" / "PS1000K3.1"
    part = staging / f"{RELPATH}.part"
    journal = _journal.journal_path(part)
    storage_faults.add(throttle(RATE), request=1)

    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: size_of(part) >= SIZE * 0.4 and journal.exists(), first, 30, "40 % on disk")
    kill(first)
    record = _journal.read(journal)
    assert record is not None and record.offset >= 8 * MiB  # the core's default interval
    assert_no_secret(journal.read_text(), secrets=(token,))

    storage_faults.wait_idle(10)
    storage_faults.clear()
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    summary, _ = finish(second)

    assert summary["outcome"] == "success", summary
    storage_faults.wait_idle(10)
    assert storage_faults.log[0].range == f"bytes={record.offset}-"
    assert sum(e.body_bytes for e in storage_faults.log) == SIZE - record.offset
    entry = cache / "PS1000K3.1" / RELPATH
    assert hashlib.sha256(entry.read_bytes()).hexdigest() == hashlib.sha256(DATA).hexdigest()
    assert not staging.exists()
    log = (tmp_path / "smsts.log").read_text()
    assert f"resuming at byte {record.offset}" in log
    # Everything the client keeps on disk except the content itself (random bytes).
    kept = [p for p in cache.rglob("*") if p.is_file() and p.name != "install.wim"]
    files = [p.read_text(errors="replace") for p in kept]
    assert_no_secret(log, *files, secrets=(token,))


def test_a_checkpoint_skipped_while_one_was_written_is_journaled_when_that_one_ends(
    tmp_path, monkeypatch
):
    # The core writes one checkpoint at a time and skips any that comes due meanwhile. When the
    # body then stops (a stall, a power cut), the skipped bytes must still reach the journal:
    # the checkpoint thread journals the latest hashed offset once the slow one has ended.
    import threading

    from pytest_cmg._client._job import Checkpoints, Job, Run
    from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile

    data = random.Random(13).randbytes(4 * MiB)
    item = ManifestFile(RELPATH, len(data), hashlib.sha256(data).hexdigest(), "http://unused/")
    manifest = ContentManifest("PS1000K2", 1, (item,))
    core = DownloadCore(journal_bytes=MiB, journal_seconds=0.0)
    checkpoints = Checkpoints()
    run = Run(
        core, manifest, tmp_path, str(tmp_path), None, False, checkpoints, {str(tmp_path)},
        threading.Lock(), {},
    )  # fmt: skip
    release = threading.Event()
    written: list[int] = []
    real_write = _journal.write

    def slow_write(path, record, *, durable=True):
        # The first checkpoint is slow: the one due at 2 MiB finds it still being written.
        if not written:
            assert release.wait(10), "the test never released the first checkpoint"
        real_write(path, record, durable=durable)
        written.append(record.offset)

    monkeypatch.setattr(_journal, "write", slow_write)
    job = Job(run, item)
    buf = memoryview(bytearray(MiB))
    assert job.open(buf) == 0
    job.etag = '"0x1"'
    for offset in (0, MiB):
        view = memoryview(data)[offset : offset + MiB]
        job.write(view, offset)
        job.hash(view)
    # The body stops at 2 MiB: nothing more is hashed. The first checkpoint may end now.
    release.set()
    job.quiesce()
    checkpoints.close()
    record = _journal.read(job.journal)
    assert record is not None
    assert written == [MiB, 2 * MiB]
    assert record.offset == 2 * MiB == job.hashed
    job.abandon(keep=True)
    core.close()


def test_a_client_that_went_away_during_a_stall_is_sent_nothing_more(tmp_path):
    # A power cut kills the boot while storage holds its body at a stall: the killed process's
    # socket closes cleanly (FIN, it had read every byte), and a send after that still lands in
    # the kernel. The proxy must see the close and stop, or it counts bytes nobody received,
    # and a resumed download could never be shown to fetch each byte once.
    import socket
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from pytest_cmg.faults import FaultProxy, stall_after

    body = random.Random(14).randbytes(MiB)
    held_at = 256 * 1024

    class Blob(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    upstream = ThreadingHTTPServer(("127.0.0.1", 0), Blob)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    received = threading.Event()
    closed = threading.Event()
    client: socket.socket | None = None

    def reader(sock: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < held_at:
            chunk = sock.recv(65536)
            if not chunk:
                return
            data += chunk
        received.set()

    def hold(seconds: float) -> None:
        # The stall: the client reads all it was sent, then "loses power" (its socket closes).
        assert received.wait(10), "the client never read the bytes sent before the stall"
        assert client is not None
        client.close()
        closed.set()

    proxy = FaultProxy(f"http://127.0.0.1:{upstream.server_address[1]}", sleep=hold).start()
    try:
        proxy.add(stall_after(held_at, 0.0), path="blob.bin")
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
        client.sendall(b"GET /c/blob.bin HTTP/1.1\r\nHost: storage\r\n\r\n")
        thread = threading.Thread(target=reader, args=(client,), daemon=True)
        thread.start()
        thread.join(10)
        assert closed.wait(10)
        assert proxy.wait_idle(10)
        [request] = proxy.log
        assert request.body_bytes == held_at, "bytes were counted after the client went away"
        assert request.outcome == "client_gone"
    finally:
        proxy.stop()
        upstream.shutdown()
        upstream.server_close()
