"""One way to take an ``flock`` on a file and wait for it with a bound.

``flock`` has no timeout of its own: a blocking call waits for ever behind a holder that hangs,
so every lock here is tried non-blocking and retried every ``poll`` seconds until a deadline,
which keeps the caller's timeout meaningful. The kernel drops an ``flock`` when its process dies,
so a killed holder never leaves the file locked; the lock file itself is never deleted (deleting
it races with a process that has just opened it). Used by Azurite's and aria2's provisioning in
the shared cache and by the client cache's download locks and leases.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

__all__ = ["POLL_SECONDS", "exclusive_lock", "try_lock", "unlock", "wait_lock"]

#: How often a lock held by someone else is tried again.
POLL_SECONDS = 0.2


def try_lock(path: Path, operation: int = fcntl.LOCK_EX) -> int | None:
    """An fd holding ``operation`` (``LOCK_EX``/``LOCK_SH``) on ``path``, created if missing;
    None when someone else holds a conflicting lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int) -> None:
    """Release the lock an fd from :func:`try_lock` or :func:`wait_lock` holds, and close it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def wait_lock(
    path: Path,
    *,
    deadline: float,
    timed_out: Callable[[], BaseException],
    operation: int = fcntl.LOCK_EX,
    on_wait: Callable[[], None] | None = None,
    poll: float = POLL_SECONDS,
) -> int:
    """Take ``operation`` on ``path``, trying until ``deadline`` (``time.monotonic``).

    ``on_wait()`` is called once, on the first failed try (to log that the caller waits).
    When the deadline passes, the exception ``timed_out()`` builds is raised: the caller names
    what was locked and what to do about it.
    """
    while True:
        fd = try_lock(path, operation)
        if fd is not None:
            return fd
        if on_wait is not None:
            on_wait()
            on_wait = None
        if time.monotonic() >= deadline:
            raise timed_out()
        time.sleep(poll)


@contextlib.contextmanager
def exclusive_lock(
    path: Path, *, deadline: float, timed_out: Callable[[], BaseException]
) -> Iterator[int]:
    """``with exclusive_lock(path, ...)``: hold an exclusive lock on ``path`` for the block."""
    fd = wait_lock(path, deadline=deadline, timed_out=timed_out)
    try:
        yield fd
    finally:
        unlock(fd)
