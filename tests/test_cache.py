"""The client cache: staging, space and eviction, leases, ENOSPC and one download per content.

reliability.md E1/E2 and tests 38-41. Pure unit tests cover LRU order, the keep time, leases and
the staging rules; tests against real Azurite and the running FakeCMG cover what the network must
(not) see: reuse and eviction make no request, two requests for the same content make one
download. ENOSPC is tested twice: injected at the file writes, and for real in a private tmpfs.

This file is also the subprocess client of the cross-process tests:
``python tests/test_cache.py CONFIG.json`` (see ``_driver``).
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pytest_cmg import ContentError, Step, TaskSequence
from pytest_cmg._client.cache import (
    CACHE_IN_USE,
    CacheSpaceError,
    ClientCache,
)
from pytest_cmg._protocol import codes

KB = 1000
MIB = 1024 * 1024
WAITING = "is being downloaded by another request"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def put(cache: ClientCache, clock: Clock, package_id: str, size: int, used_at: float, version: int = 1):
    """A committed entry of ``size`` bytes last used at ``used_at``."""
    clock.now = used_at
    with cache.staging(package_id, version) as staged:
        (staged / "content.bin").write_bytes(b"x" * size)
        return cache.commit(staged, package_id, version)


def keys(cache: ClientCache) -> list[str]:
    return [e.key for e in cache.entries()]


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def one_step(package_id: str, **variables: str) -> TaskSequence:
    return TaskSequence(
        "PS100020", "Cache", (Step(f"Use {package_id}", "download_package_content", package_id),),
        variables=dict(variables),
    )


# --- unit: LRU order and the size rules (E1) ---------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path, clock) -> ClientCache:
    # 1 MB = 1,048,576 bytes: three 300 kB entries leave 148,576 bytes free.
    return ClientCache(tmp_path / "ccmcache", size_mb=1, clock=clock)


@pytest.fixture
def three(cache, clock):
    return [put(cache, clock, pkg, 300 * KB, t) for pkg, t in (("PSA", 100), ("PSB", 200), ("PSC", 300))]


def test_room_is_made_least_recently_used_first(cache, three):
    report = cache.make_room("PSD", 1, 400 * KB)
    assert [e.key for e in report.evicted] == ["PSA.1"]
    assert report.used == 900 * KB and report.free == MIB - 900 * KB
    assert keys(cache) == ["PSB.1", "PSC.1"]
    assert cache.staging_leftovers() == []
    assert not (cache.root / ".trash").exists() or list((cache.root / ".trash").iterdir()) == []


def test_a_use_moves_an_entry_to_the_back_of_the_queue(cache, clock, three):
    clock.now = 400
    lease = cache.acquire("PSA", 1)
    assert lease is not None
    lease.release()
    assert cache.last_used(three[0]) == 400
    report = cache.make_room("PSD", 1, 700 * KB)
    # Two are needed now, the two least recently used: B then C; A was just used.
    assert [e.key for e in report.evicted] == ["PSB.1", "PSC.1"]
    assert keys(cache) == ["PSA.1"]


def test_no_eviction_when_the_content_fits(cache, three):
    report = cache.make_room("PSD", 1, 100 * KB)
    assert report.evicted == ()
    assert keys(cache) == ["PSA.1", "PSB.1", "PSC.1"]


def test_content_larger_than_the_cache_fails_without_evicting(cache, three):
    with pytest.raises(CacheSpaceError) as caught:
        cache.make_room("PSD", 1, MIB + 1)
    assert caught.value.hresult == codes.CACHE_TOO_SMALL == 0x87D01202
    assert keys(cache) == ["PSA.1", "PSB.1", "PSC.1"]
    # Exactly the size of the cache fits.
    assert [e.key for e in cache.make_room("PSD", 1, MIB).evicted] == ["PSA.1", "PSB.1", "PSC.1"]


def test_entries_in_use_are_never_evicted(cache, three):
    # reliability.md 40: the oldest is in use, so the next oldest goes.
    with cache.use(three[0]) as lease:
        assert cache.refcount("PSA.1") == 1
        assert cache.in_use(three[0])
        report = cache.make_room("PSD", 1, 400 * KB)
        assert [e.key for e in report.evicted] == ["PSB.1"]
        assert report.active == 1
        assert not lease.released
    assert cache.refcount("PSA.1") == 0
    assert not cache.in_use(three[0])
    assert keys(cache) == ["PSA.1", "PSC.1"]


def test_cache_full_when_what_could_go_is_in_use_and_nothing_is_evicted(cache, three):
    leases = [cache.acquire(e.package_id, e.version) for e in three[:2]]
    with pytest.raises(CacheSpaceError) as caught:
        cache.make_room("PSD", 1, 800 * KB)  # would need all three
    assert caught.value.hresult == codes.CACHE_FULL == 0x87D01201
    assert caught.value.report.active == 2
    # Freeing C alone would not have been enough: it is still there.
    assert keys(cache) == ["PSA.1", "PSB.1", "PSC.1"]
    for lease in leases:
        lease.release()
    assert [e.key for e in cache.make_room("PSD", 1, 800 * KB).evicted] == ["PSA.1", "PSB.1", "PSC.1"]


def test_entries_younger_than_the_keep_time_are_not_evicted(tmp_path, clock):
    cache = ClientCache(tmp_path / "c", size_mb=1, clock=clock, keep_minutes=10)
    for pkg, t in (("PSA", 100), ("PSB", 200), ("PSC", 300)):
        put(cache, clock, pkg, 300 * KB, t)
    clock.now = 600
    with pytest.raises(CacheSpaceError) as caught:
        cache.make_room("PSD", 1, 400 * KB)
    assert caught.value.hresult == codes.CACHE_FULL
    assert caught.value.report.expired == 0
    clock.now = 100 + 600  # A is now 10 minutes old
    assert [e.key for e in cache.make_room("PSD", 1, 400 * KB).evicted] == ["PSA.1"]


def test_last_use_survives_a_new_cache_object(tmp_path, cache, clock, three):
    # Persistent: the order is read from disk, not from memory.
    clock.now = 500
    cache.acquire("PSA", 1).release()
    again = ClientCache(cache.root, size_mb=1, clock=clock)
    assert [e.key for e in again.make_room("PSD", 1, 400 * KB).evicted] == ["PSB.1"]


def test_a_running_download_counts_what_it_reserved(tmp_path, cache, clock):
    other = ClientCache(cache.root, size_mb=1, clock=clock)
    with cache.download_lock("PSA", 1):
        cache.make_room("PSA", 1, 600 * KB)
        # Nothing written yet, but the space is promised to PSA's download.
        with pytest.raises(CacheSpaceError) as caught:
            other.make_room("PSB", 1, 600 * KB)
        assert caught.value.hresult == codes.CACHE_FULL
        assert caught.value.report.used == 600 * KB
    assert other.make_room("PSB", 1, 600 * KB).evicted == ()


def test_a_partial_download_nobody_runs_is_evicted_first(cache, clock, three):
    # A client killed mid-download left this; it is resumable, but nobody is resuming it now.
    partial = cache.root / ".staging" / "PSZ.1"
    partial.mkdir(parents=True)
    (partial / "big.wim.part").write_bytes(b"p" * 100 * KB)
    report = cache.make_room("PSD", 1, 140 * KB)  # 48,576 free: the partial's 100 kB suffice
    assert [(e.key, e.partial) for e in report.evicted] == [("PSZ.1", True)]
    assert keys(cache) == ["PSA.1", "PSB.1", "PSC.1"]
    assert not partial.exists()


def test_a_partial_download_in_progress_is_not_evicted(cache, clock, three):
    other = ClientCache(cache.root, size_mb=1, clock=clock)
    with other.staging("PSZ", 1) as staged:
        (staged / "big.wim.part").write_bytes(b"p" * 100 * KB)
        report = cache.make_room("PSD", 1, 250 * KB)
        assert [(e.key, e.partial) for e in report.evicted] == [("PSA.1", False)]
        assert (staged / "big.wim.part").exists()


# --- unit: leases --------------------------------------------------------------------------------


def test_lease_bookkeeping(cache, clock, three):
    a = cache.acquire("PSA", 1)
    b = cache.acquire("PSA", 1)
    assert cache.refcount("PSA.1") == 2
    a.release()
    a.release()  # idempotent
    assert cache.refcount("PSA.1") == 1
    assert cache.in_use(three[0])
    b.release()
    assert cache.refcount("PSA.1") == 0
    assert not cache.in_use(three[0])
    assert cache.acquire("PSX", 1) is None  # not cached: no lease, no count
    assert cache.refcount("PSX.1") == 0


def test_a_lease_in_another_cache_object_protects_the_entry(cache, clock, three):
    other = ClientCache(cache.root, size_mb=1, clock=clock)
    with other.use(three[0]):
        assert cache.in_use(three[0])
        assert cache.refcount("PSA.1") == 0  # counted where it is held
        assert [e.key for e in cache.make_room("PSD", 1, 400 * KB).evicted] == ["PSB.1"]


def test_use_of_an_evicted_entry_is_refused(cache, three):
    cache.make_room("PSD", 1, 400 * KB)
    with pytest.raises(LookupError, match=r"PSA\.1"):
        with cache.use(three[0]):
            pass


LEASE_HOLDER = """
import sys
from pathlib import Path
from pytest_cmg._client.cache import ClientCache
lease = ClientCache(Path(sys.argv[1]), size_mb=1).acquire("PSA", 1)
print("held" if lease else "miss", flush=True)
sys.stdin.read()
"""


def test_a_lease_held_by_another_process_protects_the_entry_until_it_dies(cache, three):
    holder = subprocess.Popen(
        [sys.executable, "-c", LEASE_HOLDER, str(cache.root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert cache.in_use(three[0])
        assert [e.key for e in cache.make_room("PSD", 1, 400 * KB).evicted] == ["PSB.1"]
    finally:
        holder.kill()
        holder.wait(timeout=10)
    # The kernel dropped the dead process's lock: nothing stays locked forever. (The child's use
    # made A the most recently used, on the real clock.)
    assert not cache.in_use(three[0])
    assert [e.key for e in cache.make_room("PSD", 1, 1000 * KB).evicted] == ["PSC.1", "PSA.1"]


# --- unit: staging -------------------------------------------------------------------------------


def test_staging_is_deterministic_and_survives_only_process_death(tmp_path):
    root = tmp_path / "ccmcache"
    with pytest.raises(KeyboardInterrupt), ClientCache(root).staging("PS100012", 3) as staged:
        assert staged == root / ".staging" / "PS100012.3"
        (staged / "install.wim.part").write_bytes(b"half")
        raise KeyboardInterrupt  # as good as a kill for the folder
    assert ClientCache(root).staging_leftovers() == [root / ".staging" / "PS100012.3"]
    # A new client (new object, as after a restart) finds the partial file where it was.
    with ClientCache(root).staging("PS100012", 3) as again:
        assert (again / "install.wim.part").read_bytes() == b"half"
    # Ended without a commit: removed.
    assert ClientCache(root).staging_leftovers() == []


def test_staging_is_removed_on_failure_and_on_commit(tmp_path):
    cache = ClientCache(tmp_path / "ccmcache")
    with pytest.raises(ContentError), cache.staging("PS100012", 1) as staged:
        (staged / "a.part").write_bytes(b"x")
        raise ContentError(codes.CONNECTION_ABORTED, "cut")
    assert cache.staging_leftovers() == []
    assert cache.entries() == []
    with cache.staging("PS100012", 1) as staged:
        (staged / "a").write_bytes(b"x")
        entry = cache.commit(staged, "PS100012", 1)
    assert cache.staging_leftovers() == []
    assert keys(cache) == ["PS100012.1"]
    assert (entry.path / "a").read_bytes() == b"x"


def test_entries_lists_only_committed_folders(tmp_path):
    cache = ClientCache(tmp_path / "ccmcache")
    (cache.root / "not-a-key").mkdir()
    (cache.root / "PS100012.x").mkdir()
    (cache.root / "PS100099.1").write_text("a file, not an entry")
    with cache.staging("PS100012", 1) as staged:
        (staged / "a").write_bytes(b"x")
        # Staged but not committed: not an entry.
        assert cache.entries() == [] and cache.lookup("PS100012", 1) is None
        cache.commit(staged, "PS100012", 1)
    assert keys(cache) == ["PS100012.1"]


def test_two_downloads_of_the_same_content_take_turns(tmp_path):
    root = tmp_path / "ccmcache"
    first, second = ClientCache(root), ClientCache(root)
    order: list[str] = []
    entered, waiting = threading.Event(), threading.Event()

    def downloader() -> None:
        with first.staging("PS100012", 1) as staged:
            entered.set()
            assert waiting.wait(10)
            (staged / "a").write_bytes(b"1")
            first.commit(staged, "PS100012", 1)
            order.append("first committed")

    thread = threading.Thread(target=downloader)
    thread.start()
    try:
        assert entered.wait(10)
        with second.download_lock("PS100012", 1, on_wait=waiting.set):
            order.append("second has the lock")
            assert second.lookup("PS100012", 1) is not None
            with second.staging("PS100012", 1):  # held already: no second lock, no deadlock
                pass
    finally:
        thread.join(10)
    assert order == ["first committed", "second has the lock"]


def test_waiting_for_another_download_is_bounded(tmp_path):
    root = tmp_path / "ccmcache"
    impatient = ClientCache(root, lock_timeout=0.2)
    with ClientCache(root).download_lock("PS100012", 1):
        started = time.monotonic()
        with pytest.raises(ContentError) as caught, impatient.download_lock("PS100012", 1):
            pass
    assert caught.value.hresult == CACHE_IN_USE == 0x87D01203
    assert time.monotonic() - started < 5


# --- against Azurite and the FakeCMG ------------------------------------------------------------


def data(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def storage_requests(proxy, package_id: str) -> list:
    proxy.wait_idle(10)
    return [e for e in proxy.log if f"/{package_id}." in e.path]


def assert_verified(cache: ClientCache, manifest) -> None:
    entry = cache.lookup(manifest.package_id, manifest.version)
    assert entry is not None, f"{manifest.package_id} is not cached"
    for item in manifest.files:
        assert hashlib.sha256((entry.path / item.relpath).read_bytes()).hexdigest() == item.sha256


def test_reuse_makes_no_network_request_at_all(cmg, cmg_client, cloud_dp, storage_faults):
    cloud_dp.distribute("PS100012", 1, {"a.bin": data(300 * KB, 1)})
    engine = cmg_client()
    assert engine.run(one_step("PS100012")).succeeded
    cmg.log.clear()
    storage_faults.clear()
    again = engine.run(one_step("PS100012"))
    assert again.succeeded
    cmg.log.assert_no_requests()
    assert storage_faults.log == []
    assert [(t.from_cache, t.bytes) for t in again.transfers] == [(True, 0)]
    assert "CacheManager: Content PS100012.1 found in cache at " in "\n".join(engine.log.messages)


def test_too_large_for_the_cache_fails_before_any_storage_request(cmg, cmg_client, cloud_dp, storage_faults):
    # reliability.md 38.
    cloud_dp.distribute("PS100012", 1, {"big.bin": data(MIB + 1, 2)})
    engine = cmg_client(cache_mb=1)
    result = engine.run(one_step("PS100012"))
    assert result.exit_code == codes.CACHE_TOO_SMALL
    assert storage_faults.log == []
    cmg.log.assert_request_made("location", count=1)  # not retried by the task sequence
    text = "\n".join(engine.log.messages)
    assert "the total cache size is smaller than the size of the package content" in text
    assert "The current cache size is 1 MB" in text and "requires 2 MB" in text
    assert "CAS: Download failed for content PS100012.1 under context System, error 0x87d01202" in text
    assert "TSManager: Task sequence execution failed with error code 0x87D01202" in text
    assert engine.cache.entries() == [] and engine.cache.staging_leftovers() == []


@pytest.fixture
def three_packages(cloud_dp):
    return {
        "PS100012": cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(MIB, 3), "setup.exe": b"MZ"}),
        "PS100013": cloud_dp.distribute("PS100013", 1, {"drivers.cab": data(MIB, 4)}),
        "PS100014": cloud_dp.distribute("PS100014", 1, {"lp/fr-fr.cab": data(3 * MIB // 2, 5)}),
    }


def test_eviction_makes_room_without_any_network_traffic_for_what_it_removes(
    cmg, cmg_client, three_packages, storage_faults
):
    engine = cmg_client(cache_mb=3)
    first = TaskSequence(
        "PS100020", "Two", (Step("OS", "upgrade_os", "PS100012"), Step("Drivers", "apply_driver_package", "PS100013"))
    )
    assert engine.run(first).succeeded
    assert keys(engine.cache) == ["PS100012.1", "PS100013.1"]
    cmg.log.clear()
    storage_faults.clear()
    result = engine.run(one_step("PS100014"))
    assert result.succeeded, result.error
    # PS100012 was used least recently: it went, PS100013 stayed and still verifies.
    assert keys(engine.cache) == ["PS100013.1", "PS100014.1"]
    assert_verified(engine.cache, three_packages["PS100013"])
    assert_verified(engine.cache, three_packages["PS100014"])
    assert {r.package_id for r in cmg.log.entries} == {"PS100014"}
    assert all("/PS100014.1/" in e.path for e in storage_faults.log)
    messages = engine.log.messages
    assert any(
        m.startswith("CacheManager: DELETE cache entry for id:PS100012 Version : 1 Size : 1024K") for m in messages
    )
    assert any(m.startswith("CacheManager: There are currently ") and "(2 total, 0 active" in m for m in messages)
    deleted = next(i for i, m in enumerate(messages) if "DELETE cache entry" in m)
    job = next(i for i, m in enumerate(messages) if m.startswith("DataTransferService: Job: PS100014.1"))
    assert deleted < job  # room first, bytes after


def test_download_all_holds_its_content_so_it_cannot_evict_it(
    cmg, cmg_client, cloud_dp, three_packages, storage_faults
):
    # reliability.md 40 through the engine: with "download all content before starting" the
    # first package is in use while the second downloads, so there is no room (3 MB cache).
    from pytest_cmg import DeploymentSettings, DownloadMode

    cloud_dp.distribute("PS100015", 1, {"lp/all.cab": data(5 * MIB // 2, 14)})  # 2.5 MiB
    sequence = TaskSequence(
        "PS100020", "Two", (Step("OS", "upgrade_os", "PS100012"), Step("LP", "run_command_line", "PS100015"))
    )
    engine = cmg_client(cache_mb=3, deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    assert engine.run(one_step("PS100013")).succeeded  # an unused entry eviction may take
    result = engine.run(sequence)
    assert result.exit_code == codes.CACHE_FULL
    assert result.steps_run == []
    messages = engine.log.messages
    for line in ("CAS: Not enough non-active cache to delete", "CAS: Not enough space in Cache",
                 "CAS: CreateContentRequest failed",
                 "CAS: Download failed for content PS100015.1 under context System, error 0x87d01201"):
        assert line in messages
    assert any("(2 total, 1 active, 0 tombstoned, 1 expired)" in m for m in messages)
    # Evicting PS100013 (not in use) would not have been enough, so it was not evicted; PS100012
    # is in use; nothing of PS100015 was fetched.
    assert keys(engine.cache) == ["PS100012.1", "PS100013.1"]
    assert_verified(engine.cache, three_packages["PS100012"])
    assert storage_requests(storage_faults, "PS100015") == []
    assert engine.cache.staging_leftovers() == []

    # On demand, a step holds its package only while it runs: the same sequence fits.
    on_demand = cmg_client(cache_mb=3, name="on-demand")
    result = on_demand.run(sequence)
    assert result.succeeded, result.error
    assert keys(on_demand.cache) == ["PS100015.1"]
    # Nothing stays held once the task sequence is over.
    assert not any(on_demand.cache.in_use(e) for e in on_demand.cache.entries())


# --- ENOSPC (reliability.md 39) ------------------------------------------------------------------


class DiskBudget:
    """Writes into the cache's staging area fail with ENOSPC once ``budget`` bytes were written.

    Installed on the write paths a download core may use: ``os.write``/``os.pwrite`` (and their
    vectored forms) on descriptors of files under ``.staging``, and file objects from
    ``Path.open``/``open``. Every other write is untouched.
    """

    def __init__(self, monkeypatch, budget: int) -> None:
        self.budget = budget
        self.written = 0
        self.refused = 0
        self._lock = threading.Lock()
        real_path_open, real_open = Path.open, builtins.open

        def path_open(path, mode="r", *args, **kwargs):
            return self._wrap(path, mode, real_path_open(path, mode, *args, **kwargs))

        def plain_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            return self._wrap(file, mode, handle) if isinstance(file, str | Path) else handle

        monkeypatch.setattr(Path, "open", path_open)
        monkeypatch.setattr(builtins, "open", plain_open)
        for name in ("write", "pwrite", "writev", "pwritev"):
            if hasattr(os, name):
                monkeypatch.setattr(os, name, self._fd_writer(getattr(os, name), name.endswith("v")))

    def _fd_writer(self, real, vectored: bool):
        def write(fd, data, *rest):
            if _in_staging(fd):
                self.take(sum(memoryview(b).nbytes for b in data) if vectored else memoryview(data).nbytes)
            return real(fd, data, *rest)

        return write

    def _wrap(self, path, mode, handle):
        if ".staging" in Path(path).parts and any(flag in mode for flag in "wax+"):
            return _Limited(handle, self)
        return handle

    def take(self, size: int) -> None:
        with self._lock:
            if self.written + size > self.budget:
                self.refused += 1
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += size


def _in_staging(fd: int) -> bool:
    try:
        return "/.staging/" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


class _Limited:
    def __init__(self, handle, budget: DiskBudget) -> None:
        self._handle = handle
        self._budget = budget

    def write(self, chunk) -> int:
        self._budget.take(len(chunk))
        return self._handle.write(chunk)

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()


def test_enospc_mid_write_fails_cleanly_and_a_retry_succeeds_after_space_frees(
    cmg, cmg_client, cloud_dp, monkeypatch
):
    kept = cloud_dp.distribute("PS100013", 1, {"drivers.cab": data(300 * KB, 6)})
    wanted = cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(MIB, 7), "os/boot.wim": data(MIB, 8)})
    engine = cmg_client()
    assert engine.run(one_step("PS100013")).succeeded
    disk = DiskBudget(monkeypatch, budget=600 * KB)
    result = engine.run(one_step("PS100012"))
    assert disk.refused > 0, "the download core writes some other way: adapt DiskBudget"
    assert result.exit_code == codes.CACHE_FULL, result.error
    assert "disk is full" in str(result.error)
    assert engine.cache.staging_leftovers() == []
    assert keys(engine.cache) == ["PS100013.1"]
    assert_verified(engine.cache, kept)
    messages = engine.log.messages
    assert any(m.startswith("DataTransferService: Failed to write content PS100012.1") and "0x80070070" in m
               for m in messages)
    assert "CAS: Download failed for content PS100012.1 under context System, error 0x87d01201" in messages
    cmg.log.assert_request_made("location", count=1, package_id="PS100012")  # not retried
    monkeypatch.undo()  # space is free again
    again = engine.run(one_step("PS100012"))
    assert again.succeeded, again.error
    assert keys(engine.cache) == ["PS100012.1", "PS100013.1"]
    assert_verified(engine.cache, wanted)
    assert_verified(engine.cache, kept)


def _connection(cmg, client_id: str) -> dict[str, str]:
    return {
        "cmg_url": cmg.url, "ca_cert": str(cmg.ca_pem), "site_code": cmg.site_code,
        "mp_role_id": cmg.role_id, "client_id": client_id, "token": cmg.issue_token(client_id),
    }


def _driver_command(config: dict, path: Path) -> list[str]:
    path.write_text(json.dumps(config))
    return [sys.executable, str(Path(__file__).resolve()), str(path)]


def _unshare_available() -> str | None:
    """Why a private tmpfs cannot be mounted here, or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare(1) is not installed"
    probe = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    if probe.returncode != 0:
        return f"unshare -rm cannot mount a tmpfs here: {probe.stderr.strip() or probe.returncode}"
    return None


def test_real_enospc_in_a_private_tmpfs(cmg, cloud_dp, tmp_path):
    # reliability.md 39 with the kernel's own ENOSPC: an 8 MiB tmpfs, private to the client's
    # mount namespace, holds the cache; a filler leaves less room than the package needs.
    reason = _unshare_available()
    if reason:
        pytest.skip(reason)
    kept = cloud_dp.distribute("PS100013", 1, {"drivers.cab": data(2 * MIB, 9)})
    wanted = cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(3 * MIB, 10), "os/boot.wim": data(MIB, 11)})
    mount = tmp_path / "disk"
    mount.mkdir()
    config = {
        "connection": _connection(cmg, "GUID:tmpfs"),
        "cache": str(mount / "ccmcache"),
        "log": str(tmp_path / "smsts.log"),  # outside the full disk
        "actions": [
            {"do": "run", "package": "PS100013"},
            {"do": "fill", "path": str(mount / "filler"), "bytes": 3 * MIB},
            {"do": "run", "package": "PS100012"},
            {"do": "remove", "path": str(mount / "filler")},
            {"do": "run", "package": "PS100012"},
        ],
    }
    command = [
        "unshare", "-rm", "sh", "-c", 'mount -t tmpfs -o size=8m tmpfs "$0" && exec "$@"',
        str(mount), *_driver_command(config, tmp_path / "config.json"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    first, full, retried = json.loads(done.stdout.strip().splitlines()[-1])
    assert first["exit_code"] == 0 and first["entries"] == ["PS100013.1"]
    assert full["exit_code"] == codes.CACHE_FULL, full["error"]
    assert "No space left on device" in full["error"]
    assert full["entries"] == ["PS100013.1"]
    assert full["leftovers"] == []
    assert full["hashes"]["PS100013.1"] == {f.relpath: f.sha256 for f in kept.files}
    assert retried["exit_code"] == 0, retried["error"]
    assert retried["entries"] == ["PS100012.1", "PS100013.1"]
    assert retried["hashes"]["PS100012.1"] == {f.relpath: f.sha256 for f in wanted.files}
    assert retried["hashes"]["PS100013.1"] == {f.relpath: f.sha256 for f in kept.files}
    assert retried["leftovers"] == []
    smsts = (tmp_path / "smsts.log").read_text()
    assert "There is not enough space on the disk. (0x80070070)" in smsts
    # The tmpfs was private: nothing of it is visible here.
    assert list(mount.iterdir()) == []


# --- a client killed mid-download --------------------------------------------------------------


def test_a_killed_client_leaves_its_staging_for_the_next_run_and_no_lock(cmg, cloud_dp, tmp_path):
    manifest = cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(4 * MIB, 15)})
    cache_root = tmp_path / "ccmcache"
    base = {"connection": _connection(cmg, "GUID:killed"), "cache": str(cache_root)}
    killed = {**base, "log": str(tmp_path / "first.log"),
              "actions": [{"do": "run", "package": "PS100012", "die_after_bytes": MIB}]}
    done = subprocess.run(_driver_command(killed, tmp_path / "killed.json"), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr
    cache = ClientCache(cache_root, lock_timeout=1.0)
    # The partial download is where the next run looks for it; nothing unverified is an entry.
    assert cache.staging_leftovers() == [cache_root / ".staging" / "PS100012.1"]
    assert any((cache_root / ".staging" / "PS100012.1").rglob("*"))
    assert cache.entries() == []
    # The dead client's locks went with it.
    with cache.download_lock("PS100012", 1):
        pass
    again = {**base, "log": str(tmp_path / "second.log"), "actions": [{"do": "run", "package": "PS100012"}]}
    done = subprocess.run(_driver_command(again, tmp_path / "again.json"), capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    [result] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["exit_code"] == 0, result["error"]
    assert result["leftovers"] == []
    assert result["hashes"]["PS100012.1"] == {f.relpath: f.sha256 for f in manifest.files}


# --- one download for two requests (reliability.md 41) -----------------------------------------


def test_two_engines_asking_at_once_make_one_download(cmg, cmg_client, cloud_dp, storage_faults, tmp_path):
    manifest = cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(2 * MIB, 12), "setup.exe": b"MZ"})
    shared = tmp_path / "shared-ccmcache"
    engines = [cmg_client(name="a"), cmg_client(name="b")]
    for engine, peer in ((engines[0], engines[1]), (engines[1], engines[0])):
        engine.cache = ClientCache(shared)  # one object each, as two clients would have
        engine.system_drive = tmp_path  # the shared cache is on both clients' C: (winpath)

        def hold_until_peer_waits(*_, peer=peer) -> None:
            # The download has begun: keep it going until the other request is waiting for it.
            wait_until(lambda: any(WAITING in m for m in peer.log.messages), what="the peer to wait")

        engine.on_job = hold_until_peer_waits
    results: dict[int, object] = {}
    start = threading.Barrier(2, timeout=10)

    def run(index: int) -> None:
        start.wait()
        results[index] = engines[index].run(one_step("PS100012"))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [0, 1]
    assert all(r.succeeded for r in results.values()), [r.error for r in results.values()]
    assert sorted(r.transfers[0].from_cache for r in results.values()) == [False, True]
    # One location request, one manifest, one GET per file.
    cmg.log.assert_request_made("location", count=1, package_id="PS100012")
    assert cmg.log.count("manifest") == 1
    assert len(storage_requests(storage_faults, "PS100012")) == len(manifest.files)
    waiter = next(e for i, e in enumerate(engines) if results[i].transfers[0].from_cache)
    waited = waiter.log.messages
    assert waited.index(next(m for m in waited if WAITING in m)) < waited.index(
        next(m for m in waited if "found in cache" in m)
    )
    assert_verified(ClientCache(shared), manifest)
    assert ClientCache(shared).staging_leftovers() == []


def test_two_processes_asking_at_once_make_one_download(cmg, cloud_dp, storage_faults, tmp_path):
    manifest = cloud_dp.distribute("PS100012", 1, {"os/install.wim": data(2 * MIB, 13)})
    shared = tmp_path / "shared-ccmcache"
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    commands = []
    for index in range(2):
        config = {
            "connection": _connection(cmg, f"GUID:proc{index}"),
            "cache": str(shared),
            "log": str(logs[index]),
            "peer_log": str(logs[1 - index]),
            "actions": [{"do": "run", "package": "PS100012"}],
        }
        commands.append(_driver_command(config, tmp_path / f"config{index}.json"))
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            outputs.append(json.loads(out.strip().splitlines()[-1])[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert [o["exit_code"] for o in outputs] == [0, 0]
    assert sorted(o["from_cache"] for o in outputs) == [False, True]
    cmg.log.assert_request_made("location", count=1, package_id="PS100012")
    assert len(storage_requests(storage_faults, "PS100012")) == len(manifest.files)
    assert all(o["hashes"]["PS100012.1"] == {f.relpath: f.sha256 for f in manifest.files} for o in outputs)
    assert any(WAITING in log.read_text() for log in logs)


# --- the subprocess client ------------------------------------------------------------------------


def _driver(config_path: str) -> None:
    """Run the actions of a JSON config with a client engine; print one JSON list of results."""
    from pytest_cmg import CMGConnection, SmstsLog
    from pytest_cmg._client.factory import build_engine
    from pytest_cmg._client.retry import VirtualTime

    config = json.loads(Path(config_path).read_text())
    connection = dict(config["connection"])
    connection["ca_cert"] = Path(connection["ca_cert"])
    log_path = Path(config["log"])
    cache = ClientCache(Path(config["cache"]))
    engine = build_engine(
        CMGConnection(**connection),
        log_path.parent,
        log=SmstsLog(log_path),
        cache=cache,
        retry=VirtualTime().policy(),
    )
    peer = config.get("peer_log")
    if peer:
        def hold_until_peer_waits(*_) -> None:
            path = Path(peer)
            wait_until(lambda: path.exists() and WAITING in path.read_text(), what="the peer")

        engine.on_job = hold_until_peer_waits
    results = []
    try:
        for action in config["actions"]:
            if action["do"] == "fill":
                with Path(action["path"]).open("wb") as filler:
                    filler.write(b"\0" * action["bytes"])
            elif action["do"] == "remove":
                Path(action["path"]).unlink()
            else:
                if "die_after_bytes" in action:
                    engine.core.on_progress = _die_after(action["die_after_bytes"])
                result = engine.run(one_step(action["package"]))
                results.append({
                    "exit_code": result.exit_code,
                    "error": str(result.error) if result.error else None,
                    "from_cache": bool(result.transfers and result.transfers[0].from_cache),
                    "entries": keys(cache),
                    "leftovers": [p.name for p in cache.staging_leftovers()],
                    "hashes": {
                        e.key: {
                            str(p.relative_to(e.path)): hashlib.sha256(p.read_bytes()).hexdigest()
                            for p in sorted(e.path.rglob("*")) if p.is_file()
                        }
                        for e in cache.entries()
                    },
                })
    finally:
        engine.close()
    print(json.dumps(results), flush=True)


def _die_after(limit: int):
    """An ``on_progress`` that kills this process (SIGKILL: no cleanup at all) after ``limit`` bytes."""
    received = [0]
    lock = threading.Lock()

    def on_progress(new_bytes: int, files_done: int) -> None:
        with lock:
            received[0] += new_bytes
            if received[0] >= limit:
                os.kill(os.getpid(), signal.SIGKILL)

    return on_progress


if __name__ == "__main__":
    _driver(sys.argv[1])
