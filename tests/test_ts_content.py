"""Where task sequence content lives: the TS cache, SMSTSPersistContent, SMSTSPreserveContent and
Download Package Content destinations (protocol.md 1.7, "Storage locations").

Unit tests cover the task sequence cache and the client cache's pins and releases on their own;
the others run the engine against real Azurite and the running FakeCMG and look at what the
network saw (location requests, storage bytes) and what is left on disk.
"""

from __future__ import annotations

import hashlib

import pytest

from pytest_cmg import ContentError, DeploymentSettings, DownloadMode, Step, TaskSequence
from pytest_cmg._client.cache import CACHE_IN_USE, CacheSpaceError, ClientCache
from pytest_cmg._client.engine import ContentDestination, custom_path_parts
from pytest_cmg._client.tscache import TaskSequenceCache
from pytest_cmg._protocol import codes

KB = 1000
MIB = 1024 * 1024
BOOT_MEDIA = "boot_media"
DPC = "download_package_content"


def data(size: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def put(cache: ClientCache, package_id: str, size: int, version: int = 1):
    with cache.staging(package_id, version) as staged:
        (staged / "content.bin").write_bytes(b"x" * size)
        return cache.commit(staged, package_id, version)


def keys(cache: ClientCache) -> list[str]:
    return [e.key for e in cache.entries()]


def sequence(*steps: Step, **variables: str) -> TaskSequence:
    return TaskSequence("PS100020", "Content", steps, variables=dict(variables))


def assert_matches(folder, manifest) -> None:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == sorted(f.relpath for f in manifest.files)
    for item in manifest.files:
        assert hashlib.sha256((folder / item.relpath).read_bytes()).hexdigest() == item.sha256


def messages(engine) -> str:
    return "\n".join(engine.log.messages)


# --- unit: the task sequence cache ---------------------------------------------------------------


def test_the_ts_cache_has_no_size_of_its_own_and_never_evicts(tmp_path):
    ts = TaskSequenceCache(tmp_path / "_SMSTaskSequence")
    assert ts.root == tmp_path / "_SMSTaskSequence" / "Packages"
    put(ts, "PSA", 300 * KB)
    report = ts.make_room("PSB", 1, 10 * 1024 * MIB)  # far more than any client cache
    assert report.evicted == ()
    assert keys(ts) == ["PSA.1"]


def test_ts_cache_remove_take_and_clear(tmp_path):
    ts = TaskSequenceCache(tmp_path / "_SMSTaskSequence")
    a, b, c = (put(ts, pkg, 10 * KB) for pkg in ("PSA", "PSB", "PSC"))
    assert ts.remove(a) is True
    assert ts.remove(a) is False  # already gone
    destination = tmp_path / "Drivers" / "PSB"
    destination.mkdir(parents=True)
    (destination / "stale.txt").write_text("from an earlier run")
    ts.take(b, destination)
    assert sorted(p.name for p in destination.iterdir()) == ["content.bin"]  # replaced, not merged
    assert keys(ts) == ["PSC.1"]
    assert [e.key for e in ts.clear()] == ["PSC.1"]
    assert keys(ts) == [] and ts.staging_leftovers() == []
    assert not c.path.exists()
    # Nothing half-moved or half-deleted is left next to the destination.
    assert sorted(p.name for p in destination.parent.iterdir()) == ["PSB"]


def test_ts_cache_does_not_delete_content_someone_holds(tmp_path):
    ts = TaskSequenceCache(tmp_path / "_SMSTaskSequence", lock_timeout=0.1)
    entry = put(ts, "PSA", 10 * KB)
    lease = ts.acquire("PSA", 1)
    assert lease is not None
    with pytest.raises(ContentError) as caught:
        ts.remove(entry)
    assert caught.value.hresult == CACHE_IN_USE
    assert entry.path.is_dir()
    lease.release()
    assert ts.remove(entry)


def test_ts_cache_folders_are_named_after_the_package_with_the_version_beside_them(tmp_path):
    ts = TaskSequenceCache(tmp_path / "_SMSTaskSequence")
    entry = put(ts, "PS100012", 10 * KB, version=3)
    # The product's folder: _SMSTaskSequence\Packages\PS100012, no version in its name.
    assert entry.path == ts.root / "PS100012"
    assert sorted(p.name for p in ts.root.iterdir() if not p.name.startswith(".")) == ["PS100012"]
    assert ts.version_in("PS100012") == 3 and entry.key == "PS100012.3"
    assert ts.lookup("PS100012", 3) == entry
    assert ts.lookup("PS100012", 2) is None  # the folder holds version 3, not 2
    # Another object on the same folder (the next boot) reads the same version.
    again = TaskSequenceCache(tmp_path / "_SMSTaskSequence")
    assert [e.key for e in again.entries()] == ["PS100012.3"]
    lease = again.acquire("PS100012", 3)
    assert lease is not None and lease.entry.path == entry.path
    lease.release()
    assert again.acquire("PS100012", 2) is None
    # A folder nobody recorded (not this cache's doing) is not content.
    (ts.root / "PS1000FF").mkdir()
    assert keys(ts) == ["PS100012.3"]


def test_a_new_version_replaces_the_package_folder_whole(tmp_path):
    ts = TaskSequenceCache(tmp_path / "_SMSTaskSequence", lock_timeout=0.1)
    with ts.staging("PS100012", 1) as staged:
        (staged / "old-only.bin").write_bytes(b"1" * 100)
        (staged / "both.bin").write_bytes(b"1" * 100)
        old = ts.commit(staged, "PS100012", 1)
    # Version 2 cannot replace version 1 while a step holds version 1.
    lease = ts.acquire("PS100012", 1)
    assert lease is not None
    with ts.staging("PS100012", 2) as staged:
        (staged / "both.bin").write_bytes(b"2" * 200)
        with pytest.raises(ContentError) as caught:
            ts.commit(staged, "PS100012", 2)
        assert caught.value.hresult == CACHE_IN_USE
        assert ts.lookup("PS100012", 1) == old and (old.path / "old-only.bin").is_file()
        lease.release()
        new = ts.commit(staged, "PS100012", 2)
    # Never mixed: only version 2's files, and only version 2 is found.
    assert new.path == old.path
    assert sorted(p.name for p in new.path.iterdir()) == ["both.bin"]
    assert (new.path / "both.bin").read_bytes() == b"2" * 200
    assert keys(ts) == ["PS100012.2"] and ts.lookup("PS100012", 1) is None
    assert ts.remove(old) is False  # version 1 is gone; version 2 stays
    assert keys(ts) == ["PS100012.2"]
    assert [e.key for e in ts.clear()] == ["PS100012.2"] and ts.version_in("PS100012") is None


# --- unit: pins and releases in the client cache -------------------------------------------------


def test_a_pinned_entry_is_never_evicted_and_the_pin_outlives_the_process(tmp_path):
    clock = Clock()
    cache = ClientCache(tmp_path / "ccmcache", size_mb=1, clock=clock)
    a = put(cache, "PSA", 400 * KB)
    clock.now += 10
    b = put(cache, "PSB", 400 * KB)
    cache.pin(a)
    # Another ClientCache on the same folder (another process) sees the pin.
    other = ClientCache(tmp_path / "ccmcache", size_mb=1, clock=clock)
    assert other.is_pinned(a) and other.pinned() == ["PSA.1"]
    report = other.make_room("PSC", 1, 500 * KB)
    # A is the least recently used, but pinned: B goes instead.
    assert [e.key for e in report.evicted] == ["PSB.1"]
    assert report.pinned == 1
    assert not b.path.exists() and a.path.is_dir()
    with pytest.raises(CacheSpaceError) as caught:
        other.make_room("PSD", 1, 800 * KB)  # only evicting the pinned entry would do
    assert caught.value.hresult == codes.CACHE_FULL
    assert "1 pinned" in str(caught.value)
    other.unpin(a)
    assert [e.key for e in other.make_room("PSD", 1, 800 * KB).evicted] == ["PSA.1"]


def test_expire_makes_an_entry_evictable_at_once_and_keeps_lru_order(tmp_path):
    clock = Clock()
    cache = ClientCache(tmp_path / "ccmcache", size_mb=1, keep_minutes=1440, clock=clock)
    a = put(cache, "PSA", 300 * KB)
    clock.now += 60
    b = put(cache, "PSB", 300 * KB)
    clock.now += 60
    put(cache, "PSC", 300 * KB)
    # Everything was used within the keep time: nothing may go.
    with pytest.raises(CacheSpaceError):
        cache.make_room("PSD", 1, 400 * KB)
    cache.expire(b)
    cache.expire(a)
    assert cache.last_used(a) < cache.last_used(b)  # released, in their order of last use
    report = cache.make_room("PSD", 1, 400 * KB)
    assert [e.key for e in report.evicted] == ["PSA.1"]
    assert keys(cache) == ["PSB.1", "PSC.1"]


# --- unit: Download Package Content options ------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "parts"),
    [
        ("C:\\Drivers\\HP", ("Drivers", "HP")),
        ("\\Drivers\\HP\\", ("Drivers", "HP")),
        ("Drivers/HP", ("Drivers", "HP")),
        ("d:/OSD", ("OSD",)),
    ],
)
def test_custom_paths_map_below_the_system_drive(path, parts):
    assert custom_path_parts(path) == parts


@pytest.mark.parametrize("path", ["", "C:\\", "..\\etc", "Drivers/../../x", "."])
def test_custom_paths_that_leave_the_drive_are_refused(path):
    with pytest.raises(ValueError, match=r"without '\.\.'"):
        custom_path_parts(path)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"action": "upgrade_os", "destination": "ts_cache"}, "belong to download_package_content"),
        ({"action": "run_command_line", "variable": "X"}, "belong to"),
        ({"action": DPC, "destination": "custom"}, "needs a path"),
        ({"action": DPC, "destination": "ts_cache", "path": "D"}, "needs a path"),
        ({"action": DPC, "destination": "tape"}, "must be one of"),
        ({"action": "upgrade_os", "extra_packages": ("PS100014",)}, "belong to"),
        ({"action": DPC, "extra_packages": ("PS100013",)}, "listed twice"),
    ],
)
def test_step_options_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Step("S", package="PS100013", **kwargs)


def test_extra_packages_follow_a_first_one():
    with pytest.raises(ValueError, match="after a first package"):
        Step("S", DPC, extra_packages=("PS100014",))
    step = Step("S", DPC, "PS100013", extra_packages=("PS100014", "PS100015"))
    assert step.packages == ("PS100013", "PS100014", "PS100015")
    assert Step("S", "run_command_line").packages == ()


# --- engine: Windows PE and SMSTSPersistContent --------------------------------------------------


@pytest.fixture
def os_package(cloud_dp):
    return cloud_dp.distribute(
        "PS100012", 1, {"sources/install.wim": data(600 * KB, 1), "setup.exe": b"MZ" * 50}
    )


@pytest.fixture
def drivers(cloud_dp):
    return cloud_dp.distribute(
        "PS100013", 1, {"hp/net.inf": data(3 * KB, 2), "hp/net.sys": data(90 * KB, 3)}
    )


TWICE = (Step("Apply", "upgrade_os", "PS100012"), Step("Check", "run_command_line", "PS100012"))


def test_windows_pe_deletes_content_after_its_step_without_persist(cmg, cmg_client, os_package):
    engine = cmg_client()
    result = engine.run(sequence(*TWICE), launch=BOOT_MEDIA)
    assert result.succeeded, result.error
    # Deleted after "Apply", so "Check" located and downloaded it again.
    assert cmg.log.count("location") == 2
    assert result.bytes_from_storage("PS100012") == 2 * os_package.total_size
    assert result.ts_cache == []
    # Never in ccmcache; nothing left in the working directory either.
    assert engine.cache.entries() == []
    assert engine.ts_cache.entries() == [] and engine.ts_cache.staging_leftovers() == []
    text = messages(engine)
    assert "CacheManager: ADD new cache entry" not in text
    assert text.count("the step that used it is done (SMSTSPersistContent is not set)") == 2
    location = engine.variables["_SMSTSLastContentDownloadLocation"]
    assert location == "C:\\_SMSTaskSequence\\Packages\\PS100012"


def test_windows_pe_keeps_content_for_the_run_with_persist(cmg, cmg_client, os_package):
    engine = cmg_client()
    result = engine.run(sequence(*TWICE, SMSTSPersistContent="True"), launch=BOOT_MEDIA)
    assert result.succeeded, result.error
    assert cmg.log.count("location") == 1
    assert result.bytes_from_storage("PS100012") == os_package.total_size
    assert [t.from_cache for t in result.transfers] == [False, True]
    assert result.ts_cache == ["PS100012.1"]
    # Emptied at the end of the run, however long it was kept.
    assert engine.ts_cache.entries() == []
    assert engine.cache.entries() == []
    assert "found in the task sequence cache" in messages(engine)


def test_persisted_content_is_removed_even_when_a_later_step_fails(cmg, cmg_client, os_package):
    engine = cmg_client()
    steps = (TWICE[0], Step("Missing", "run_command_line", "PS1000FF"))
    result = engine.run(sequence(*steps, SMSTSPersistContent="true"), launch=BOOT_MEDIA)
    assert result.exit_code == codes.NO_LOCATIONS
    assert result.ts_cache == ["PS100012.1"]
    assert engine.ts_cache.entries() == []


def test_a_hash_failure_in_windows_pe_leaves_nothing_anywhere(cmg, cmg_client, cloud_dp, os_package):
    cloud_dp._container.upload_blob(
        cloud_dp.blob_name("PS100012", 1, "setup.exe"), b"MZ" * 49 + b"XX", overwrite=True
    )
    engine = cmg_client()
    result = engine.run(sequence(TWICE[0]), launch=BOOT_MEDIA)
    assert result.exit_code == codes.HASH_MISMATCH
    assert engine.ts_cache.entries() == [] and engine.ts_cache.staging_leftovers() == []
    assert engine.cache.entries() == [] and engine.cache.staging_leftovers() == []


def test_download_all_in_windows_pe_goes_to_the_ts_cache(cmg, cmg_client, os_package, drivers):
    engine = cmg_client(deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START))
    steps = (Step("Drivers", "apply_driver_package", "PS100013"), *TWICE)
    result = engine.run(sequence(*steps), launch=BOOT_MEDIA)
    assert result.succeeded, result.error
    assert engine.cache.entries() == []
    # Both were fetched before the first step; PS100012 left after "Apply", so "Check" had to
    # fetch it again: download-all does not persist content either.
    assert cmg.log.count("location", package_id="PS100012") == 2
    assert cmg.log.count("location", package_id="PS100013") == 1
    text = messages(engine)
    first_step = text.index("Start executing an instruction")
    assert text.index("Saved content PS100013.1 in the task sequence") < first_step
    assert text.index("Saved content PS100012.1 in the task sequence") < first_step


# --- engine: SMSTSPreserveContent ----------------------------------------------------------------


ONE_OS = sequence(Step("Apply", "upgrade_os", "PS100012"))


def test_without_preserve_what_the_sequence_downloaded_is_released(cmg, cmg_client, os_package):
    engine = cmg_client(cache_mb=1)
    engine.cache.keep_minutes = 1440  # the product's default minimum keep time
    assert engine.run(ONE_OS).succeeded
    entry = engine.cache.lookup("PS100012", 1)
    assert entry is not None and not engine.cache.is_pinned(entry)
    assert not engine.cache.in_use(entry)
    assert "eligible for deletion (SMSTSPreserveContent is not set)" in messages(engine)
    # Used a moment ago, yet released: room for other content may take it despite the keep time.
    report = engine.cache.make_room("PS1000AA", 1, 800 * KB)
    assert [e.key for e in report.evicted] == ["PS100012.1"]


def test_content_found_in_the_cache_is_not_released_by_the_sequence(cmg, cmg_client, os_package):
    engine = cmg_client(cache_mb=1)
    assert engine.run(ONE_OS).succeeded
    engine.cache.keep_minutes = 1440
    entry = engine.cache.lookup("PS100012", 1)
    engine.cache.touch(entry)  # pre-cached, say: used within the keep time
    again = engine.run(ONE_OS)
    assert again.transfers[0].from_cache
    # This run downloaded nothing, so it releases nothing: the keep time protects the entry.
    with pytest.raises(CacheSpaceError):
        engine.cache.make_room("PS1000AA", 1, 800 * KB)


def test_preserve_pins_content_the_sequence_used(cmg, cmg_client, os_package):
    engine = cmg_client(cache_mb=1)
    result = engine.run(sequence(*ONE_OS.steps, SMSTSPreserveContent="true"))
    assert result.succeeded, result.error
    entry = engine.cache.lookup("PS100012", 1)
    assert entry is not None and engine.cache.is_pinned(entry)
    assert "eligible for deletion" not in messages(engine)
    # Pinned for the client, not for this engine: a new cache object (a later process) keeps it.
    later = ClientCache(engine.cache.root, size_mb=1)
    with pytest.raises(CacheSpaceError) as caught:
        later.make_room("PS1000AA", 1, 800 * KB)
    assert caught.value.hresult == codes.CACHE_FULL
    assert later.lookup("PS100012", 1) is not None


# --- engine: Download Package Content destinations -----------------------------------------------


def test_custom_path_moves_the_package_to_path_with_its_id(cmg, cmg_client, drivers):
    engine = cmg_client()
    target = engine.system_drive / "Drivers" / "HP" / "PS100013"
    target.mkdir(parents=True)
    (target / "old.inf").write_text("left by an earlier run")
    step = Step(
        "Download drivers", DPC, "PS100013",
        destination=ContentDestination.CUSTOM, path="C:\\Drivers\\HP", variable="DRIVERS",
    )
    result = engine.run(sequence(step))
    assert result.succeeded, result.error
    assert engine.variables["_SMSTSLastContentDownloadLocation"] == "C:\\Drivers\\HP\\PS100013"
    assert engine.variables["DRIVERS01"] == "C:\\Drivers\\HP\\PS100013"
    assert_matches(target, drivers)  # verified bytes, and the stale file is gone
    assert engine.cache.entries() == [] and engine.ts_cache.entries() == []
    assert result.ts_cache == []
    assert "Moved content PS100013.1 from the task sequence working directory to" in messages(engine)


def test_custom_path_copies_content_the_ts_cache_keeps(cmg, cmg_client, drivers):
    engine = cmg_client()
    steps = (
        Step("Stage", DPC, "PS100013", destination=ContentDestination.TS_CACHE),
        Step("Copy", DPC, "PS100013", destination=ContentDestination.CUSTOM, path="OSD"),
        Step("Apply", "apply_driver_package", "PS100013"),
    )
    result = engine.run(sequence(*steps))
    assert result.succeeded, result.error
    assert cmg.log.count("location") == 1  # one download served all three steps
    assert_matches(engine.system_drive / "OSD" / "PS100013", drivers)
    assert result.ts_cache == ["PS100013.1"]
    assert engine.cache.entries() == []
    assert "Copied content PS100013.1" in messages(engine)


def test_client_cache_destination_in_the_full_os_is_ccmcache(cmg, cmg_client, drivers):
    engine = cmg_client()
    step = Step("Download", DPC, "PS100013", destination=ContentDestination.CLIENT_CACHE)
    result = engine.run(sequence(step))
    assert result.succeeded, result.error
    assert keys(engine.cache) == ["PS100013.1"]
    assert result.ts_cache == []
    # A run that never needed the task sequence cache does not even make its folder.
    assert not (engine.system_drive / "_SMSTaskSequence").exists()


def test_a_custom_path_inside_a_cache_fails_before_any_request(cmg, cmg_client, drivers):
    engine = cmg_client()
    step = Step("Bad", DPC, "PS100013", destination="custom", path="C:\\Windows\\ccmcache\\sub")
    result = engine.run(sequence(step))
    assert result.exit_code == 0x80070057
    assert result.failed_step == "Bad"
    assert cmg.log.count("location") == 0
    assert engine.cache.entries() == []
