"""The download core: fetch a manifest's files, verifying each one while it streams.

Design anchored in performance.md: on this machine SHA-256 (~250-300 MB/s on one core) is the
ceiling of any verified download, and one streaming GET per file beats ranged GETs against Azurite
(each range costs Azurite 15-23 ms of CPU). So each file is one streaming GET with the hash updated
on every chunk as it is written (never a second read), files run in parallel on kept-alive
connections, and a file reaches its final name only after its size and hash are checked.

When a transfer is cut, the file resumes where the bytes stopped (``Range: bytes=N-``) with the
hash continuing from the same state; the ETag of the first answer is pinned with ``If-Match``, so
a blob replaced mid-download restarts the file from zero instead of splicing two versions; a
``206`` whose ``Content-Range`` does not start at N, and a ``200`` to a resume request, are never
appended (reliability.md A4, A5, B1). An expired SAS is renewed through the gateway (``renew``).

Not yet here (issue 4): resume after the process is killed (offsets are not persisted).
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import requests

from .._errors import ContentError
from .._protocol import codes
from .retry import RetryPolicy, is_transient_status, parse_retry_after

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path
    from typing import BinaryIO

    from .._protocol.manifest import ContentManifest, ManifestFile

__all__ = ["DownloadCore", "DownloadStats", "redact"]

_CHUNK = 1 << 20
_USER_AGENT = "SMS CCM 5.0 TS"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
#: Storage answers an expired or otherwise invalid SAS with 403 and one of these codes.
_AUTH_ERRORS = frozenset({"AuthenticationFailed", "AuthorizationFailure"})


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


@dataclass
class _Progress:
    retries: int = 0
    refetched: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, retries: int = 0, refetched: int = 0) -> None:
        with self.lock:
            self.retries += retries
            self.refetched += refetched


@dataclass
class _FileState:
    """One file's transfer so far. Invariant: ``offset`` bytes are in ``out`` and in ``digest``."""

    out: BinaryIO
    url: str
    offset: int = 0
    etag: str | None = None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    #: The furthest offset ever reached: only passing it is progress, so re-fetching the same
    #: bytes after a restart cannot keep the retry budget open forever.
    high_water: int = 0
    progressed: bool = False
    renewed: bool = False

    def append(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.out.write(chunk)
        self.offset += len(chunk)
        if self.offset > self.high_water:
            self.high_water = self.offset
            self.progressed = True

    def restart(self) -> None:
        self.out.seek(0)
        self.out.truncate()
        self.digest = hashlib.sha256()
        self.offset = 0
        self.etag = None


class _Restart(Exception):
    """The partial file cannot be continued; start again from byte 0."""


class _Transient(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class DownloadCore:
    """Parallel, verifying, resuming downloader of manifest files into a folder.

    :param workers: files fetched at once (each on its own kept-alive connection).
    :param timeout: seconds to wait for a connection or for the next bytes of a response.
    :param retry: retry bounds, clock and sleep (inject fakes in tests).
    :param on_event: receives one line per retry, restart or renewal (for the client's log).
    """

    def __init__(
        self,
        *,
        workers: int = 8,
        timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        on_event: Callable[[str], None] | None = None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.workers = workers
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.on_event = on_event or (lambda line: None)
        #: ``on_progress(new_bytes, files_done)``: called from the download threads as bytes
        #: arrive (``files_done`` 0) and once per verified file (``new_bytes`` 0).
        self.on_progress = on_progress
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Storage is reached directly, never through an environment proxy (see CMGClient).
            session.trust_env = False
            session.headers["User-Agent"] = _USER_AGENT
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()

    def download(
        self,
        manifest: ContentManifest,
        dest: Path,
        renew: Callable[[ManifestFile], str] | None = None,
    ) -> DownloadStats:
        """Fetch every file of ``manifest`` into ``dest``; raise :class:`ContentError` on failure.

        ``renew(file)`` returns a fresh URL for a file whose SAS storage refused (403); without
        it such a refusal is final. Files start largest first so the longest transfer overlaps
        the many small ones.
        """
        started = time.perf_counter()
        files = sorted(manifest.files, key=lambda f: f.size, reverse=True)
        if not files:
            return DownloadStats(0, 0, 0.0)
        progress = _Progress()
        total = 0
        with ThreadPoolExecutor(max_workers=min(self.workers, len(files))) as pool:
            futures = [pool.submit(self._fetch, item, dest, renew, progress) for item in files]
            try:
                for future in as_completed(futures):
                    total += future.result()
            except BaseException:
                # First failure wins: files not started yet are not fetched for nothing.
                for future in futures:
                    future.cancel()
                raise
        return DownloadStats(
            len(files), total, time.perf_counter() - started, progress.retries, progress.refetched
        )

    def _fetch(
        self,
        item: ManifestFile,
        dest: Path,
        renew: Callable[[ManifestFile], str] | None,
        progress: _Progress,
    ) -> int:
        target = dest / item.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        policy = self.retry
        with part.open("wb") as out:
            state = _FileState(out=out, url=item.url)
            failures = 0
            last_progress = policy.clock()
            while True:
                try:
                    self._transfer(item, state)
                    break
                except _Restart as restart:
                    self.on_event(f"{item.relpath}: restarting from 0 ({restart})")
                    progress.add(refetched=state.offset)
                    state.restart()
                    failure = _Transient(str(restart))
                except _Transient as transient:
                    failure = transient
                except _SasRefused as refused:
                    if renew is None or state.renewed:
                        part.unlink(missing_ok=True)
                        raise ContentError(
                            codes.BAD_HTTP_STATUS,
                            f"GET {redact(state.url)} answered 403 {refused.code}".rstrip(),
                        ) from None
                    # One renewal per file: a fresh URL that is refused too is final.
                    self.on_event(f"{item.relpath}: SAS refused ({refused.code}), renewing")
                    state.url, state.renewed = renew(item), True
                    continue
                except _Fatal as fatal:
                    part.unlink(missing_ok=True)
                    raise ContentError(fatal.hresult, fatal.message) from None
                now = policy.clock()
                if state.progressed:
                    # Progress restarts both budgets, as BITS resets its no-progress timer.
                    failures, last_progress, state.progressed = 0, now, False
                failures += 1
                stalled = now - last_progress
                if failures > policy.attempts or stalled > policy.no_progress_timeout:
                    part.unlink(missing_ok=True)
                    raise ContentError(
                        codes.CONNECTION_ABORTED,
                        f"{item.relpath}: gave up after {failures} failed tries in a row "
                        f"({stalled:.0f} s without progress, {state.offset} of {item.size} "
                        f"bytes): {failure.reason}",
                    )
                wait = policy.backoff(failures, failure.retry_after)
                progress.add(retries=1)
                self.on_event(
                    f"{item.relpath}: {failure.reason}; retry {failures} in {wait:.1f} s "
                    f"from byte {state.offset}"
                )
                policy.sleep(wait)
        if state.digest.hexdigest() != item.sha256.lower():
            part.unlink(missing_ok=True)
            raise ContentError(
                codes.HASH_MISMATCH,
                f"{item.relpath}: SHA-256 {state.digest.hexdigest()} does not match manifest "
                f"{item.sha256}",
            )
        part.rename(target)
        if self.on_progress is not None:
            self.on_progress(0, 1)
        return state.offset

    def _transfer(self, item: ManifestFile, state: _FileState) -> None:
        """One request from ``state.offset`` on; returns when the file is whole, else raises."""
        headers = {}
        if state.offset:
            headers["Range"] = f"bytes={state.offset}-"
        if state.etag:
            headers["If-Match"] = state.etag
        try:
            response = self._session().get(
                state.url, headers=headers, stream=True, timeout=self.timeout
            )
        except requests.RequestException as exc:
            reason = f"GET {redact(state.url)} failed: {exc.__class__.__name__}"
            raise _Transient(reason) from None
        with response:
            status = response.status_code
            if status == 412:
                msg = "the blob changed since the download began (412, ETag)"
                raise _Restart(msg)
            if status == 416:
                msg = f"range from byte {state.offset} not satisfiable (416)"
                raise _Restart(msg)
            if status == 403 and response.headers.get("x-ms-error-code") in _AUTH_ERRORS:
                raise _SasRefused(response.headers.get("x-ms-error-code", ""))
            if status not in (200, 206):
                reason = f"GET {redact(state.url)} answered {status}"
                if is_transient_status(status):
                    raise _Transient(reason, parse_retry_after(response.headers.get("Retry-After")))
                code = response.headers.get("x-ms-error-code", "")
                raise _Fatal(codes.BAD_HTTP_STATUS, f"{reason} {code}".rstrip())
            if state.offset and status == 200:
                # The server ignored the range: appending would duplicate the first bytes.
                msg = "a resume request was answered 200 (range ignored)"
                raise _Restart(msg)
            if status == 206:
                self._check_range(response.headers.get("Content-Range", ""), state.offset, item)
            else:
                length = response.headers.get("Content-Length")
                if length is not None and length.isdigit() and int(length) != item.size:
                    # Not the content the manifest describes: no retry can fix that.
                    msg = f"{item.relpath}: storage holds {length} bytes, manifest says {item.size}"
                    raise _Fatal(codes.HASH_MISMATCH, msg)
            state.etag = state.etag or response.headers.get("ETag")
            try:
                for chunk in response.iter_content(_CHUNK):
                    if state.offset + len(chunk) > item.size:
                        raise _Fatal(
                            codes.HASH_MISMATCH,
                            f"{item.relpath}: more than the manifest's {item.size} bytes",
                        )
                    state.append(chunk)
                    if self.on_progress is not None:
                        self.on_progress(len(chunk), 0)
            except requests.RequestException as exc:
                msg = (
                    f"connection lost after {state.offset} of {item.size} bytes "
                    f"({exc.__class__.__name__})"
                )
                raise _Transient(msg) from None
        if state.offset != item.size:
            msg = f"the answer ended after {state.offset} of {item.size} bytes"
            raise _Transient(msg)

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


class _SasRefused(Exception):
    def __init__(self, code: str) -> None:
        self.code = code
        super().__init__(code)


class _Fatal(Exception):
    def __init__(self, hresult: int, message: str) -> None:
        self.hresult = hresult
        self.message = message
        super().__init__(message)
