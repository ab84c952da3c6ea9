"""The raw ceiling: plain keep-alive GETs whose bodies are read into a buffer and discarded.

Shared by the benchmark command (its ``raw`` case) and benchmark scenarios (their ``raw``
baseline), so both measure storage's ceiling the same way. Stdlib only: benchmark scenarios
import it in ordinary sessions.
"""

from __future__ import annotations

import http.client
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from collections.abc import Sequence
    from pathlib import Path

__all__ = ["get_all"]

_CHUNK = 1 << 20


def get_all(
    urls: Sequence[str], *, workers: int, ca_file: Path | None = None, label: str = "raw"
) -> int:
    """GET every URL (all on one host) on up to ``workers`` kept-alive connections; return bytes.

    Raises ``RuntimeError`` (naming ``label``) for an answer other than 200: a baseline that read
    error bodies would flatter whatever it is compared with.
    """
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
                done += _drain(conn, targets[index], buffer, label)
        finally:
            conn.close()

    threads = max(1, min(workers, len(targets)))
    if threads == 1:
        return worker()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return sum(pool.map(lambda _: worker(), range(threads)))


def _drain(conn: http.client.HTTPConnection, target: str, buffer: memoryview, label: str) -> int:
    conn.request("GET", target)
    response = conn.getresponse()
    if response.status != 200:
        body = response.read()[:200]
        msg = f"{label} GET answered {response.status}: {body!r}"
        raise RuntimeError(msg)
    total = 0
    while n := response.readinto(buffer):
        total += n
    return total
