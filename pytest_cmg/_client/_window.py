"""The in-order hand-off from the threads that receive a file to the thread that hashes it.

A large file is received by helper threads (one streaming GET, or ``range_parts`` ranged GETs)
into 1 MiB buffers; :class:`Window` gives the buffers to the hashing thread in offset order and
keeps memory bounded; :class:`Segments` hands out the ranges in order. See
:mod:`pytest_cmg._client.download`'s docstring (Speed) for why.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ._http import Connection

__all__ = ["CHUNK", "Segments", "Window"]

#: The size of every receive buffer (and of a hash step).
CHUNK = 1 << 20


class Segments:
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


class Window:
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
            self._cond.wait_for(lambda: self.aborted or position + CHUNK <= self.next + self.size)
            if self.aborted:
                return None
            return self._free.pop() if self._free else memoryview(bytearray(CHUNK))

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
