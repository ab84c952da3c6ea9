"""The client cache (ccmcache): verified package versions, keyed by content ID and version.

Layout under the cache root (every bookkeeping name starts with a dot)::

    <PKG>.<ver>/                a cache entry: complete and verified (the invariant below)
    .staging/<PKG>.<ver>/       the download of that content; a stable name, so a client restarted
                                after a kill finds its partial files and the download core resumes
    .staging/<PKG>.<ver>.lock   flock'ed (exclusive) by the one download of that content; holds
                                the bytes that download reserved while it runs
    .staging/.cache.lock        flock'ed while space is counted and entries are evicted
    .leases/<PKG>.<ver>         flock'ed (shared) by every step using that entry, in any process
    .pins/<PKG>.<ver>           the entry is pinned: kept after the task sequence, never evicted
    .trash/                     evicted entries on their way out

Invariant: a folder directly under the cache root whose name does not start with a dot holds a
complete, verified package version, so :meth:`ClientCache.entries` and :meth:`lookup` (which read
only such folders) return verified entries only. It is enforced here, in three places:

* :meth:`ClientCache.commit` is the only way such a folder appears: one atomic ``rename`` of a
  staging folder, called by the engine after every file and the package hash were verified
  from SHA-256 values computed from the bytes in that process (the download core re-hashes
  whatever an earlier run left in staging; it never trusts a file for its name or size), and
  after :meth:`ClientCache.prune_unverified` removed any file of the staging folder that is not
  one of those verified files, so nothing unhashed rides into an entry;
* :meth:`ClientCache.staging` removes the staging folder when the download fails (any exception)
  or ends without a commit; only the death of the process leaves it, for the next run to resume;
* eviction first renames an entry into ``.trash/`` (atomic), then deletes it, so a half-deleted
  entry is never visible.

Reusing an entry reads none of its bytes: it was hashed by the process that committed it, and
re-hashing a package on every use would make every use pay a full read and hash of it (measured
here: 45-60 ms per 64 MiB, about 1.1-1.5 GB/s, so a 5 GB package ~4 s per step). The limit that
follows: with the download core's default ``fsync=False``, a power cut soon after a commit can
leave an entry whose files the kernel had not written yet (empty, or zero-filled, depending on the
file system), and a later lookup serves it. The core's ``fsync=True`` closes that: every file is
flushed before its rename, so after a power cut the entry either holds the verified bytes or its
rename was lost and the staging folder, found again, is re-hashed before it is committed.

Space (docs/emulation.md, "Client cache: space, eviction, in-use content"):
:meth:`ClientCache.make_room` runs before any byte is transferred. Content larger than the whole
cache fails at once (0x87D01202); content that fits the cache but not its free space evicts
entries nobody uses, least recently used first, and fails (0x87D01201) when what remains is in
use. Last use is the entry folder's modification time, set (atomically, by ``utime``) on commit
and on every use, so it survives restarts and needs no disk space when the disk is full.

Concurrency (E2): locks are ``flock`` locks, which the kernel drops when a process dies, so a
killed client never leaves the cache locked. Entries in use hold a shared lock (a :class:`Lease`)
and are never evicted; two requests for the same content, in threads or processes, share one
download through the exclusive download lock (:meth:`ClientCache.download_lock`).

After a task sequence (``SMSTSPreserveContent``; docs/emulation.md, "Task sequence content
locations"): a task sequence that must keep its content pins it (:meth:`ClientCache.pin`, a file
that outlives every process: eviction skips it until :meth:`ClientCache.unpin`); one that need
not releases what it downloaded with :meth:`ClientCache.expire`, which ages it past the minimum
keep time so eviction may take it.
"""

from __future__ import annotations

import fcntl
import os
import posixpath
import shutil
import threading
import time
import uuid
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .._errors import ContentError, NotFoundError
from .._protocol import codes
from .._util.filelock import try_lock as _try_lock
from .._util.filelock import unlock as _unlock
from .._util.filelock import wait_lock
from .._util.tree import walk_entries

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Mapping
    from pathlib import Path
    from types import TracebackType

__all__ = [
    "DEFAULT_CACHE_MB",
    "CacheEntry",
    "CacheSpaceError",
    "ClientCache",
    "Eviction",
    "Lease",
    "SpaceReport",
]

#: The product's default cache size (docs/emulation.md, "Content, verification and the client cache").
DEFAULT_CACHE_MB = 5120
#: The product's default "Minimum duration before cached content can be removed" (minutes).
PRODUCT_KEEP_MINUTES = 1440
MIB = 1024 * 1024
#: Re-exported: tests and callers name it from the cache, where the wait that raises it lives.
CACHE_IN_USE = codes.CACHE_IN_USE
_STAGING = ".staging"
_LEASES = ".leases"
_TRASH = ".trash"
_PINS = ".pins"
_CACHE_LOCK = ".cache.lock"
_LOCK_SUFFIX = ".lock"
#: How often a lock held by another process is tried again (flock has no timeout of its own).
_POLL = 0.02


@dataclass(frozen=True)
class CacheEntry:
    package_id: str
    version: int
    path: Path

    @property
    def key(self) -> str:
        return f"{self.package_id}.{self.version}"


@dataclass(frozen=True)
class Eviction:
    """What :meth:`ClientCache.make_room` removed: an entry, or a download nobody is running."""

    key: str
    path: Path
    size: int
    last_used: float
    #: A staging folder left by a client that died mid-download rather than a cache entry.
    partial: bool = False


@dataclass(frozen=True)
class SpaceReport:
    """The cache's space as :meth:`ClientCache.make_room` found it (before any eviction)."""

    needed: int
    capacity: int
    used: int
    entries: int = 0
    #: Entries a lease holds (in use by a step, in any process).
    active: int = 0
    #: Entries older than the minimum keep time and not in use: those eviction may take.
    expired: int = 0
    evicted: tuple[Eviction, ...] = ()
    #: Entries pinned (:meth:`ClientCache.pin`): never evicted, like entries in use.
    pinned: int = 0

    @property
    def free(self) -> int:
        return max(0, self.capacity - self.used)


class CacheSpaceError(ContentError):
    """The content cannot have room: 0x87D01202 (cache too small) or 0x87D01201 (cache full)."""

    def __init__(self, hresult: int, message: str, report: SpaceReport) -> None:
        self.report = report
        super().__init__(hresult, message)


class Lease:
    """A hold on a cache entry: while any lease on it lives, in any process, it is not evicted.

    Release it (or use it as a context manager); a process that dies releases its leases.
    """

    def __init__(self, cache: ClientCache, entry: CacheEntry, fd: int) -> None:
        self.cache = cache
        self.entry = entry
        self._fd: int | None = fd

    @property
    def released(self) -> bool:
        return self._fd is None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            self.cache._dropped(self.entry.key)
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        state = "released" if self.released else "held"
        return f"Lease({self.entry.key}, {state})"


def _tree_size(path: Path) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size  # noqa: PTH118 - os.walk
            except FileNotFoundError:
                continue
    return total


class ClientCache:
    """A cache folder of verified package versions, shared safely by threads and processes.

    :param size_mb: the cache size; content is never allowed to make the cache exceed it.
    :param keep_minutes: entries used more recently than this are not evicted (the product's
        "Minimum duration before cached content can be removed", 1440 by default there; 0 here so
        a test can evict what it has just downloaded).
    :param clock: wall-clock time for last-use times (injectable for tests).
    :param lock_timeout: seconds to wait for another download of the same content, or for a lock
        another process holds, before failing with 0x87D01203.
    """

    def __init__(
        self,
        root: Path,
        size_mb: int = DEFAULT_CACHE_MB,
        *,
        keep_minutes: int = 0,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 3600.0,
    ) -> None:
        self.root = root
        self.size_mb = size_mb
        self.keep_minutes = keep_minutes
        self.clock = clock
        self.lock_timeout = lock_timeout
        for folder in (root, root / _STAGING, root / _LEASES):
            folder.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._refs: dict[str, int] = {}
        #: Download locks this object holds: key -> (thread ident, fd of the lock file).
        self._downloads: dict[str, tuple[int, int]] = {}

    @property
    def capacity(self) -> int:
        """The cache size in bytes."""
        return self.size_mb * MIB

    @staticmethod
    def key(package_id: str, version: int) -> str:
        return f"{package_id}.{version}"

    # --- entries ---------------------------------------------------------------------------

    def lookup(self, package_id: str, version: int) -> CacheEntry | None:
        path = self.root / self.key(package_id, version)
        return CacheEntry(package_id, version, path) if path.is_dir() else None

    def entries(self) -> list[CacheEntry]:
        """Every cache entry (verified, by the module's invariant), sorted by key."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            package_id, _, version = path.name.rpartition(".")
            if package_id and version.isdigit():
                found.append(CacheEntry(package_id, int(version), path))
        return found

    def size_of(self, entry: CacheEntry) -> int:
        return _tree_size(entry.path)

    def used_bytes(self) -> int:
        """Bytes held by cache entries (downloads in progress not counted)."""
        return sum(self.size_of(e) for e in self.entries())

    def last_used(self, entry: CacheEntry) -> float:
        return entry.path.stat().st_mtime

    def touch(self, entry: CacheEntry) -> None:
        """Record a use of ``entry`` now (its folder's mtime: atomic, persistent, no disk space)."""
        now = self.clock()
        # Evicted in between: the next lookup misses, which is the truth.
        with suppress(FileNotFoundError):
            os.utime(entry.path, (now, now))

    # --- leases (entries in use) -----------------------------------------------------------

    def acquire(self, package_id: str, version: int) -> Lease | None:
        """Lease the entry for ``package_id`` version if the cache has it, recording the use."""
        lease = self._lease(package_id, version)
        entry = lease.entry
        # Checked under the lease: an eviction holds the lease file exclusively while it removes
        # the entry, so an entry seen here stays until the lease is released.
        if not entry.path.is_dir():
            lease.release()
            return None
        self.touch(entry)
        return lease

    @contextmanager
    def use(self, entry: CacheEntry) -> Iterator[Lease]:
        """``with cache.use(entry):`` holds ``entry`` (not evictable) for the block."""
        lease = self.acquire(entry.package_id, entry.version)
        if lease is None:
            msg = (
                f"ClientCache.use: cache entry {entry.key} is no longer in {self.root} (evicted "
                "or removed); take a lease with acquire() while it is there, or download it again"
            )
            raise NotFoundError(msg)
        with lease:
            yield lease

    def hold(self, package_id: str, version: int) -> Lease:
        """A lease taken before the entry exists: call it before :meth:`commit` so nothing can
        evict the entry between its commit and its first use."""
        return self._lease(package_id, version)

    def refcount(self, key: str) -> int:
        """Leases on ``key`` held through this object (other processes' are not counted)."""
        with self._guard:
            return self._refs.get(key, 0)

    def in_use(self, entry: CacheEntry) -> bool:
        """Whether any lease, in any process, holds ``entry``."""
        fd = _try_lock(self._lease_path(entry.key), fcntl.LOCK_EX)
        if fd is None:
            return True
        _unlock(fd)
        return False

    def _lease(self, package_id: str, version: int) -> Lease:
        key = self.key(package_id, version)
        fd = self._wait_lock(self._lease_path(key), fcntl.LOCK_SH, f"the lease on {key}")
        with self._guard:
            self._refs[key] = self._refs.get(key, 0) + 1
        return Lease(self, CacheEntry(package_id, version, self.root / key), fd)

    def _dropped(self, key: str) -> None:
        with self._guard:
            count = self._refs.get(key, 0) - 1
            if count > 0:
                self._refs[key] = count
            else:
                self._refs.pop(key, None)

    def _lease_path(self, key: str) -> Path:
        return self.root / _LEASES / key

    # --- after a task sequence: pinned or released (SMSTSPreserveContent) --------------------

    def pin(self, entry: CacheEntry) -> None:
        """Keep ``entry`` whatever space is needed, in this and later processes, until unpinned."""
        folder = self.root / _PINS
        folder.mkdir(exist_ok=True)
        (folder / entry.key).touch()

    def unpin(self, entry: CacheEntry) -> None:
        with suppress(FileNotFoundError):
            (self.root / _PINS / entry.key).unlink()

    def is_pinned(self, entry: CacheEntry) -> bool:
        return (self.root / _PINS / entry.key).exists()

    def pinned(self) -> list[str]:
        """Keys of the pinned entries (pins of entries no longer cached included), sorted."""
        folder = self.root / _PINS
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []

    def expire(self, entry: CacheEntry) -> None:
        """Release ``entry``: eligible for deletion now, whatever the minimum keep time.

        Its last use moves back by the keep time, so eviction may take it at once and the order
        among released entries (least recently used first) is kept.
        """
        with suppress(FileNotFoundError):
            last = self.last_used(entry) - self.keep_minutes * 60
            os.utime(entry.path, (last, last))

    # --- locks -----------------------------------------------------------------------------

    def _wait_lock(
        self,
        path: Path,
        operation: int,
        what: str,
        on_wait: Callable[[], None] | None = None,
    ) -> int:
        """Take ``operation`` on ``path``, waiting at most ``lock_timeout`` seconds."""
        return wait_lock(
            path,
            operation=operation,
            deadline=time.monotonic() + self.lock_timeout,
            on_wait=on_wait,
            poll=_POLL,
            timed_out=lambda: ContentError(
                CACHE_IN_USE, f"{what} was still held after {self.lock_timeout:.0f} s ({path})"
            ),
        )

    @contextmanager
    def download_lock(
        self, package_id: str, version: int, on_wait: Callable[[], None] | None = None
    ) -> Iterator[None]:
        """Be the one download of ``package_id`` version, across threads and processes.

        ``on_wait()`` is called once if another request holds it (this one then waits). Whoever
        gets it next must look the cache up again: the holder may have committed the entry.
        """
        key = self.key(package_id, version)
        fd = self._wait_lock(
            self._download_lock_path(key), fcntl.LOCK_EX, f"the download of {key}", on_wait
        )
        try:
            # A reservation left in the file by a holder that died is void.
            os.ftruncate(fd, 0)
            with self._guard:
                self._downloads[key] = (threading.get_ident(), fd)
            yield
        finally:
            with self._guard:
                self._downloads.pop(key, None)
            try:
                os.ftruncate(fd, 0)
            finally:
                _unlock(fd)

    def _holds_download(self, key: str) -> int | None:
        with self._guard:
            held = self._downloads.get(key)
        return held[1] if held is not None and held[0] == threading.get_ident() else None

    def _download_lock_path(self, key: str) -> Path:
        return self.root / _STAGING / f"{key}{_LOCK_SUFFIX}"

    # --- space -----------------------------------------------------------------------------

    def make_room(self, package_id: str, version: int, size: int) -> SpaceReport:
        """Make ``size`` bytes free for ``package_id`` version, before any of it is fetched.

        Raises :class:`CacheSpaceError`: 0x87D01202 when ``size`` exceeds the whole cache,
        0x87D01201 when evicting every entry not in use would still not free enough (nothing is
        evicted then). The space is reserved for the caller's download while it holds
        :meth:`download_lock`, so concurrent downloads of other content count it as used.
        """
        key = self.key(package_id, version)
        capacity = self.capacity
        if size > capacity:
            report = SpaceReport(size, capacity, self.used_bytes(), len(self.entries()))
            raise CacheSpaceError(
                codes.CACHE_TOO_SMALL,
                f"{key} needs {size} bytes; the whole cache is {self.size_mb} MB ({capacity} bytes)",
                report,
            )
        lock = self._wait_lock(self.root / _STAGING / _CACHE_LOCK, fcntl.LOCK_EX, "the cache")
        try:
            report = self._make_room(key, size)
            own = self._holds_download(key)
            if own is not None:
                try:
                    os.ftruncate(own, 0)
                    os.pwrite(own, str(size).encode("ascii"), 0)
                except OSError:
                    # Best effort: on a full disk the reservation is lost, and the download that
                    # follows meets ENOSPC, which fails it cleanly anyway.
                    pass
            return report
        finally:
            _unlock(lock)

    def _make_room(self, key: str, size: int) -> SpaceReport:
        self._empty_trash()
        capacity = self.capacity
        keep_until = self.clock() - self.keep_minutes * 60
        used = 0
        # (order, last_used, key, path, lock path, size, partial)
        candidates: list[tuple[int, float, str, Path, Path, int, bool]] = []
        staging = self.root / _STAGING
        # Every download another request runs or ran: its lock file, its folder, or both.
        names = {
            p.name.removesuffix(_LOCK_SUFFIX) if p.name.endswith(_LOCK_SUFFIX) else p.name
            for p in staging.iterdir()
            if not p.name.startswith(".") and (p.is_dir() or p.name.endswith(_LOCK_SUFFIX))
        }
        names.discard(key)
        for name in sorted(names):
            folder, lock_path = staging / name, self._download_lock_path(name)
            on_disk = _tree_size(folder) if folder.is_dir() else 0
            fd = _try_lock(lock_path, fcntl.LOCK_EX)
            if fd is None:
                # Running: count what it reserved, at least what it has written.
                used += max(on_disk, _reservation(lock_path))
                continue
            _unlock(fd)
            if not folder.is_dir():
                continue
            used += on_disk
            try:
                last = folder.stat().st_mtime
            except FileNotFoundError:
                continue
            # Abandoned by a client that died: a resumable partial, but nobody resumes it now.
            candidates.append((0, last, name, folder, lock_path, on_disk, True))
        entries = self.entries()
        active = expired = 0
        for entry in entries:
            entry_size = self.size_of(entry)
            used += entry_size
            try:
                last = self.last_used(entry)
            except FileNotFoundError:
                continue
            path = self._lease_path(entry.key)
            candidates.append((1, last, entry.key, entry.path, path, entry_size, False))
        free = capacity - used
        victims: list[tuple[Eviction, int]] = []
        freed = 0
        # Partial downloads nobody runs first, then entries least recently used first.
        pins = set(self.pinned())
        pinned = 0
        for _, last, name, path, lock_path, item_size, partial in sorted(candidates):
            if not partial and name in pins:
                pinned += 1
                continue
            fd = _try_lock(lock_path, fcntl.LOCK_EX)
            if fd is None:
                active += not partial
                continue
            evictable = partial or not self.keep_minutes or last <= keep_until
            expired += evictable and not partial
            if not evictable or free + freed >= size:
                _unlock(fd)
                continue
            victims.append((Eviction(name, path, item_size, last, partial), fd))
            freed += item_size
        report = SpaceReport(size, capacity, used, len(entries), active, expired, pinned=pinned)
        if free + freed < size:
            for _, fd in victims:
                _unlock(fd)
            raise CacheSpaceError(
                codes.CACHE_FULL,
                f"{key} needs {size} bytes; {max(0, free)} of {capacity} are free and only "
                f"{freed} more could be freed ({active} entries in use, {pinned} pinned)",
                report,
            )
        for eviction, fd in victims:
            try:
                self._remove(eviction.path)
            finally:
                _unlock(fd)
        return SpaceReport(
            size,
            capacity,
            used,
            len(entries),
            active,
            expired,
            tuple(e for e, _ in victims),
            pinned,
        )

    def _remove(self, path: Path) -> None:
        # Renamed out first: an entry is whole or absent, never half deleted (the invariant).
        trash = self.root / _TRASH
        trash.mkdir(exist_ok=True)
        gone = trash / f"{path.name}.{uuid.uuid4().hex[:8]}"
        path.rename(gone)
        shutil.rmtree(gone, ignore_errors=True)

    def _empty_trash(self) -> None:
        trash = self.root / _TRASH
        if trash.exists():
            for item in trash.iterdir():
                shutil.rmtree(item, ignore_errors=True)

    # --- downloads -------------------------------------------------------------------------

    @contextmanager
    def staging(self, package_id: str, version: int) -> Iterator[Path]:
        """The folder to download ``package_id`` version into: ``.staging/<PKG>.<ver>/``.

        The name is stable, so a download interrupted by the death of its process is found (and
        resumed by the download core) by the next one. The folder is removed when the block
        raises and when it ends without :meth:`commit`, except for a :class:`ContentError` that
        is ``resumable`` (the core gave up on transient errors and kept its verified prefix: the
        engine's next try continues from it, and :meth:`discard_staging` removes it if there is
        no next try); a process being killed, or interrupted (``KeyboardInterrupt``), leaves it
        too. Holds :meth:`download_lock` for the block unless the calling thread already does.
        """
        folder = self.root / _STAGING / self.key(package_id, version)
        with self._download_guard(package_id, version):
            folder.mkdir(parents=True, exist_ok=True)
            try:
                yield folder
            except Exception as exc:
                if not (isinstance(exc, ContentError) and exc.resumable):
                    shutil.rmtree(folder, ignore_errors=True)
                raise
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def provider_folder(self, package_id: str, version: int) -> Path:
        """Where a content provider writes ``package_id`` version: ``.staging/.acp-<PKG>.<ver>``.

        In staging (hidden from eviction, on the cache's disk so the commit is one rename), and
        apart from the built-in download's folder, whose resumable prefix it must not touch.
        """
        return self.root / _STAGING / f".acp-{self.key(package_id, version)}"

    def final_folders(self, package_id: str, version: int) -> tuple[Path, Path]:
        """Where ``package_id`` version's files stand under their own names: the entry, and a
        content provider's destination. Any file there at a package path must be whole and
        verified at every moment; a partial download belongs under another name."""
        return self.root / self.key(package_id, version), self.provider_folder(package_id, version)

    def discard_staging(self, package_id: str, version: int) -> bool:
        """Remove what a failed or interrupted download left in staging (after its last try):
        the built-in download's folder and a content provider's; True if there was something."""
        folders = (
            self.root / _STAGING / self.key(package_id, version),
            self.provider_folder(package_id, version),
        )
        with self._download_guard(package_id, version):
            there = [folder for folder in folders if folder.exists()]
            for folder in there:
                shutil.rmtree(folder, ignore_errors=True)
        return bool(there)

    def _download_guard(self, package_id: str, version: int) -> AbstractContextManager[None]:
        """:meth:`download_lock`, unless the calling thread already holds it (no deadlock)."""
        if self._holds_download(self.key(package_id, version)) is not None:
            return nullcontext()
        return self.download_lock(package_id, version)

    def prune_unverified(self, staged: Path, verified: Mapping[str, str]) -> list[str]:
        """Delete every file in ``staged`` that is not one of ``verified``; return their paths.

        ``verified`` maps the relative paths (``/``-separated, as in a manifest) of the files
        whose SHA-256 the download computed from their bytes to that SHA-256. A staging folder
        can hold more than the download wrote: files an earlier run left there for another file
        list of the same content version, or links. Nothing of that was hashed, so none of it
        may enter the cache entry (the module's invariant). A verified file that is no longer
        there is a :class:`ContentError` (0x80091007): the entry would lack a file.
        """
        wanted = {posixpath.normpath(relpath) for relpath in verified}
        removed: list[str] = []
        found: set[str] = set()
        for entry, relpath in walk_entries(staged):
            if relpath in wanted and entry.is_file(follow_symlinks=False):
                found.add(relpath)
            else:
                # A link (to a file or a folder) or a file the download did not verify.
                with suppress(FileNotFoundError):
                    os.unlink(entry.path)  # noqa: PTH108
                removed.append(relpath)
        missing = sorted(wanted - found)
        if missing:
            raise ContentError(
                codes.HASH_MISMATCH,
                f"{staged}: verified file(s) {', '.join(missing[:3])} no longer in the staging "
                "folder at commit; the content must be downloaded again",
            )
        return sorted(removed)

    def commit(self, staged: Path, package_id: str, version: int) -> CacheEntry:
        """Publish a verified staging folder as the cache entry (atomic rename)."""
        entry = CacheEntry(package_id, version, self.root / self.key(package_id, version))
        if entry.path.is_dir():
            # Another writer already committed the same verified content: keep the first.
            shutil.rmtree(staged, ignore_errors=True)
        else:
            staged.rename(entry.path)
        self.touch(entry)
        return entry

    def staging_leftovers(self) -> list[Path]:
        """Whatever is still in the staging area besides lock files (empty between downloads)."""
        area = self.root / _STAGING
        if not area.exists():
            return []
        return sorted(p for p in area.iterdir() if not p.name.endswith(_LOCK_SUFFIX))


def _reservation(lock_path: Path) -> int:
    try:
        text = lock_path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return 0
    return int(text) if text.isdigit() else 0
