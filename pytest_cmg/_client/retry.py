"""How the download core decides to retry, and how long it waits (docs/reliability.md rows 15-20).

Classification follows BITS and azure-storage-blob: 408, 429 and 5xx other than 501/505 are
transient; every other 4xx is fatal; a dropped or timed-out connection is transient. Waits come
from the server's ``Retry-After`` when it gives one (capped), otherwise exponential backoff with
jitter. Everything runs on an injectable clock and sleep, so tests never wait for real.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._protocol.clock import Clock

__all__ = ["RetryPolicy", "SiteClock", "VirtualTime", "is_transient_status", "parse_retry_after"]

_TRANSIENT_4XX = frozenset({408, 429})
_FATAL_5XX = frozenset({501, 505})


def is_transient_status(status: int) -> bool:
    """Whether a failed request with this status is worth repeating."""
    return status in _TRANSIENT_4XX or (500 <= status <= 599 and status not in _FATAL_5XX)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


@dataclass
class RetryPolicy:
    """Bounds on retrying one file.

    :param attempts: failed requests tolerated in a row (progress resets the count), as
        BITS counts errors, not bytes.
    :param base_delay: first backoff, doubled on each further failure up to ``max_delay``.
    :param jitter: each wait is scaled by a random factor in ``[1 - jitter, 1 + jitter]``, so
        many clients do not retry in step.
    :param max_retry_after: a server's ``Retry-After`` is honoured up to this many seconds.
    :param no_progress_timeout: give up when no byte has arrived for this long (BITS'
        NoProgressTimeout; the timer restarts whenever bytes flow).
    """

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0
    jitter: float = 0.25
    max_retry_after: float = 60.0
    no_progress_timeout: float = 300.0
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, failures: int, retry_after: float | None = None) -> float:
        """The wait before the next try, after ``failures`` failures in a row (1-based)."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        base = min(self.base_delay * 2.0 ** (failures - 1), self.max_delay)
        return base * self.rng.uniform(1 - self.jitter, 1 + self.jitter)


class VirtualTime:
    """Virtual seconds for tests and scenarios: nothing sleeps, time moves only when told to.

    Every wait of a client on it (``sleep``: the download core's backoff, the task sequence's
    retry delay) is recorded in ``waits`` and moves the clock; other time passes with
    :meth:`pass_time` (a stall, a throttled body, a clock jump), and :meth:`at` schedules an
    action for when the clock reaches a time. So a retry storm costs no wall time and every wait
    can be asserted on. The plugin's ``cmg_time`` and each scenario run have one
    (docs/emulation.md, "Scenario runs: time, clocks and storage accounting").

    :param start: the date virtual second 0 stands for (what :meth:`site_clock` reads from);
        the wall clock when it is made, by default.
    :param seed: seeds the jitter of every :meth:`policy`, so backoff waits repeat run after
        run; None (the default) draws it from the OS, as an unseeded ``random.Random`` does.
    """

    def __init__(self, start: datetime | None = None, *, seed: int | None = None) -> None:
        self.start = start if start is not None else datetime.now(UTC)
        self.seed = seed
        self.now = 0.0
        #: Retry waits (``sleep``), in the order they happened.
        self.waits: list[float] = []
        self._due: list[tuple[float, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        """A retry wait: recorded, then time passes."""
        with self._lock:
            self.waits.append(seconds)
        self.pass_time(seconds)

    def pass_time(self, seconds: float) -> None:
        """Time passes; the actions now due run, once each, in the order they were scheduled."""
        with self._lock:
            self.now += max(0.0, seconds)
            due = [action for when, action in self._due if when <= self.now]
            self._due = [(when, action) for when, action in self._due if when > self.now]
        # Outside the lock: an action may read the clock or pass time itself (a clock jump).
        for action in due:
            action()

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` when virtual time reaches ``when`` seconds (at once if it has)."""
        with self._lock:
            if when > self.now:
                self._due.append((when, action))
                return
        action()

    def policy(self, **bounds: Any) -> RetryPolicy:  # noqa: ANN401 - RetryPolicy's own fields
        """A :class:`RetryPolicy` that waits on this virtual time, its jitter seeded by ``seed``."""
        return RetryPolicy(
            sleep=self.sleep, clock=self.clock, rng=random.Random(self.seed), **bounds
        )

    def site_clock(self) -> Clock:
        """A date clock on this time: ``start`` plus the virtual seconds passed (a scenario's
        site clock, which token lifetimes follow)."""
        return SiteClock(self.start, self.clock)


@dataclass(frozen=True)
class SiteClock:
    """``start`` plus the seconds ``seconds()`` reads: a date clock on virtual time.

    A boot process builds one on the parent's clock, read over a pipe (``boot.py``).
    """

    start: datetime
    seconds: Callable[[], float]

    def now(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds())
