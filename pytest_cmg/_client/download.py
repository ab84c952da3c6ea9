"""The download core: fetch a manifest's files, verifying each one while it streams.

Speed (measured in docs/benchmarks.md, summarised in docs/emulation.md, "Download core"): on
this machine SHA-256, ~250-300 MB/s on one core, is the ceiling of any verified download; one
streaming GET per file beats ranged GETs against Azurite, whose CPU cost per range is 15-23 ms;
the Azure SDK is client-CPU-bound.

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

Integrity (docs/reliability.md rows 1-8): bytes go to ``<name>.part``; the file reaches its final name only
after its size and SHA-256 match the manifest, and that SHA-256 is always one this process computed
from the bytes (as they streamed in, or read back from disk for what an earlier run left): never a
size, a name or a journal taken on trust. The digests are returned (:attr:`DownloadStats.digests`)
so the engine checks the package hash from them too. The ETag of the first answer is pinned with
``If-Match`` on every later request (ranges and resumes), and a different ETag or a 412 restarts
the file from zero instead of splicing two versions; a ``206`` whose ``Content-Range`` does not
start where asked, and a ``200`` to a range request, are never appended; a size that differs from
the manifest's is a hash failure at once. An expired SAS (403) is renewed through the gateway
(``renew``), once per file; so is one whose ``se`` is less than ``sas_margin`` seconds away when a
request is about to start (docs/reliability.md row 21: renew before it lapses, not after a 403), using the
same once-per-file budget.

Retries (docs/reliability.md rows 15-20): see :mod:`.retry`. A cut connection resumes at the byte where it
stopped (``Range: bytes=N-``, the bytes already in the buffer are kept), with the hash continuing.

Resume after the process dies (docs/reliability.md rows 9-14): next to each ``.part`` file the core keeps a
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

* streamed bytes: hashed from the very buffer that was written (:meth:`._job.Job.hash`), so what
  is on disk is what was hashed; :meth:`._job.Job.commit` is the only rename to a final name, and it
  records the digest it compared;
* a journaled prefix: re-read and re-hashed (``Job._take_over``); the journal only says
  where to resume, never what the bytes are;
* a ``.part`` without a usable journal: truncated (:meth:`._job.Job.open`), never used;
* a file at its final name from an earlier run: re-hashed (:func:`._leftovers.take_leftover`);
* a file of size 0: fetched (its GET proves the blob exists) and its digest, that of no bytes,
  compared like any other; found at its final name it is "re-hashed" for free;
* ``fsync=True`` changes when bytes reach the disk, not what is trusted: a power cut that loses
  a rename brings back the ``.part`` or the staging folder, which the rules above re-hash.

Where each job lives (this module runs the download: worker threads, one file's loop of tries,
the receiving threads of a large file):

* :mod:`._job`: one file's ``.part`` (open, take over, write, hash, checkpoint, restart, commit)
  and the state the threads of one download share;
* :mod:`._request`: one storage GET and the checks on its answer, SAS renewal;
* :mod:`._window`: the in-order hand-off from receiving threads to the hashing thread;
* :mod:`._leftovers`: what an earlier run or a failed try left in the staging folder;
* :mod:`._failures`: restart, retry, renew and give-up signals, and the retry budget;
* :mod:`._journal` and :mod:`._http`: the resume journal and the HTTP/1.1 client.
"""

from __future__ import annotations

import errno
import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._errors import ContentError, InvalidValueError
from .._protocol import codes
from . import _journal  # noqa: F401 - tests patch _journal.write through this module
from ._failures import Budget, Fatal, Restart, SasRefused, Transient
from ._http import ConnectionPool
from ._job import Checkpoints, Job, Run
from ._leftovers import Carried, sync_folders, take_leftover
from ._request import redact, renew, stream
from ._window import CHUNK, Segments, Window
from .retry import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from pathlib import Path

    from .._protocol.manifest import ContentManifest, ManifestFile

__all__ = ["DownloadCore", "DownloadStats", "redact"]

#: Files this large get a receiving thread, so the hash overlaps the network and the disk.
_PIPELINE_MIN = 8 << 20
_PIPELINE_WINDOW = 3 * CHUNK
_MAX_RANGE_WINDOW = 32 << 20
#: The name the hand-off had when it lived here (tests reach it through this module).
_Window = Window


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
        if workers < 1 or range_parts < 1 or range_size < CHUNK or journal_bytes < 0:
            msg = (
                f"DownloadCore(workers={workers}, range_parts={range_parts}, "
                f"range_size={range_size}, journal_bytes={journal_bytes}): give workers and "
                "range_parts >= 1, range_size >= 1 MiB and journal_bytes >= 0"
            )
            raise InvalidValueError(msg)
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
        #: before its rename (docs/reliability.md test 12 kills the process there).
        self.before_commit: Callable[[str, Path], None] | None = None
        if ssl_context is None and ca_file is not None:
            ssl_context = ssl.create_default_context(cafile=os.fspath(ca_file))
        self.pool = ConnectionPool(timeout=timeout, ssl_context=ssl_context)
        # One ranged file at a time keeps the memory of the reorder windows bounded.
        self._ranged = threading.Semaphore(1)
        #: dest -> files of a failed download() that this core had verified and renamed, with
        #: their identity then: the next try into the same dest need not read them back.
        self._carried = Carried()

    @property
    def connections_opened(self) -> int:
        """Storage connections opened so far (keep-alive keeps this near ``workers``)."""
        return self.pool.opened

    def close(self) -> None:
        self.pool.close()

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
        carried = self._carried.take(root)
        run = Run(
            self, manifest, dest, root, renew, leftovers, Checkpoints(), {root}, threading.Lock(),
            carried,
        )  # fmt: skip
        # Largest first; a file an earlier run finished is re-hashed by the worker that takes
        # it (take_leftover), so those re-reads run in parallel like downloads.
        files = sorted(manifest.files, key=lambda f: f.size, reverse=True)
        total = sum(f.size for f in files)
        errors: list[BaseException] = []
        pending = iter(files)

        def worker() -> None:
            buf = memoryview(bytearray(CHUNK))
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
            self._carried.keep(run)
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
            self._carried.keep(run)
            raise errors[0]
        if self.fsync:
            sync_folders(run)
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

    # -- one file --

    def _fetch(self, run: Run, item: ManifestFile, buf: memoryview) -> None:
        if run.leftovers and take_leftover(self, run, item, buf):
            return
        job = Job(run, item)
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
                except Fatal as fatal:
                    if fatal.hresult != codes.HASH_MISMATCH or not job.taken_over:
                        raise
                    # The bytes taken over from disk may be what is wrong, not the blob's.
                    job.taken_over = False
                    self._restarted(job, Restart("mismatch after resuming from disk"))
        except Fatal as fatal:
            job.abandon(keep=fatal.keep_partial)
            raise ContentError(fatal.hresult, fatal.message, resumable=fatal.keep_partial) from None
        except OSError as exc:
            # docs/reliability.md test 39: a full disk leaves no partial file behind. The OSError goes on
            # up: the engine reports it as "cache full" with the product's lines.
            job.abandon(keep=exc.errno not in (errno.ENOSPC, errno.EDQUOT))
            raise
        except BaseException:
            job.abandon(keep=True)
            raise
        if self.on_progress is not None:
            self.on_progress(0, 1)

    def _fetch_inline(self, job: Job, buf: memoryview) -> None:
        """Small files: receive, write and hash on this thread."""
        item = job.item
        budget = Budget(self.retry)
        while True:
            try:
                stream(self, job, job.hashed, item.size, ranged=False, buf=buf)
                return
            except Restart as restart:
                failure = self._restarted(job, restart)
            except Transient as transient:
                failure = transient
            except SasRefused as refused:
                renew(job, refused)
                continue
            self._wait(job, budget, job.hashed, failure)

    def _fetch_streamed(self, job: Job) -> None:
        """Large files: receiving threads write, this thread hashes in order."""
        item = job.item
        budget = Budget(self.retry)
        parts = self.range_parts if item.size >= self.range_threshold else 1
        slot = parts > 1 and self._ranged.acquire(blocking=False)
        if not slot:
            parts = 1
        try:
            while job.hashed < item.size:
                try:
                    self._stream_parallel(job, parts)
                    return
                except Restart as restart:
                    if restart.no_ranges:
                        parts = 1
                    failure = self._restarted(job, restart)
                self._wait(job, budget, job.hashed, failure)
        finally:
            if slot:
                self._ranged.release()

    def _restarted(self, job: Job, restart: Restart) -> Transient:
        self.on_event(f"{job.item.relpath}: restarting from 0 ({restart.reason})")
        job.run.add(refetched=job.restart())
        return Transient(restart.reason)

    def _wait(
        self,
        job: Job,
        budget: Budget,
        position: int,
        failure: Transient,
        window: Window | None = None,
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

    def _stream_parallel(self, job: Job, parts: int) -> None:
        item = job.item
        if parts > 1:
            step = self.range_size
            window = Window(
                job.hashed, min(max(parts * step, 2 * parts * CHUNK), _MAX_RANGE_WINDOW)
            )
        else:
            step = item.size
            window = Window(job.hashed, _PIPELINE_WINDOW)
        segments = Segments(job.hashed, item.size, step)
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
        job: Job,
        window: Window,
        bounds: tuple[int, int],
        ranged: bool,
    ) -> None:
        start, end = bounds
        budget = Budget(self.retry)
        position = [start]
        while position[0] < end and not window.aborted:
            try:
                stream(self, job, position[0], end, ranged=ranged, window=window, cursor=position)
            except Transient as transient:
                if window.aborted:
                    return
                self._wait(job, budget, position[0], transient, window)
            except SasRefused as refused:
                renew(job, refused)
