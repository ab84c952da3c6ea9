"""The download core: fetch a manifest's files, verifying each one while it streams.

Design anchored in performance.md: on this machine SHA-256 (~250-300 MB/s on one core) is the
ceiling of any verified download, and one streaming GET per file beats ranged GETs against Azurite
(each range costs Azurite 15-23 ms of CPU). So each file is one streaming GET with the hash updated
on every chunk as it is written (never a second read), files run in parallel on kept-alive
connections, and a file reaches its final name only after its size and hash are checked.

Not yet here (issue 4): ranges for resume, retries with backoff, SAS renewal, ETag pinning.
"""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TYPE_CHECKING

import requests

from .._errors import ContentError
from .._protocol import codes

if TYPE_CHECKING:
    from pathlib import Path

    from .._protocol.manifest import ContentManifest, ManifestFile

__all__ = ["DownloadCore", "DownloadStats", "redact"]

_CHUNK = 1 << 20
_USER_AGENT = "SMS CCM 5.0 TS"


def redact(url: str) -> str:
    """A URL fit for logs: the SAS query (its ``sig``) never leaves the process."""
    return url.split("?", 1)[0]


@dataclass(frozen=True)
class DownloadStats:
    files: int
    bytes: int
    seconds: float


class DownloadCore:
    """Parallel, verifying downloader of manifest files into a folder.

    :param workers: files fetched at once (each on its own kept-alive connection).
    :param timeout: seconds to wait for a connection or for the next bytes of a response.
    """

    def __init__(self, *, workers: int = 8, timeout: float = 30.0) -> None:
        self.workers = workers
        self.timeout = timeout
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

    def download(self, manifest: ContentManifest, dest: Path) -> DownloadStats:
        """Fetch every file of ``manifest`` into ``dest``; raise :class:`ContentError` on failure.

        Files are started largest first so the longest transfer overlaps the many small ones.
        """
        started = time.perf_counter()
        files = sorted(manifest.files, key=lambda f: f.size, reverse=True)
        if not files:
            return DownloadStats(0, 0, 0.0)
        total = 0
        with ThreadPoolExecutor(max_workers=min(self.workers, len(files))) as pool:
            futures = [pool.submit(self._fetch, item, dest) for item in files]
            try:
                for future in as_completed(futures):
                    total += future.result()
            except BaseException:
                # First failure wins: files not started yet are not fetched for nothing.
                for future in futures:
                    future.cancel()
                raise
        return DownloadStats(len(files), total, time.perf_counter() - started)

    def _fetch(self, item: ManifestFile, dest: Path) -> int:
        target = dest / item.relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        part = target.with_name(target.name + ".part")
        try:
            response = self._session().get(item.url, stream=True, timeout=self.timeout)
        except requests.RequestException as exc:
            raise ContentError(
                codes.BAD_HTTP_STATUS, f"GET {redact(item.url)} failed: {exc.__class__.__name__}"
            ) from exc
        with response:
            if response.status_code != 200:
                error_code = response.headers.get("x-ms-error-code", "")
                raise ContentError(
                    codes.BAD_HTTP_STATUS,
                    f"GET {redact(item.url)} answered {response.status_code} {error_code}".rstrip(),
                )
            digest = hashlib.sha256()
            received = 0
            try:
                with part.open("wb") as out:
                    for chunk in response.iter_content(_CHUNK):
                        received += len(chunk)
                        if received > item.size:
                            break
                        digest.update(chunk)
                        out.write(chunk)
            except requests.RequestException as exc:
                # A cut mid-body (reset, early close, read timeout): what BITS reports as
                # ERROR_INTERNET_CONNECTION_ABORTED. Resuming from the offset is issue 4.
                part.unlink(missing_ok=True)
                raise ContentError(
                    codes.CONNECTION_ABORTED,
                    f"{item.relpath}: connection lost after {received} of {item.size} bytes "
                    f"({exc.__class__.__name__})",
                ) from exc
        if received != item.size:
            part.unlink(missing_ok=True)
            raise ContentError(
                codes.HASH_MISMATCH,
                f"{item.relpath}: received {received} bytes, manifest says {item.size}",
            )
        if digest.hexdigest() != item.sha256.lower():
            part.unlink(missing_ok=True)
            raise ContentError(
                codes.HASH_MISMATCH,
                f"{item.relpath}: SHA-256 {digest.hexdigest()} does not match manifest {item.sha256}",
            )
        part.rename(target)
        return received
