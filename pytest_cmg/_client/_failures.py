"""How one file's transfer fails, and how long it may keep failing before the core gives up.

The download core's own control flow, never seen outside it: :class:`Restart` (the partial file
cannot be continued), :class:`Transient` (try again), :class:`SasRefused` (storage refused the
SAS: renew it), :class:`Fatal` (give up on the file; the core turns it into a
:class:`~pytest_cmg.ContentError`), and :class:`Budget`, the bounds of :class:`.retry.RetryPolicy`
applied to one stream of requests (docs/reliability.md rows 15-20).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._errors import PytestCmgError
from .._protocol import codes

if TYPE_CHECKING:
    from .retry import RetryPolicy

__all__ = ["Budget", "Fatal", "Restart", "SasRefused", "Transient"]


class Restart(PytestCmgError):
    """The partial file cannot be continued; start again from byte 0."""

    def __init__(self, reason: str, *, no_ranges: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        #: The server ignores ranges: fetch the file as one stream from now on.
        self.no_ranges = no_ranges


class Transient(PytestCmgError):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


class SasRefused(PytestCmgError):
    def __init__(self, code: str, url: str) -> None:
        self.code = code
        self.url = url
        super().__init__(code)


class Fatal(PytestCmgError):
    def __init__(self, hresult: int, message: str, *, keep_partial: bool = False) -> None:
        self.hresult = hresult
        self.message = message
        #: The bytes so far are good (a give-up on transient errors): keep them for a later try.
        self.keep_partial = keep_partial
        super().__init__(message)


class Budget:
    """Failures in a row and time without progress for one stream of requests (RetryPolicy)."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.high_water = 0
        self.last_progress = policy.clock()

    def failed(self, position: int, size: int, relpath: str, failure: Transient) -> float:
        """Count a failure at ``position``; the wait before the next try, or raise Fatal."""
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
            raise Fatal(
                codes.CONNECTION_ABORTED,
                f"{relpath}: gave up after {self.failures} failed tries in a row "
                f"({stalled:.0f} s without progress, {position} of {size} bytes): "
                f"{failure.reason}",
                keep_partial=True,
            )
        return policy.backoff(self.failures, failure.retry_after)


# --- one file -------------------------------------------------------------------------------
