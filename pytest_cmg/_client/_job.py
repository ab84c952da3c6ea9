"""One file's transfer on disk, and the state one ``download()`` call shares between threads.

:class:`Job` owns a file's ``<name>.part``: opening it (taking over an earlier run's journaled
prefix, re-hashed from disk), writing and hashing its bytes in order, checkpoints of the resume
journal (:mod:`._journal`, made durable on the :class:`Checkpoints` thread), restarting from
byte 0, and the one rename to the final name once size and SHA-256 match. :class:`Run` is what
the worker threads of one download share. The rules they follow are in
:mod:`pytest_cmg._client.download`'s docstring (Integrity, Resume after the process dies).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._protocol import codes
from .._protocol.manifest import sas_expiry
from . import _journal
from ._failures import Fatal

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._protocol.manifest import ContentManifest, ManifestFile
    from .download import DownloadCore

__all__ = ["PART", "Checkpoints", "Identity", "Job", "Run", "identity"]

#: Bytes go to ``<name>.part`` until the file is verified.
PART = ".part"


class Job:
    """One file's transfer. Invariant: ``hashed`` bytes are in ``digest`` and at the start of
    the ``.part`` file (bytes past it may be on disk too: early ranges, or a crash's leftovers).
    """

    def __init__(self, run: Run, item: ManifestFile) -> None:
        self.run = run
        self.item = item
        # Plain strings: for 16 KiB files, pathlib's objects cost more than the syscalls.
        self.target = f"{run.dest_str}/{item.relpath}"
        self.part = self.target + PART
        self.url = item.url
        self.etag: str | None = None
        self.digest = hashlib.sha256()
        self.hashed = 0
        self.renewed = False
        self.fd = -1
        self.lock = threading.Lock()
        # Checkpoints: at most one in flight; the job waits for it before truncating or closing.
        self._idle = threading.Condition(self.lock)
        self._pending = False
        #: A checkpoint came due while one was being written: when that one ends, the checkpoint
        #: thread journals the latest hashed offset too, so a body that stops right there (a
        #: stall, a power cut) still has its last bytes journaled. Set under ``lock``.
        self._trailing = False
        self.journaled = False
        #: Bytes came from an earlier run's ``.part`` (a mismatch may be the disk's fault).
        self.taken_over = False
        self._journal_ok = run.core.journal_bytes > 0
        #: Early writeback pays off only for a file whose checkpoints will flush it.
        self._writeback = run.core.fsync and self._journal_ok and item.size > run.core.journal_bytes
        self._checkpointed = 0
        self._checkpoint_time = time.monotonic()

    @property
    def journal(self) -> Path:
        return Path(self.part + _journal.SUFFIX)

    def renew(self, why: str) -> None:
        """Spend the file's one renewal (after a refusal or before a lapse); hold ``lock``."""
        assert self.run.renew is not None and not self.renewed
        self.run.core.on_event(f"{self.item.relpath}: {why}")
        self.url, self.renewed = self.run.renew(self.item), True

    def sas_seconds_left(self) -> float | None:
        """Seconds until the current URL's SAS lapses (negative: already), None if unknown."""
        expiry = sas_expiry(self.url)
        return None if expiry is None else expiry - time.time()

    # -- opening, with resume from a journal --

    def open(self, buf: memoryview) -> int:
        """Open the ``.part`` file; return the bytes taken over from an earlier run's journal."""
        run = self.run
        parent = os.path.dirname(self.target)  # noqa: PTH120
        if parent not in run.dirs:
            os.makedirs(parent, exist_ok=True)  # noqa: PTH103
            run.dirs.add(parent)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC
        record = _journal.read(self.journal) if run.leftovers else None
        if record is not None and self._matches(record):
            self.fd = os.open(self.part, flags, 0o644)
            if os.fstat(self.fd).st_size >= record.offset:
                return self._take_over(record, buf)
            os.ftruncate(self.fd, 0)
        else:
            # A .part without a journal that matches says nothing about its bytes: never used.
            self.fd = os.open(self.part, flags | os.O_TRUNC, 0o644)
        if run.leftovers:
            _journal.remove(self.journal)
        return 0

    def _matches(self, record: _journal.JournalRecord) -> bool:
        item, manifest = self.item, self.run.manifest
        return (
            record.package_id == manifest.package_id
            and record.version == manifest.version
            and record.relpath == item.relpath
            and record.size == item.size
            and record.sha256.lower() == item.sha256.lower()
            and bool(record.etag)
            and record.offset > 0
        )

    def _take_over(self, record: _journal.JournalRecord, buf: memoryview) -> int:
        # hashlib cannot persist its state: re-hash the durable prefix once (after a crash only).
        # The journal says where to resume, never what the bytes are: the prefix's part of the
        # digest is computed here from what the disk holds now (a power cut, or anything that
        # wrote to the file, shows as a final mismatch, and the file is fetched again from 0).
        offset = record.offset
        position = 0
        while position < offset:
            n = os.preadv(self.fd, [buf[: min(len(buf), offset - position)]], position)
            if n <= 0:  # pragma: no cover - the size was checked just before
                self.digest = hashlib.sha256()
                os.ftruncate(self.fd, 0)
                _journal.remove(self.journal)
                return 0
            self.digest.update(buf[:n])
            position += n
        # Bytes past the durable offset were never recorded as hashed: fetch them again.
        os.ftruncate(self.fd, offset)
        self.hashed = offset
        self.etag = record.etag
        self.journaled = self.taken_over = True
        self._checkpointed = offset
        self.run.core.on_event(
            f"{self.item.relpath}: resuming at byte {offset} of {self.item.size} from an earlier "
            f"run's journal (re-hashed from disk)"
        )
        return offset

    # -- data --

    def write(self, view: memoryview, offset: int) -> None:
        written = 0
        while written < len(view):
            written += os.pwrite(self.fd, view[written:], offset + written)
        if self._writeback:
            # Start writing these pages to disk now (asynchronously): the checkpoints' and the
            # final fdatasync then find little left to flush, instead of stalling on a burst.
            os.posix_fadvise(self.fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def hash(self, view: memoryview) -> None:
        """Count ``view`` (already written at ``hashed``) into the digest; maybe checkpoint."""
        self.digest.update(view)
        self.hashed += len(view)
        core = self.run.core
        if core.on_progress is not None:
            core.on_progress(len(view), 0)
        if (
            self._journal_ok
            and self.hashed - self._checkpointed >= core.journal_bytes
            and self.etag
        ):
            if self._pending:
                self._skip_checkpoint()
                return
            now = time.monotonic()
            if now - self._checkpoint_time >= core.journal_seconds:
                self._checkpointed, self._checkpoint_time = self.hashed, now
                with self.lock:
                    self._pending = True
                self.run.checkpoints.submit(self, self.hashed, self.etag)

    def _skip_checkpoint(self) -> None:
        # The rare path: a checkpoint is due while the previous one is still being written.
        # Under the lock, so the checkpoint thread either sees the flag or has already ended
        # (then the next chunk checkpoints as usual).
        with self.lock:
            if self._pending:
                self._trailing = True

    # -- checkpoints (run on the checkpoint thread) --

    def checkpoint(self, offset: int, etag: str) -> None:
        item, manifest = self.item, self.run.manifest
        fsync = self.run.core.fsync
        try:
            if fsync:
                os.fdatasync(self.fd)
            record = _journal.JournalRecord(
                manifest.package_id, manifest.version, item.relpath, item.size,
                item.sha256.lower(), etag, offset,
            )  # fmt: skip
            _journal.write(self.journal, record, durable=fsync)
            self.journaled = True
        except Exception as exc:
            # The journal only saves work after a crash; the download itself goes on. Any
            # failure, not only OSError: this runs on the checkpoint thread, and a thread that
            # died would leave the job waiting in quiesce() for a checkpoint that never ends.
            self._journal_ok = False
            self.run.core.on_event(f"{item.relpath}: cannot write the resume journal ({exc})")
        finally:
            trailing = self._trail(offset)
            if trailing is not None:
                self.run.checkpoints.submit(self, trailing, etag)

    def _trail(self, offset: int) -> int | None:
        """End the checkpoint of ``offset``: the offset of a trailing one to submit now (the job
        stays pending), or None (the job is idle again).

        Any offset the hashing thread has reached may be journaled: its bytes were written
        before they were hashed, the next checkpoint's fdatasync flushes them before its
        journal is written, and a resume re-hashes the prefix from disk (:meth:`_take_over`).
        """
        with self._idle:
            # ``hashed`` is the hashing thread's; reading it here gives one value it held.
            latest = self.hashed
            if self._trailing and self._journal_ok and latest > offset:
                self._trailing = False
                self._checkpointed, self._checkpoint_time = latest, time.monotonic()
                return latest
            self._trailing = False
            self._pending = False
            self._idle.notify_all()
            return None

    def quiesce(self) -> None:
        """Wait for the checkpoint in flight, if any (before truncating or closing the file)."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending)

    # -- ends --

    def restart(self) -> int:
        """Back to byte 0 (the journal goes: its bytes are no longer wanted). Returns the loss."""
        self.quiesce()
        if self.journaled:
            _journal.remove(self.journal)
            self.journaled = False
        lost = self.hashed
        os.ftruncate(self.fd, 0)
        self.digest = hashlib.sha256()
        self.hashed = 0
        self.etag = None
        self._checkpointed = 0
        self._checkpoint_time = time.monotonic()
        return lost

    def commit(self) -> None:
        """Verify and rename; raise Fatal (and remove the partial file) on a mismatch.

        The only rename to a final name. ``digest`` holds exactly the ``hashed`` bytes at the
        start of the ``.part`` file, each one hashed by this process: from the buffer it was
        written from, or read back from disk (:meth:`_take_over`). So a file reaches its final
        name only with a SHA-256 computed from its bytes here, and that digest is what the
        download reports (:attr:`DownloadStats.digests`), not the manifest's value.
        """
        item = self.item
        self.quiesce()
        actual = self.digest.hexdigest()
        if self.hashed != item.size or actual != item.sha256.lower():
            raise Fatal(
                codes.HASH_MISMATCH,
                f"{item.relpath}: SHA-256 {actual} does not match manifest {item.sha256}",
            )
        hook = self.run.core.before_commit
        if hook is not None:
            hook(item.relpath, Path(self.part))
        fsync = self.run.core.fsync
        if fsync:
            # Durable before its name says "done" (the folders follow: here for a journaled
            # file, whose journal goes next; at the end of the download for the others).
            os.fdatasync(self.fd)
        os.close(self.fd)
        self.fd = -1
        os.rename(self.part, self.target)  # noqa: PTH104 - str paths, see __init__
        self.run.verified(item.relpath, actual)
        if fsync and self.journaled:
            _journal.fsync_dir(Path(self.target).parent)
        if self.journaled:
            _journal.remove(self.journal)

    def abandon(self, keep: bool) -> None:
        """After a failure: keep the partial file and a final journal for a later try, or delete."""
        self.quiesce()
        if self.fd < 0:
            return
        if keep and self._journal_ok and self.hashed > 0 and self.etag:
            self.checkpoint(self.hashed, self.etag)
        else:
            keep = False
        os.close(self.fd)
        self.fd = -1
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.part)  # noqa: PTH108
            _journal.remove(self.journal)


class Checkpoints:
    """The background thread that makes checkpoints durable (fdatasync, then the journal)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Job, int, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: Job, offset: int, etag: str) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="download-checkpoints", daemon=True
                )
                self._thread.start()
        self._queue.put((job, offset, etag))

    def _run(self) -> None:
        while (entry := self._queue.get()) is not None:
            job, offset, etag = entry
            job.checkpoint(offset, etag)

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()


#: What identifies one version of a file on disk: device, inode, size, mtime and ctime (ns).
#: Any write, truncation, replacement or rename of it changes one of them.
Identity = tuple[int, int, int, int, int]


def identity(st: os.stat_result) -> Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class Run:
    """State shared by the threads of one ``download()`` call."""

    core: DownloadCore
    manifest: ContentManifest
    dest: Path
    dest_str: str
    renew: Callable[[ManifestFile], str] | None
    #: The staging folder held files before this call: look for journals and finished files.
    leftovers: bool
    checkpoints: Checkpoints
    dirs: set[str]
    lock: threading.Lock
    #: Files this core finished in an earlier try into ``dest`` that failed: relpath ->
    #: (digest computed then, identity of the file right after), see ``_carried``.
    carried: dict[str, tuple[str, Identity]]
    retries: int = 0
    refetched: int = 0
    resumed: int = 0
    skipped: int = 0
    #: Of the skipped files, those this core verified in an earlier try (not read back).
    reused: int = 0
    rehashed: int = 0
    rehash_seconds: float = 0.0
    stop: bool = False
    #: relpath -> SHA-256 computed by this process from the file's bytes (DownloadStats.digests).
    digests: dict[str, str] = field(default_factory=dict)

    def add(self, retries: int = 0, refetched: int = 0, resumed: int = 0) -> None:
        with self.lock:
            self.retries += retries
            self.refetched += refetched
            self.resumed += resumed

    def verified(self, relpath: str, digest: str) -> None:
        """Record the SHA-256 computed here from ``relpath``'s bytes, now at its final name."""
        with self.lock:
            self.digests[relpath] = digest
