"""Verify from bytes, always (issue 10, item 1): nothing is committed for its name or size alone.

An outside probe left a complete, same-size file with one byte changed at its final name in the
client's staging folder (as a killed run, or a power cut without ``fsync``, can leave it); the
next run committed it as verified. Here, against the session's Azurite, through the storage
fault proxy (which logs what was fetched):

* such a leftover is re-hashed from disk, deleted and fetched again, by the core alone and by
  the engine end to end, and the log's "Computed hash" is that of the committed bytes;
* a journaled prefix changed on disk is re-hashed, and the file still ends right;
* the package hash is checked from the digests the core computed, never from the manifest: a
  stand-in core that writes other bytes, or reports no digest for a file, fails the package;
* whatever else is in staging (a file not in the manifest, a link) never enters the cache.
"""

from __future__ import annotations

import hashlib
import os
import random
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import TYPE_CHECKING

import pytest

from pytest_cmg import Step, TaskSequence
from pytest_cmg._client import _journal
from pytest_cmg._client.cache import ClientCache
from pytest_cmg._client.download import DownloadCore
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._errors import ContentError
from pytest_cmg._protocol import codes
from pytest_cmg._protocol.manifest import ManifestFile, package_hash
from pytest_cmg.faults import reset_after, respond

if TYPE_CHECKING:
    from pathlib import Path

    from pytest_cmg._protocol.manifest import ContentManifest

MiB = 1 << 20
PKG, VER = "PS100012", 3
SETUP = random.Random(21).randbytes(300_000)
WIM = random.Random(22).randbytes(6 * MiB)
FILES = {"setup.exe": SETUP, "sources/install.wim": WIM, "empty.txt": b""}
SEQUENCE = TaskSequence(
    "PS100020",
    "IPU",
    (Step("Upgrade", "upgrade_os", PKG),),
    package_versions={PKG: VER},
    variables={"SMSTSDownloadRetryCount": "0"},
)


def flipped(data: bytes, at: int) -> bytes:
    changed = bytearray(data)
    changed[at] ^= 0xFF
    return bytes(changed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def signed(cloud_dp, manifest: ContentManifest) -> ContentManifest:
    now = datetime.now(UTC)
    return cloud_dp.signed_manifest(
        manifest, start=now - timedelta(minutes=15), expiry=now + timedelta(hours=1)
    )


def fetched(proxy) -> list[str]:
    """Names of the blobs storage was asked for, in order."""
    proxy.wait_idle(10)
    return [e.path.rsplit("/", 1)[1] for e in proxy.log]


def staging_of(cache: ClientCache) -> Path:
    return cache.root / ".staging" / f"{PKG}.{VER}"


def bytes_hash(folder: Path, manifest: ContentManifest) -> str:
    """The package hash of what ``folder`` holds (not of what the manifest says)."""
    return package_hash(
        [
            ManifestFile(f.relpath, f.size, sha((folder / f.relpath).read_bytes()))
            for f in manifest.files
        ]
    )


@pytest.fixture
def package(cloud_dp) -> ContentManifest:
    return cloud_dp.distribute(PKG, VER, FILES)


def core(events: list[str] | None = None, **kw) -> DownloadCore:
    return DownloadCore(
        retry=VirtualTime().policy(), on_event=(events.append if events is not None else None), **kw
    )


# --- (a) the probe's case, the core and the cache -------------------------------------------


@pytest.mark.parametrize("fsync", [False, True], ids=["process-durable", "power-durable"])
def test_a_same_size_flipped_file_left_at_its_final_name_is_fetched_again(
    cloud_dp, storage_faults, package, tmp_path, fsync
):
    cache = ClientCache(tmp_path / "ccmcache")
    staging = staging_of(cache)
    staging.mkdir(parents=True)
    (staging / "setup.exe").write_bytes(flipped(SETUP, 4097))  # complete, same size, wrong
    events: list[str] = []
    downloader = core(events, fsync=fsync)
    with cache.staging(PKG, VER) as staged:
        assert staged == staging
        stats = downloader.download(signed(cloud_dp, package), staged)
        entry = cache.commit(staged, PKG, VER)
    downloader.close()

    assert (entry.path / "setup.exe").read_bytes() == SETUP
    assert sorted(fetched(storage_faults)) == ["empty.txt", "install.wim", "setup.exe"]
    assert stats.skipped == 0
    [line] = [e for e in events if e.startswith("setup.exe:")]
    assert f"has SHA-256 {sha(flipped(SETUP, 4097))} (re-computed from disk)" in line
    assert "deleted, fetching it again" in line
    # Every digest the core reports is that of the bytes it committed.
    assert stats.digests == {rel: sha((entry.path / rel).read_bytes()) for rel in FILES}
    assert stats.digests == {f.relpath: f.sha256.lower() for f in package.files}


def test_a_right_leftover_is_re_hashed_from_disk_and_not_fetched(
    cloud_dp, storage_faults, package, tmp_path
):
    # The other side of the rule: a complete, right file is not fetched again, but it is read
    # back once (its digest is computed here, not taken from its size).
    dest = tmp_path / "staging"
    dest.mkdir()
    (dest / "setup.exe").write_bytes(SETUP)
    (dest / "empty.txt").write_bytes(b"")
    events: list[str] = []
    downloader = core(events)
    stats = downloader.download(signed(cloud_dp, package), dest)
    downloader.close()
    assert fetched(storage_faults) == ["install.wim"]
    assert stats.skipped == 2 and stats.rehashed == len(SETUP)
    assert stats.digests["setup.exe"] == sha(SETUP) and stats.digests["empty.txt"] == sha(b"")
    assert any("2 file(s) found complete" in e and "2 re-hashed from disk" in e for e in events)


@pytest.mark.parametrize(
    "leftover",
    ["longer", "shorter", "link-to-right-bytes", "non-empty-for-an-empty-file"],
)
def test_any_other_leftover_at_a_final_name_is_replaced_by_verified_bytes(
    cloud_dp, storage_faults, package, tmp_path, leftover
):
    dest = tmp_path / "staging"
    dest.mkdir()
    name = "empty.txt" if leftover == "non-empty-for-an-empty-file" else "setup.exe"
    target = dest / name
    if leftover == "longer":
        target.write_bytes(SETUP + b"x")
    elif leftover == "shorter":
        target.write_bytes(SETUP[:-1])
    elif leftover == "non-empty-for-an-empty-file":
        target.write_bytes(b"x")
    else:
        # Right bytes, but not a file the core wrote: a link could point anywhere later.
        outside = tmp_path / "elsewhere.exe"
        outside.write_bytes(SETUP)
        target.symlink_to(outside)
    downloader = core()
    stats = downloader.download(signed(cloud_dp, package), dest)
    downloader.close()
    assert not target.is_symlink()
    assert target.read_bytes() == FILES[name]
    assert name.rsplit("/", 1)[-1] in fetched(storage_faults)
    assert stats.digests[name] == sha(FILES[name])


# --- (b) the probe's case end to end: engine, package hash, cache ----------------------------


def test_the_engine_never_verifies_a_tampered_leftover_and_hashes_what_it_commits(
    cmg, cmg_client, storage_faults, package
):
    engine = cmg_client()
    staging = staging_of(engine.cache)
    staging.mkdir(parents=True)
    (staging / "setup.exe").write_bytes(flipped(SETUP, 4097))

    result = engine.run(SEQUENCE)

    assert result.succeeded, result.error
    [entry] = engine.cache.entries()
    assert {rel: (entry.path / rel).read_bytes() for rel in FILES} == FILES
    assert "setup.exe" in fetched(storage_faults)
    log = engine.log.messages
    assert any(
        "setup.exe: found at its final name from an earlier run but has SHA-256" in m for m in log
    )
    # The one "Computed hash" line is the hash of the bytes in the cache entry.
    computed = [m for m in log if "Computed hash:" in m]
    assert computed == [f"CAS: Computed hash: {bytes_hash(entry.path, package)}"]
    assert sum("Hash verification succeeded" in m for m in log) == 1


def test_a_stray_file_in_staging_never_enters_the_cache(cmg, cmg_client, storage_faults, package):
    # A file an earlier run left that is not in the manifest was never hashed: it is deleted
    # (and logged) before the staging folder becomes the cache entry.
    engine = cmg_client()
    staging = staging_of(engine.cache)
    (staging / "sources").mkdir(parents=True)
    (staging / "sources" / "stray.dll").write_bytes(b"not in the manifest")
    result = engine.run(SEQUENCE)
    assert result.succeeded, result.error
    [entry] = engine.cache.entries()
    assert sorted(
        str(p.relative_to(entry.path)) for p in entry.path.rglob("*") if p.is_file()
    ) == sorted(FILES)
    assert any("Deleted sources/stray.dll" in m for m in engine.log.messages)


# --- (c) a journaled prefix changed on disk -------------------------------------------------


def give_up_halfway(storage_faults) -> None:
    """Script install.wim to be cut at 3 MiB, then refused until the core gives up (it keeps the
    prefix and a journal: a resumable failure)."""
    storage_faults.add(reset_after(3 * MiB), request=1, path="install.wim")
    storage_faults.add(respond(503), request=2, times=5, path="install.wim")


def test_a_tampered_journaled_prefix_is_re_hashed_and_the_file_still_ends_right(
    cloud_dp, storage_faults, package, tmp_path
):
    dest = tmp_path / "staging"
    manifest = signed(cloud_dp, package)
    give_up_halfway(storage_faults)
    first = core(journal_bytes=MiB, journal_seconds=0.0)
    with pytest.raises(ContentError) as gave_up:
        first.download(manifest, dest)
    first.close()
    assert gave_up.value.resumable
    part = dest / "sources" / "install.wim.part"
    record = _journal.read(_journal.journal_path(part))
    assert record is not None and record.offset > 4096
    with part.open("r+b") as handle:  # one byte of the journaled prefix, same size
        handle.seek(4096)
        byte = handle.read(1)
        handle.seek(4096)
        handle.write(bytes([byte[0] ^ 0xFF]))
    storage_faults.wait_idle(10)
    storage_faults.clear()

    events: list[str] = []
    second = core(events)
    stats = second.download(manifest, dest)
    second.close()
    assert (dest / "sources" / "install.wim").read_bytes() == WIM
    assert any(f"resuming at byte {record.offset}" in e for e in events)
    assert any("mismatch after resuming from disk" in e for e in events)
    assert stats.digests["sources/install.wim"] == sha(WIM)
    # The resume, then the whole file again once the re-hash showed the prefix was wrong.
    ranges = [e.range for e in storage_faults.log if e.path.endswith("install.wim")]
    assert ranges == [f"bytes={record.offset}-", None]


def test_the_engines_next_try_re_hashes_what_changed_and_trusts_only_what_it_verified(
    cmg, cmg_client, storage_faults, package
):
    # The engine's retry after a give-up continues in the same staging folder with the same
    # core: a file this core verified and renamed in the failed try is not read back, unless
    # it is no longer that file; the journaled prefix is always re-hashed.
    engine = cmg_client()
    give_up_halfway(storage_faults)
    with pytest.raises(ContentError) as gave_up:
        engine.resolve(PKG, VER)
    assert gave_up.value.resumable
    staging = staging_of(engine.cache)
    assert (staging / "setup.exe").read_bytes() == SETUP
    # Replaced by a same-size file with one byte changed (a new file: temp, then rename).
    temp = staging / "setup.exe.new"
    temp.write_bytes(flipped(SETUP, 10))
    os.replace(temp, staging / "setup.exe")
    part = staging / "sources" / "install.wim.part"
    with part.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00" * 8)
    storage_faults.wait_idle(10)
    storage_faults.clear()

    engine.resolve(PKG, VER)

    [entry] = engine.cache.entries()
    assert {rel: (entry.path / rel).read_bytes() for rel in FILES} == FILES
    assert sorted(set(fetched(storage_faults))) == ["install.wim", "setup.exe"]
    log = engine.log.messages
    assert any(
        "setup.exe: found at its final name from an earlier run but has SHA-256" in m for m in log
    )
    assert any("mismatch after resuming from disk" in m for m in log)
    # empty.txt, unchanged since this core verified it, was taken on the digest computed then.
    assert any("1 file(s) found complete" in m and "1 verified by this process" in m for m in log)
    assert [m for m in log if "Computed hash:" in m][-1].endswith(bytes_hash(entry.path, package))


# --- (d) the package hash comes from computed digests ----------------------------------------


class _UncheckedCore(DownloadCore):
    """A download core whose per-file check did not run: it writes ``contents`` and reports the
    digests of what it wrote (all of them, or all but ``unreported``)."""

    def __init__(self, contents: dict[str, bytes], unreported: str | None = None) -> None:
        super().__init__(retry=VirtualTime().policy())
        self.contents = contents
        self.unreported = unreported

    def download(self, manifest, dest, renew=None):
        for item in manifest.files:
            path = dest / item.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.contents[item.relpath])
        digests = {r: sha(d) for r, d in self.contents.items() if r != self.unreported}
        return SimpleNamespace(
            files=len(manifest.files), bytes=manifest.total_size, digests=digests
        )


@pytest.mark.parametrize(
    ("contents", "unreported", "verified"),
    [
        (FILES, None, True),
        ({**FILES, "setup.exe": flipped(SETUP, 4097)}, None, False),
        (FILES, "setup.exe", False),
    ],
    ids=["right-bytes-pass", "other-bytes-fail", "a-missing-digest-fails"],
)
def test_the_package_hash_is_checked_from_the_digests_the_core_computed(
    cmg, cmg_client, package, contents, unreported, verified
):
    # The manifest's per-file hashes agree with the package hash the gateway reports; only the
    # digests computed from the bytes can tell that these bytes are not that content.
    engine = cmg_client()
    engine.core.close()
    engine.core = _UncheckedCore(contents, unreported)
    result = engine.run(SEQUENCE)
    log = engine.log.messages
    if verified:
        assert result.succeeded, result.error
        return
    assert result.exit_code == codes.HASH_MISMATCH
    assert engine.cache.entries() == []
    assert engine.cache.staging_leftovers() == []
    assert not any("Hash verification succeeded" in m for m in log)
    assert any("Hash could not be matched for the downloaded content" in m for m in log)
    if unreported:
        assert "no SHA-256 computed from the bytes of setup.exe" in str(result.error)


# --- what enters a cache entry, and what a fresh download costs -----------------------------


def test_only_verified_regular_files_survive_the_prune_before_a_commit(tmp_path):
    cache = ClientCache(tmp_path / "ccmcache")
    staged = tmp_path / "staged"
    (staged / "a").mkdir(parents=True)
    (staged / "a" / "ok.bin").write_bytes(b"ok")
    (staged / "a" / "extra.bin").write_bytes(b"never hashed")
    (staged / "a" / "setup.exe.part").write_bytes(b"half")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.bin").write_bytes(b"x")
    (staged / "linked").symlink_to(outside, target_is_directory=True)
    (staged / "a" / "link.bin").symlink_to(staged / "a" / "ok.bin")
    verified = {"a/ok.bin": sha(b"ok")}
    removed = cache.prune_unverified(staged, verified)
    assert removed == ["a/extra.bin", "a/link.bin", "a/setup.exe.part", "linked"]
    assert [p.name for p in staged.rglob("*") if not p.is_dir()] == ["ok.bin"]
    assert (outside / "x.bin").exists()  # a link is removed, never what it points to
    # A verified name that is a link (or gone) is not the verified file: no commit.
    (staged / "a" / "ok.bin").unlink()
    (staged / "a" / "ok.bin").symlink_to(outside / "x.bin")
    with pytest.raises(ContentError) as gone:
        cache.prune_unverified(staged, verified)
    assert gone.value.hresult == codes.HASH_MISMATCH
    assert "a/ok.bin no longer in the staging folder" in str(gone.value)


def test_a_fresh_download_never_reads_a_byte_back(
    cloud_dp, storage_faults, package, tmp_path, monkeypatch
):
    # Re-hashing is for an earlier run's leftovers only; bytes fetched now are hashed as they
    # stream, so a download into an empty folder makes no read of the disk at all.
    from pytest_cmg._client import download as download_module

    reads: list[int] = []
    real = download_module.os.preadv

    def preadv(fd, buffers, offset):
        reads.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(download_module.os, "preadv", preadv)
    downloader = core(journal_bytes=MiB, journal_seconds=0.0)
    stats = downloader.download(signed(cloud_dp, package), tmp_path / "fresh")
    downloader.close()
    assert reads == []
    assert stats.rehashed == 0 and stats.skipped == 0
    assert stats.digests == {rel: sha(data) for rel, data in FILES.items()}
