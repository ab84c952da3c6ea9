"""The download core: fetch a manifest's files, verifying each one while it streams.

Speed (anchored in performance.md: on this machine SHA-256, ~250-300 MB/s on one core, is the
ceiling of any verified download; one streaming GET per file beats ranged GETs against Azurite,
whose CPU cost per range is 15-23 ms; the Azure SDK is client-CPU-bound):

* Storage GETs go through :mod:`._http`, a thin HTTP/1.1 client on kept-alive sockets (shared
  by the worker threads through a pool), not ``requests``: the body is received with
  ``recv_into`` straight into a reused 1 MiB buffer, which is hashed and written as a
  ``memoryview`` (no bytes object per chunk). ``hashlib``, ``recv_into`` and ``pwrite`` all
  release the GIL on such buffers, so threads overlap.
* Files run in parallel, largest first, one worker thread and one kept-alive connection each
  (``workers``, 8 by default: Azurite is a single Node thread and ~8 connections saturate it).
  A small file costs one ``open``, one request, one ``pwrite``, one ``rename``; folders are made
  once per download, not once per file.
* A file of 8 MiB or more is received by a helper thread while the worker thread hashes what
  already arrived (three 1 MiB buffers in flight), so receive-and-write overlaps the hash.
* Ranges (``range_parts`` > 1, off by default): a file of at least ``range_threshold`` bytes is
  fetched by ``range_parts`` connections at once, each taking the next ``range_size`` range. The
  hash still runs in order while bytes stream: ranges that arrive early are written at their
  offset at once and kept in memory until the hash reaches them, within a window of
  ``range_parts * range_size`` bytes (at most 32 MiB; a connection that runs a window ahead of
  the hash waits). One file at a time uses ranges, so memory stays bounded. It is off by
  default because against Azurite one streaming GET is faster (each range costs Azurite a
  fixed 15-23 ms of CPU, and the hash is the limit anyway); it can pay off where a server or a
  network path caps the rate of each connection.

Integrity (reliability.md A1-A5): bytes go to ``<name>.part``; the file reaches its final name only
after its size and SHA-256 match the manifest, and that SHA-256 is always one this process computed
from the bytes (as they streamed in, or read back from disk for what an earlier run left): never a
size, a name or a journal taken on trust. The digests are returned (:attr:`DownloadStats.digests`)
so the engine checks the package hash from them too. The ETag of the first answer is pinned with
``If-Match`` on every later request (ranges and resumes), and a different ETag or a 412 restarts
the file from zero instead of splicing two versions; a ``206`` whose ``Content-Range`` does not
start where asked, and a ``200`` to a range request, are never appended; a size that differs from
the manifest's is a hash failure at once. An expired SAS (403) is renewed through the gateway
(``renew``), once per file; so is one whose ``se`` is less than ``sas_margin`` seconds away when a
request is about to start (reliability.md C4: renew before it lapses, not after a 403), using the
same once-per-file budget.

Retries (reliability.md B2, B3): see :mod:`.retry`. A cut connection resumes at the byte where it
stopped (``Range: bytes=N-``, the bytes already in the buffer are kept), with the hash continuing.

Resume after the process dies (reliability.md B4): next to each ``.part`` file the core keeps a
journal (:mod:`._journal`: content ID, version, path, size, SHA-256, ETag and the last recorded
offset; never a URL or SAS). Checkpoints run on a background thread, at least ``journal_bytes``
apart and at most one per ``journal_seconds``, and only record bytes already written (handed to
the kernel) and hashed. Two durability levels:

* ``fsync=False`` (default): progress survives the *process* dying (SIGKILL, a crash, a
  task-sequence host killed): the kernel keeps every written page, so the recorded prefix is on
  the file whatever happens to the process. Nothing is ``fsync``'d, as aria2c, curl and the
  Azure SDK's ``download_blob`` do not. After a power cut a ``.part`` shorter than its journal
  starts over, and a resumed file whose final hash does not match is fetched once more from
  zero, so a lost page costs a re-download, never a wrong file.
* ``fsync=True``: also survives a power cut. A checkpoint ``fdatasync``'s the ``.part`` before
  the offset is recorded (the journal itself is written temp, ``fsync``, rename, ``fsync`` of
  the folder); writes of a file that can reach a checkpoint are handed to the kernel's writeback
  at once (``POSIX_FADV_DONTNEED`` on the written range) so a checkpoint finds little left to
  flush; every verified file is ``fdatasync``'d before its rename (a journaled file's folder
  right after it, and every folder of the download once at the end, so the renames are durable
  too). The cost is that every byte reaches the disk inside the download: measured on the
  256 MiB loopback blob it costs 12-16 % of throughput on this 2-core machine
  (docs/benchmarks.md), and each small file pays a disk flush.

``download()`` called again on the same staging folder (a new process, a new core) re-hashes each
file already at its final name from disk and skips it only if that SHA-256 matches the manifest
(one with another size or other bytes is deleted, logged and fetched again: a killed run, a
power cut without ``fsync`` or anything else may have left it), and continues each ``.part``
whose journal matches the manifest from the journal's offset, with ``If-Match`` on the recorded
ETag (412: start that file again). **hashlib cannot save a hash's state, so the core re-hashes
the recorded prefix once from disk**. These are the only times any byte is read back, and only
for what an earlier run left (a crash, or a download given up on a transient error, whose
partial file is kept for the next try); a fresh download never reads a byte back. Files this
core itself finished in a try that failed are not re-read on the next try into the same folder
when their inode, size and times are unchanged: their digest was computed in this process. A
file that never reached a checkpoint (smaller than ``journal_bytes`` or younger than
``journal_seconds``) starts over. A resumed file whose final hash does not match is fetched
once more from zero (the bytes on disk may be what is wrong). A full disk (ENOSPC) removes the
partial file and its journal and lets the ``OSError`` through: the engine reports it as "cache
full".

Where the "hashed in this process" rule is enforced, path by path:

* streamed bytes: hashed from the very buffer that was written (:meth:`_Job.hash`), so what is
  on disk is what was hashed; :meth:`_Job.commit` is the only rename to a final name, and it
  records the digest it compared;
* a journaled prefix: re-read and re-hashed (:meth:`_Job._take_over`); the journal only says
  where to resume, never what the bytes are;
* a ``.part`` without a usable journal: truncated (:meth:`_Job.open`), never used;
* a file at its final name from an earlier run: re-hashed (:meth:`DownloadCore._leftover`);
* a file of size 0: fetched (its GET proves the blob exists) and its digest, that of no bytes,
  compared like any other; found at its final name it is "re-hashed" for free;
* ``fsync=True`` changes when bytes reach the disk, not what is trusted: a power cut that loses
  a rename brings back the ``.part`` or the staging folder, which the rules above re-hash.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import queue
import re
import ssl
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import ContentError
from .._protocol import codes
from .._protocol.manifest import sas_expiry
from . import _journal
from ._http import Connection, ConnectionPool, Origin, Response, TransportError, split_url
from .retry import RetryPolicy, is_transient_status, parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .._protocol.manifest import ContentManifest, ManifestFile

__all__ = ["DownloadCore", "DownloadStats", "redact"]

_CHUNK = 1 << 20
_USER_AGENT = "SMS CCM 5.0 TS"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
#: Storage answers an expired or otherwise invalid SAS with 403 and one of these codes.
_AUTH_ERRORS = frozenset({"AuthenticationFailed", "AuthorizationFailure"})
#: Files this large get a receiving thread, so the hash overlaps the network and the disk.
_PIPELINE_MIN = 8 << 20
_PIPELINE_WINDOW = 3 * _CHUNK
_MAX_RANGE_WINDOW = 32 << 20
#: Failed downloads (folders) whose verified files a core remembers for the next try.
_MAX_CARRIED = 16
_PART = ".part"


def redact(url: str) -> str:
    """A URL fit for logs: the SAS query (its ``sig``) never leaves the process."""
    return url.split("?", 1)[0]


@dataclass(frozen=True)
class DownloadStats:
    files: int
    bytes: int
    seconds: float
    #: Requests repeated after a transient failure, and bytes fetched again after a restart.
    retries: int = 0
    refetched: int = 0
    #: Bytes of partial files taken over from an earlier run (re-hashed from disk, not fetched).
    resumed: int = 0
    #: Files found complete (at their final name) from an earlier run, not fetched again: each
    #: one re-hashed from disk (or finished by this core in an earlier try) and matching.
    skipped: int = 0
    #: relpath -> SHA-256 (lower-case hex) of every file of the manifest, as this process
    #: computed it from the file's bytes: while they streamed, or read back from disk for an
    #: earlier run's leftovers. Never copied from the manifest: the package hash is checked
    #: from these (the engine), so a file missing here was not verified.
    digests: Mapping[str, str] = field(default_factory=dict)
    #: Bytes of files found complete from an earlier run that were read back and re-hashed.
    rehashed: int = 0


# --- failures -------------------------------------------------------------------------------


class _Restart(Exception):
    """The partial file cannot be continued; start again from byte 0."""

    def __init__(self, reason: str, *, no_ranges: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The server ignores ranges: fetch the file as one stream from now on.
        self.no_ranges = no_ranges


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class _SasRefused(Exception):
    def __init__(self, code: str, url: str) -> None:
        self.code = code
        self.url = url
        super().__init__(code)


class _Fatal(Exception):
    def __init__(self, hresult: int, message: str, *, keep_partial: bool = False) -> None:
        self.hresult = hresult
        self.message = message
        #: The bytes so far are good (a give-up on transient errors): keep them for a later try.
        self.keep_partial = keep_partial
        super().__init__(message)


class _Budget:
    """Failures in a row and time without progress for one stream of requests (RetryPolicy)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.high_water = 0
        self.last_progress = policy.clock()

    def failed(self, position: int, size: int, relpath: str, failure: _Transient) -> float:
        """Count a failure at ``position``; the wait before the next try, or raise _Fatal."""
        policy = self.policy
        now = policy.clock()
        # Only passing the furthest byte ever reached is progress, so re-fetching the same bytes
        # after a restart cannot keep the budget open forever; progress restarts both budgets,
        # as BITS resets its no-progress timer.
        if position > self.high_water:
            self.high_water = position
            self.failures, self.last_progress = 0, now
        self.failures += 1
        stalled = now - self.last_progress
        if self.failures > policy.attempts or stalled > policy.no_progress_timeout:
            raise _Fatal(
                codes.CONNECTION_ABORTED,
                f"{relpath}: gave up after {self.failures} failed tries in a row "
                f"({stalled:.0f} s without progress, {position} of {size} bytes): "
                f"{failure.reason}",
                keep_partial=True,
            )
        return policy.backoff(self.failures, failure.retry_after)


# --- one file -------------------------------------------------------------------------------


class _Job:
    """One file's transfer. Invariant: ``hashed`` bytes are in ``digest`` and at the start of
    the ``.part`` file (bytes past it may be on disk too: early ranges, or a crash's leftovers).
    """

    def __init__(self, run: _Run, item: ManifestFile) -> None:
        self.run = run
        self.item = item
        # Plain strings: for 16 KiB files, pathlib's objects cost more than the syscalls.
        self.target = f"{run.dest_str}/{item.relpath}"
        self.part = self.target + _PART
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
        self.journaled = False
        #: Bytes came from an earlier run's ``.part`` (a mismatch may be the disk's fault).
        self.taken_over = False
        self._journal_ok = run.core.journal_bytes > 0
        #: Early writeback pays off only for a file whose checkpoints will flush it.
        self._writeback = (
            run.core.fsync and self._journal_ok and item.size > run.core.journal_bytes
        )
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
            and not self._pending
            and self.etag
        ):
            now = time.monotonic()
            if now - self._checkpoint_time >= core.journal_seconds:
                self._checkpointed, self._checkpoint_time = self.hashed, now
                with self.lock:
                    self._pending = True
                self.run.checkpoints.submit(self, self.hashed, self.etag)

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
            with self._idle:
                self._pending = False
                self._idle.notify_all()

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
        """Verify and rename; raise _Fatal (and remove the partial file) on a mismatch.

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
            raise _Fatal(
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


class _Checkpoints:
    """The background thread that makes checkpoints durable (fdatasync, then the journal)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[_Job, int, str] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, job: _Job, offset: int, etag: str) -> None:
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
_Identity = tuple[int, int, int, int, int]


def _identity(st: os.stat_result) -> _Identity:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Run:
    """State shared by the threads of one ``download()`` call."""

    core: DownloadCore
    manifest: ContentManifest
    dest: Path
    dest_str: str
    renew: Callable[[ManifestFile], str] | None
    #: The staging folder held files before this call: look for journals and finished files.
    leftovers: bool
    checkpoints: _Checkpoints
    dirs: set[str]
    lock: threading.Lock
    #: Files this core finished in an earlier try into ``dest`` that failed: relpath ->
    #: (digest computed then, identity of the file right after), see ``_carried``.
    carried: dict[str, tuple[str, _Identity]]
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


# --- in-order hand-off from receiving threads to the hashing thread ---------------------------


class _Segments:
    """The byte ranges of one file, handed out in order to the receiving threads."""

    def __init__(self, start: int, size: int, step: int) -> None:
        self._bounds = [(a, min(a + step, size)) for a in range(start, size, step)]
        self._next = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return len(self._bounds)

    def take(self) -> tuple[int, int] | None:
        with self._lock:
            if self._next >= len(self._bounds):
                return None
            self._next += 1
            return self._bounds[self._next - 1]


class _Window:
    """Buffers received at any offset, given to the hasher in offset order, within ``size`` bytes.

    A receiving thread may only fill a buffer that ends within ``size`` bytes of the hash, so
    memory is bounded; the thread holding the next bytes to hash is never the one waiting, so
    the hand-off cannot deadlock.
    """

    def __init__(self, start: int, size: int) -> None:
        self.next = start
        self.size = size
        self._pieces: dict[int, tuple[memoryview, int]] = {}
        self._free: list[memoryview] = []
        self._cond = threading.Condition()
        self._failure: BaseException | None = None
        self.aborted = False
        self.stopped = threading.Event()
        self.etag_known = threading.Event()
        self._active: set[Connection] = set()

    def buffer(self, position: int) -> memoryview | None:
        """A buffer for the bytes at ``position``; None when the transfer was aborted."""
        with self._cond:
            self._cond.wait_for(lambda: self.aborted or position + _CHUNK <= self.next + self.size)
            if self.aborted:
                return None
            return self._free.pop() if self._free else memoryview(bytearray(_CHUNK))

    def put(self, position: int, buf: memoryview, n: int) -> None:
        with self._cond:
            self._pieces[position] = (buf, n)
            self._cond.notify_all()

    def get(self) -> tuple[memoryview, int]:
        """The buffer holding the next bytes to hash; raises what a receiving thread raised."""
        with self._cond:
            self._cond.wait_for(lambda: self.next in self._pieces or self._failure is not None)
            if self.next in self._pieces:
                return self._pieces.pop(self.next)
            assert self._failure is not None
            raise self._failure

    def hashed(self, buf: memoryview, n: int) -> None:
        with self._cond:
            self.next += n
            self._free.append(buf)
            self._cond.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cond:
            if self._failure is None:
                self._failure = exc
            self._cond.notify_all()

    def track(self, conn: Connection, active: bool) -> None:
        with self._cond:
            if active:
                self._active.add(conn)
            else:
                self._active.discard(conn)

    def abort(self) -> None:
        """Stop every receiving thread, including one blocked on a socket."""
        with self._cond:
            self.aborted = True
            self._cond.notify_all()
            active = list(self._active)
        self.stopped.set()
        for conn in active:
            conn.abort()


# --- the core -------------------------------------------------------------------------------


class DownloadCore:
    """Parallel, verifying, resuming downloader of manifest files into a folder.

    :param workers: files fetched at once (each on its own kept-alive connection).
    :param timeout: seconds to wait for a connection or for the next bytes of a response.
    :param retry: retry bounds, clock and sleep (inject fakes in tests).
    :param on_event: receives one line per retry, restart, renewal or resume (for the log).
    :param on_progress: ``on_progress(new_bytes, files_done)``, called from the download
        threads as bytes are verified (``files_done`` 0) and once per verified file
        (``new_bytes`` 0). Bytes taken over from an earlier run or files found complete are
        reported too, so a progress bar reaches the total.
    :param ssl_context: TLS settings for ``https`` storage (default: system CAs, verification
        on); ``ca_file`` is a shortcut for a context trusting that CA bundle.
    :param range_parts: connections per large file (1: one streaming GET per file).
    :param range_threshold: files from this size on use ranges when ``range_parts`` > 1.
    :param range_size: bytes per ranged request.
    :param journal_bytes: bytes between two resume checkpoints (0: no journal).
    :param journal_seconds: minimum time between two checkpoints of a file.
    :param sas_margin: renew a SAS whose ``se`` is closer than this many seconds before a
        request uses it (0: only after storage refuses it).
    :param fsync: make checkpoints, verified files and their folders durable against a power
        cut, not only against the process dying (see the module docstring for the cost).
    """

    def __init__(
        self,
        *,
        workers: int = 8,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        on_event: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        range_parts: int = 1,
        range_threshold: int = 64 << 20,
        range_size: int = 8 << 20,
        journal_bytes: int = 8 << 20,
        journal_seconds: float = 1.0,
        fsync: bool = False,
        sas_margin: float = 60.0,
    ) -> None:
        if workers < 1 or range_parts < 1 or range_size < _CHUNK or journal_bytes < 0:
            msg = (
                "workers and range_parts must be >= 1, range_size >= 1 MiB, journal_bytes >= 0 "
                f"(got {workers}, {range_parts}, {range_size}, {journal_bytes})"
            )
            raise ValueError(msg)
        self.workers = workers
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_event = on_event or (lambda line: None)
        self.on_progress = on_progress
        self.range_parts = range_parts
        self.range_threshold = range_threshold
        self.range_size = range_size
        self.journal_bytes = journal_bytes
        self.journal_seconds = journal_seconds
        self.fsync = fsync
        self.sas_margin = sas_margin
        #: Test hook: ``before_commit(relpath, part)`` runs after a file's hash matched and
        #: before its rename (reliability.md test 12 kills the process there).
        self.before_commit: Callable[[str, Path], None] | None = None
        if ssl_context is None and ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=os.fspath(ca_file))
        self._pool = ConnectionPool(timeout=timeout, ssl_context=ssl_context)
        # One ranged file at a time keeps the memory of the reorder windows bounded.
        self._ranged = threading.Semaphore(1)
        #: dest -> files of a failed download() that this core had verified and renamed, with
        #: their identity then: the next try into the same dest need not read them back.
        self._carried: dict[str, dict[str, tuple[str, _Identity]]] = {}
        self._carried_lock = threading.Lock()

    @property
    def connections_opened(self) -> int:
        """Storage connections opened so far (keep-alive keeps this near ``workers``)."""
        return self._pool.opened

    def close(self) -> None:
        self._pool.close()

    # -- the manifest --

    def download(
        self,
        manifest: ContentManifest,
        dest: Path,
        renew: Callable[[ManifestFile], str] | None = None,
    ) -> DownloadStats:
        """Fetch every file of ``manifest`` into ``dest``; raise :class:`ContentError` on failure.

        ``renew(file)`` returns a fresh URL for a file whose SAS storage refused (403); without
        it such a refusal is final. Files start largest first so the longest transfer overlaps
        the many small ones. Called again on the same ``dest`` after a crash, it resumes (see
        the module docstring).
        """
        started = time.perf_counter()
        if not manifest.files:
            return DownloadStats(0, 0, 0.0)
        dest.mkdir(parents=True, exist_ok=True)
        with os.scandir(dest) as entries:
            leftovers = any(True for _ in entries)
        root = os.fspath(dest)
        with self._carried_lock:
            carried = self._carried.pop(root, {})
        run = _Run(
            self, manifest, dest, root, renew, leftovers, _Checkpoints(), {root}, threading.Lock(),
            carried,
        )  # fmt: skip
        # Largest first; a file an earlier run finished is re-hashed by the worker that takes
        # it (_leftover), so those re-reads run in parallel like downloads.
        files = sorted(manifest.files, key=lambda f: f.size, reverse=True)
        total = sum(f.size for f in files)
        errors: list[BaseException] = []
        pending = iter(files)

        def worker() -> None:
            buf = memoryview(bytearray(_CHUNK))
            while True:
                with run.lock:
                    item = None if run.stop else next(pending, None)
                if item is None:
                    return
                try:
                    self._fetch(run, item, buf)
                except BaseException as exc:
                    with run.lock:
                        # First failure wins: files not started yet are not fetched for nothing.
                        run.stop = True
                        errors.append(exc)
                    return

        threads = [
            threading.Thread(target=worker, name=f"download-{n}", daemon=True)
            for n in range(min(self.workers, len(files)))
        ]
        try:
            if len(threads) == 1:
                worker()  # one file: no thread to start
            else:
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        except BaseException:
            with run.lock:
                run.stop = True
            self._carry(run)
            raise
        finally:
            run.checkpoints.close()
        if run.skipped:
            self.on_event(
                f"{run.skipped} file(s) found complete from an earlier run, not fetched again: "
                f"{run.skipped - run.reused} re-hashed from disk ({run.rehashed} bytes in "
                f"{run.rehash_seconds:.2f} s), {run.reused} verified by this process in an "
                "earlier try"
            )
        if errors:
            self._carry(run)
            raise errors[0]
        if self.fsync:
            self._sync_folders(run)
        return DownloadStats(
            len(files),
            total,
            time.perf_counter() - started,
            run.retries,
            run.refetched,
            run.resumed,
            run.skipped,
            dict(run.digests),
            run.rehashed,
        )

    def _carry(self, run: _Run) -> None:
        """Keep what this failed download verified, for the next try into the same folder.

        The engine retries a download given up on transient errors into the same staging folder
        (SMSTSDownloadRetryCount): the files finished in this try were hashed by this process,
        so the next try trusts their digest as long as the file is, by inode, size and times,
        the one this core renamed. Anything else (another process, a power cut) is re-hashed.
        """
        kept: dict[str, tuple[str, _Identity]] = {}
        with run.lock:
            digests = dict(run.digests)
        for relpath, digest in digests.items():
            try:
                st = os.lstat(f"{run.dest_str}/{relpath}")
            except OSError:
                continue
            kept[relpath] = (digest, _identity(st))
        with self._carried_lock:
            self._carried.pop(run.dest_str, None)
            if kept:
                self._carried[run.dest_str] = kept
            # Bounded: only the latest few failed folders are worth remembering (the oldest go).
            while len(self._carried) > _MAX_CARRIED:
                del self._carried[next(iter(self._carried))]

    @staticmethod
    def _sync_folders(run: _Run) -> None:
        """Make every rename and every new folder of the download durable (``fsync=True``)."""
        folders = set()
        for folder in run.dirs:
            path = Path(folder)
            while path != run.dest and run.dest in path.parents:
                folders.add(path)
                path = path.parent
        folders.add(run.dest)
        for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            _journal.fsync_dir(path)

    def _leftover(self, run: _Run, item: ManifestFile, buf: memoryview) -> bool:
        """Whether ``item`` is already at its final name, verified from its bytes here.

        A final name left by an earlier run proves nothing by itself: that run may have been
        killed, the power may have gone before the kernel wrote the pages (``fsync=False``), or
        anything may have written there since. So the file is read back and re-hashed, and only
        a SHA-256 that matches the manifest lets it stay; any other file there (wrong size,
        other bytes, a link) is deleted and fetched again. The exception is a file this core
        verified and renamed itself in a try that failed (``run.carried``), still the same file.
        """
        target = f"{run.dest_str}/{item.relpath}"
        part = target + _PART
        try:
            # O_NOFOLLOW: a link at a final name is not a file this core wrote.
            fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self._discard(item, target, "is a symbolic link")
            return False  # a folder, say: not ours, and the rename will fail and say so
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return False  # not ours: the rename will fail and say so
            if st.st_size != item.size:
                os.close(fd)
                fd = -1
                self._discard(item, target, f"has {st.st_size} bytes, the manifest {item.size}")
                return False
            carried = run.carried.get(item.relpath)
            reused = carried is not None and carried[1] == _identity(st)
            actual: str | None
            if carried is not None and reused:
                actual = carried[0]  # computed by this process when it renamed this very file
                how = "computed by this process in an earlier try"
            else:
                began = time.perf_counter()
                actual = self._rehash(fd, item.size, buf)
                how = "re-computed from disk"
                with run.lock:
                    run.rehashed += item.size
                    run.rehash_seconds += time.perf_counter() - began
        finally:
            if fd >= 0:
                os.close(fd)
        if actual is None:
            self._discard(item, target, "changed size while it was re-hashed")
            return False
        if actual != item.sha256.lower():
            self._discard(item, target, f"has SHA-256 {actual} ({how}), the manifest {item.sha256}")
            return False
        # A journal left between an earlier run's rename and its deletion (and any .part beside
        # a verified file) has nothing more to give.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)  # noqa: PTH108
        _journal.remove(Path(part + _journal.SUFFIX))
        run.verified(item.relpath, actual)
        with run.lock:
            run.skipped += 1
            run.reused += reused
        if self.on_progress is not None:
            self.on_progress(item.size, 0)
            self.on_progress(0, 1)
        return True

    @staticmethod
    def _rehash(fd: int, size: int, buf: memoryview) -> str | None:
        """SHA-256 of the ``size`` bytes of ``fd``; None if it holds fewer or more bytes."""
        digest = hashlib.sha256()
        position = 0
        # Reads up to one byte past ``size``: enough to see a file longer than it should be.
        while position <= size:
            n = os.preadv(fd, [buf[: min(len(buf), size + 1 - position)]], position)
            if n <= 0:
                break
            digest.update(buf[:n])
            position += n
        # The size was checked just before; a file that changed meanwhile cannot match.
        return digest.hexdigest() if position == size else None

    def _discard(self, item: ManifestFile, target: str, why: str) -> None:
        self.on_event(
            f"{item.relpath}: found at its final name from an earlier run but {why}: "
            "deleted, fetching it again"
        )
        with contextlib.suppress(FileNotFoundError):
            os.unlink(target)  # noqa: PTH108

    # -- one file --

    def _fetch(self, run: _Run, item: ManifestFile, buf: memoryview) -> None:
        if run.leftovers and self._leftover(run, item, buf):
            return
        job = _Job(run, item)
        try:
            resumed = job.open(buf)
            if resumed:
                run.add(resumed=resumed)
                if self.on_progress is not None:
                    self.on_progress(resumed, 0)
            while True:
                if item.size >= _PIPELINE_MIN:
                    self._fetch_streamed(job)
                elif job.hashed < item.size or item.size == 0:
                    # A file of size 0 is fetched too: its GET proves the blob exists, and its
                    # digest (that of no bytes) is compared with the manifest's like any other.
                    self._fetch_inline(job, buf)
                try:
                    job.commit()
                    break
                except _Fatal as fatal:
                    if fatal.hresult != codes.HASH_MISMATCH or not job.taken_over:
                        raise
                    # The bytes taken over from disk may be what is wrong, not the blob's.
                    job.taken_over = False
                    self._restarted(job, _Restart("mismatch after resuming from disk"))
        except _Fatal as fatal:
            job.abandon(keep=fatal.keep_partial)
            raise ContentError(fatal.hresult, fatal.message, resumable=fatal.keep_partial) from None
        except OSError as exc:
            # reliability.md 39: a full disk leaves no partial file behind. The OSError goes on
            # up: the engine reports it as "cache full" with the product's lines.
            job.abandon(keep=exc.errno not in (errno.ENOSPC, errno.EDQUOT))
            raise
        except BaseException:
            job.abandon(keep=True)
            raise
        if self.on_progress is not None:
            self.on_progress(0, 1)

    def _fetch_inline(self, job: _Job, buf: memoryview) -> None:
        """Small files: receive, write and hash on this thread."""
        item = job.item
        budget = _Budget(self.retry)
        while True:
            try:
                self._stream(job, job.hashed, item.size, ranged=False, buf=buf)
                return
            except _Restart as restart:
                failure = self._restarted(job, restart)
            except _Transient as transient:
                failure = transient
            except _SasRefused as refused:
                self._renew(job, refused)
                continue
            self._wait(job, budget, job.hashed, failure)

    def _fetch_streamed(self, job: _Job) -> None:
        """Large files: receiving threads write, this thread hashes in order."""
        item = job.item
        budget = _Budget(self.retry)
        parts = self.range_parts if item.size >= self.range_threshold else 1
        slot = parts > 1 and self._ranged.acquire(blocking=False)
        if not slot:
            parts = 1
        try:
            while job.hashed < item.size:
                try:
                    self._stream_parallel(job, parts)
                    return
                except _Restart as restart:
                    if restart.no_ranges:
                        parts = 1
                    failure = self._restarted(job, restart)
                self._wait(job, budget, job.hashed, failure)
        finally:
            if slot:
                self._ranged.release()

    def _restarted(self, job: _Job, restart: _Restart) -> _Transient:
        self.on_event(f"{job.item.relpath}: restarting from 0 ({restart.reason})")
        job.run.add(refetched=job.restart())
        return _Transient(restart.reason)

    def _wait(
        self,
        job: _Job,
        budget: _Budget,
        position: int,
        failure: _Transient,
        window: _Window | None = None,
    ) -> None:
        wait = budget.failed(position, job.item.size, job.item.relpath, failure)
        job.run.add(retries=1)
        self.on_event(
            f"{job.item.relpath}: {failure.reason}; retry {budget.failures} in {wait:.1f} s "
            f"from byte {position}"
        )
        if window is not None and self.retry.sleep is time.sleep:
            # A range waiting to retry must not hold up the file when another range failed.
            window.stopped.wait(wait)
        else:
            self.retry.sleep(wait)

    def _renew(self, job: _Job, refused: _SasRefused) -> None:
        with job.lock:
            if job.url != refused.url:
                return  # another range of this file already renewed it
            if job.run.renew is None or job.renewed:
                raise _Fatal(
                    codes.BAD_HTTP_STATUS,
                    f"GET {redact(refused.url)} answered 403 {refused.code}".rstrip(),
                )
            # One renewal per file: a fresh URL that is refused too is final.
            job.renew(f"SAS refused ({refused.code}), renewing")

    def _renew_early(self, job: _Job) -> None:
        """Renew a SAS that lapses within ``sas_margin`` before using it (once per file)."""
        if job.renewed or job.run.renew is None or self.sas_margin <= 0:
            return
        left = job.sas_seconds_left()
        if left is None or left >= self.sas_margin:
            return
        with job.lock:
            if job.renewed:
                return  # another range of this file renewed it meanwhile
            when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
            job.renew(f"SAS {when}, renewing before the request")

    def _stream_parallel(self, job: _Job, parts: int) -> None:
        item = job.item
        if parts > 1:
            step = self.range_size
            window = _Window(
                job.hashed, min(max(parts * step, 2 * parts * _CHUNK), _MAX_RANGE_WINDOW)
            )
        else:
            step = item.size
            window = _Window(job.hashed, _PIPELINE_WINDOW)
        segments = _Segments(job.hashed, item.size, step)
        if job.etag:
            window.etag_known.set()

        def receive(first: bool) -> None:
            try:
                if not first:
                    # Later ranges wait for the first answer's ETag, so all of them pin it.
                    window.etag_known.wait()
                while not window.aborted and (bounds := segments.take()) is not None:
                    self._fetch_range(job, window, bounds, parts > 1)
            except BaseException as exc:
                window.fail(exc)
            finally:
                window.etag_known.set()

        threads = [
            threading.Thread(target=receive, args=(n == 0,), name=f"range-{n}", daemon=True)
            for n in range(min(parts, segments.count))
        ]
        for thread in threads:
            thread.start()
        try:
            while job.hashed < item.size:
                buf, n = window.get()
                job.hash(buf[:n])
                window.hashed(buf, n)
        except BaseException:
            window.abort()
            raise
        finally:
            for thread in threads:
                thread.join()

    def _fetch_range(
        self,
        job: _Job,
        window: _Window,
        bounds: tuple[int, int],
        ranged: bool,
    ) -> None:
        start, end = bounds
        budget = _Budget(self.retry)
        position = [start]
        while position[0] < end and not window.aborted:
            try:
                self._stream(job, position[0], end, ranged=ranged, window=window, cursor=position)
            except _Transient as transient:
                if window.aborted:
                    return
                self._wait(job, budget, position[0], transient, window)
            except _SasRefused as refused:
                self._renew(job, refused)

    # -- one request --

    def _stream(
        self,
        job: _Job,
        start: int,
        end: int,
        *,
        ranged: bool,
        buf: memoryview | None = None,
        window: _Window | None = None,
        cursor: list[int] | None = None,
    ) -> None:
        """One GET for bytes ``start``..``end`` of the file; returns when they are all in.

        Inline (``buf``): bytes are written and hashed here. Streamed (``window``): bytes are
        written here and handed to the hashing thread; ``cursor[0]`` follows the position.
        """
        item = job.item
        self._renew_early(job)
        url = job.url
        try:
            origin, target = split_url(url)
        except ValueError as exc:
            raise _Fatal(codes.BAD_HTTP_STATUS, f"{item.relpath}: unusable URL ({exc})") from None
        headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
        if ranged and (start or end < item.size):
            headers["Range"] = f"bytes={start}-{end - 1}"
        elif start:
            headers["Range"] = f"bytes={start}-"
        piece: memoryview | None = None
        if window is not None:
            # Room in the window first: a request whose answer could not be read yet would sit
            # on a connection that the server may time out.
            piece = window.buffer(start)
            if piece is None:
                return
        if job.etag:
            headers["If-Match"] = job.etag
        response = self._request(origin, target, headers, url)
        conn = response.connection
        if window is not None:
            window.track(conn, True)
        position = start
        try:
            self._check(job, response, start, "Range" in headers, url)
            if window is not None:
                window.etag_known.set()
            while position < end:
                if window is not None:
                    if piece is None:
                        piece = window.buffer(position)
                    if piece is None:
                        return
                else:
                    assert buf is not None
                    piece = buf
                view = piece[: min(len(piece), end - position)]
                try:
                    n = response.read_into(view)
                except TransportError as exc:
                    n = exc.received
                    if n:
                        position = self._deliver(job, view[:n], position, window, piece, cursor)
                    msg = f"connection lost after {position} of {item.size} bytes ({exc.reason})"
                    raise _Transient(msg) from None
                if not n:
                    msg = f"the answer ended after {position} of {item.size} bytes"
                    raise _Transient(msg)
                position = self._deliver(job, view[:n], position, window, piece, cursor)
                piece = None
            if not response.complete and not ranged and self._more_than_asked(response):
                raise _Fatal(
                    codes.HASH_MISMATCH,
                    f"{item.relpath}: more than the manifest's {item.size} bytes",
                )
        finally:
            if window is not None:
                window.track(conn, False)
            self._pool.release(conn, response)

    @staticmethod
    def _more_than_asked(response: Response) -> bool:
        """Whether a body without a length goes on past the file (one byte is enough to tell)."""
        try:
            return response.read_into(memoryview(bytearray(1))) > 0
        except TransportError:
            return False  # every byte asked for is in; the connection is not reused

    def _deliver(
        self,
        job: _Job,
        view: memoryview,
        position: int,
        window: _Window | None,
        piece: memoryview,
        cursor: list[int] | None,
    ) -> int:
        job.write(view, position)
        if window is None:
            job.hash(view)
        else:
            window.put(position, piece, len(view))
            assert cursor is not None
            cursor[0] = position + len(view)
        return position + len(view)

    def _request(self, origin: Origin, target: str, headers: dict[str, str], url: str) -> Response:
        try:
            return self._pool.get(origin, target, headers)
        except TransportError as exc:
            msg = f"GET {redact(url)} failed: {exc.reason}"
            raise _Transient(msg) from None

    def _check(self, job: _Job, response: Response, start: int, ranged: bool, url: str) -> None:
        """Everything about a response's head that decides whether its body may be used."""
        item = job.item
        status = response.status
        headers = response.headers
        if status not in (200, 206):
            # Read a short error body to the end, so the connection can be kept.
            with contextlib.suppress(TransportError):
                response.drain()
        if status == 412:
            msg = "the blob changed since the download began (412, ETag)"
            raise _Restart(msg)
        if status == 416:
            msg = f"range from byte {start} not satisfiable (416)"
            raise _Restart(msg)
        if status == 403 and headers.get("x-ms-error-code") in _AUTH_ERRORS:
            raise _SasRefused(headers.get("x-ms-error-code", ""), url)
        if status not in (200, 206):
            reason = f"GET {redact(url)} answered {status}"
            if is_transient_status(status):
                raise _Transient(reason, parse_retry_after(headers.get("retry-after")))
            code = headers.get("x-ms-error-code", "")
            raise _Fatal(codes.BAD_HTTP_STATUS, f"{reason} {code}".rstrip())
        if ranged and status == 200:
            # The server ignored the range: appending would duplicate the first bytes.
            msg = f"a {'resume' if start else 'range'} request was answered 200 (range ignored)"
            raise _Restart(msg, no_ranges=True)
        if status == 206:
            self._check_range(headers.get("content-range", ""), start, item)
        elif response.length is not None and response.length != item.size:
            # Not the content the manifest describes: no retry can fix that.
            msg = (
                f"{item.relpath}: storage holds {response.length} bytes, manifest says {item.size}"
            )
            raise _Fatal(codes.HASH_MISMATCH, msg)
        etag = headers.get("etag")
        with job.lock:
            if job.etag is None:
                job.etag = etag
            elif etag is not None and etag != job.etag:
                msg = f"the blob changed since the download began (ETag {etag} != {job.etag})"
                raise _Restart(msg)

    @staticmethod
    def _check_range(header: str, offset: int, item: ManifestFile) -> None:
        match = _CONTENT_RANGE.fullmatch(header.strip())
        if match is None:
            msg = f"206 with an unusable Content-Range {header!r}"
            raise _Restart(msg)
        start, _, total = (int(g) for g in match.groups())
        if total != item.size:
            msg = f"{item.relpath}: storage holds {total} bytes, manifest says {item.size}"
            raise _Fatal(codes.HASH_MISMATCH, msg)
        if start != offset:
            msg = f"206 for bytes {start}- when bytes {offset}- were asked"
            raise _Restart(msg)
