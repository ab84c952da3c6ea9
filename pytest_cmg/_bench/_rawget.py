"""The raw ceilings: plain keep-alive GETs whose bodies are discarded, or hashed and written.

``get_all`` reads each body into a buffer and discards it: storage's and the HTTP stack's own
ceiling. Shared by the benchmark command (its ``raw`` case) and benchmark scenarios (their
``raw`` baseline), so both measure it the same way. Stdlib only: benchmark scenarios import it
in ordinary sessions.

``get_all_verified`` is the same loop that also feeds every byte to SHA-256 and writes it to a
file (the ``raw-verified`` case): what a verified download costs on this stack and this machine,
with or without SHA extensions, and the fair ceiling of a verifying downloader. Each chunk costs
three calls (``readinto``, ``update``, ``write``), each of which releases the GIL; there is no
staging name, journal, retry or progress, which is what the download core adds on top of it.
It runs at the core's concurrency: ``workers`` connections for many files, and for a body of
8 MiB or more (the core's threshold) one receiving thread that reads and writes while the
calling thread hashes, three 1 MiB buffers in flight, as the core overlaps them. A single
inline loop there would put receive, write and hash end to end, and the core would beat its
own "ceiling" on the big blob (measured: 1.6x under load).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import queue
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import BenchError, InvalidValueError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from pathlib import Path

__all__ = ["get_all", "get_all_verified"]

_CHUNK = 1 << 20
#: The core's ``_PIPELINE_MIN`` and ``_PIPELINE_WINDOW``: bodies this large are received on a
#: thread of their own, this many buffers ahead of the hash.
_PIPELINE_MIN = 8 << 20
_PIPELINE_BUFFERS = 3
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC


def get_all(
    urls: Sequence[str], *, workers: int, ca_file: Path | None = None, label: str = "raw"
) -> int:
    """GET every URL (all on one host) on up to ``workers`` kept-alive connections; return bytes.

    Raises :class:`~pytest_cmg._errors.BenchError` (a ``RuntimeError``; naming ``label``) for an
    answer other than 200: a baseline that read error bodies would flatter whatever it is
    compared with.
    """

    def fetch(conn: http.client.HTTPConnection, index: int, target: str, buf: memoryview) -> int:
        return _drain(conn, target, buf, label)

    return _loop(urls, workers, ca_file, fetch)


def get_all_verified(
    urls: Sequence[str],
    paths: Sequence[str],
    sha256s: Sequence[str],
    *,
    workers: int,
    ca_file: Path | None = None,
    label: str = "raw-verified",
) -> int:
    """As :func:`get_all`, and every body is hashed and written to its path; return bytes.

    ``paths[i]`` (its folder must exist) receives the body of ``urls[i]``, whose SHA-256 must be
    ``sha256s[i]`` (lower-case hex): :class:`~pytest_cmg._errors.BenchError` naming ``label``
    and the path otherwise, so a ceiling that skipped or mangled bytes cannot pass for fast.
    """
    if not len(urls) == len(paths) == len(sha256s):
        msg = f"{label}: {len(urls)} URLs, {len(paths)} paths and {len(sha256s)} digests"
        raise InvalidValueError(msg)

    def fetch(conn: http.client.HTTPConnection, index: int, target: str, buf: memoryview) -> int:
        response = _get(conn, target, label)
        digest = hashlib.sha256()
        fd = os.open(paths[index], _WRITE_FLAGS, 0o644)
        total = 0
        try:
            if (response.length or 0) >= _PIPELINE_MIN:
                total = _pipelined(response, fd, digest)
            else:
                while n := response.readinto(buf):
                    view = buf[:n]
                    digest.update(view)
                    _write(fd, view)
                    total += n
        finally:
            os.close(fd)
        if digest.hexdigest() != sha256s[index]:
            msg = (
                f"{label}: SHA-256 of {paths[index]} is {digest.hexdigest()}, "
                f"expected {sha256s[index]}: a verified ceiling times only bytes that hash "
                "to the manifest's digest; the blob changed under the benchmark or storage "
                "answered other bytes, so upload the workload again and rerun"
            )
            raise BenchError(msg)
        return total

    return _loop(urls, workers, ca_file, fetch)


def _loop(
    urls: Sequence[str],
    workers: int,
    ca_file: Path | None,
    fetch: Callable[[http.client.HTTPConnection, int, str, memoryview], int],
) -> int:
    """Run ``fetch(conn, index, target, buffer)`` for every URL, on up to ``workers`` kept-alive
    connections (each with its own 1 MiB buffer); return the sum of what it returns."""
    if not urls:
        return 0
    first = urlsplit(urls[0])
    host, https = first.hostname or "127.0.0.1", first.scheme == "https"
    port = first.port or (443 if https else 80)
    context = (
        ssl.create_default_context(cafile=str(ca_file) if ca_file else None) if https else None
    )
    targets = [f"{parts.path}?{parts.query}" for parts in map(urlsplit, urls)]
    pending = iter(range(len(targets)))
    lock = threading.Lock()

    def worker() -> int:
        conn: http.client.HTTPConnection = (
            http.client.HTTPSConnection(host, port, timeout=60, context=context)
            if https
            else http.client.HTTPConnection(host, port, timeout=60)
        )
        buffer = memoryview(bytearray(_CHUNK))
        done = 0
        try:
            while True:
                with lock:
                    index = next(pending, None)
                if index is None:
                    return done
                done += fetch(conn, index, targets[index], buffer)
        finally:
            conn.close()

    threads = max(1, min(workers, len(targets)))
    if threads == 1:
        return worker()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(lambda _: worker(), range(threads)))


def _write(fd: int, view: memoryview) -> None:
    written = os.write(fd, view)
    while written < len(view):  # a regular file writes all but on errors; never assume it
        written += os.write(fd, view[written:])


def _pipelined(response: http.client.HTTPResponse, fd: int, digest: hashlib._Hash) -> int:
    """Receive and write on a thread while this one hashes, in order; return the bytes."""
    free: queue.SimpleQueue[memoryview] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[memoryview, int] | BaseException | None] = queue.SimpleQueue()
    for _ in range(_PIPELINE_BUFFERS):
        free.put(memoryview(bytearray(_CHUNK)))

    def receive() -> None:
        try:
            while True:
                buf = free.get()
                if not (n := response.readinto(buf)):
                    break
                _write(fd, buf[:n])
                full.put((buf, n))
        except BaseException as exc:
            full.put(exc)  # raised by the hashing thread
            return
        full.put(None)

    thread = threading.Thread(target=receive, name="raw-verified-receive", daemon=True)
    thread.start()
    total = 0
    while (item := full.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        buf, n = item
        digest.update(buf[:n])
        total += n
        free.put(buf)
    # Not joined on a failure: the daemon thread ends when the caller closes the connection.
    thread.join()
    return total


def _get(conn: http.client.HTTPConnection, target: str, label: str) -> http.client.HTTPResponse:
    conn.request("GET", target)
    response = conn.getresponse()
    if response.status != 200:
        body = response.read()[:200]
        # The path only: the query holds the SAS signature, which no message repeats.
        msg = (
            f"{label} GET answered {response.status} for {target.split('?', 1)[0]}: {body!r}; "
            "a ceiling times only 200 answers (an error body read fast would flatter what it "
            "is compared with): check that the blob exists and its URL's SAS is valid"
        )
        raise BenchError(msg)
    return response


def _drain(conn: http.client.HTTPConnection, target: str, buffer: memoryview, label: str) -> int:
    response = _get(conn, target, label)
    total = 0
    while n := response.readinto(buffer):
        total += n
    return total
