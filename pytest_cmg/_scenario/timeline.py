"""A scenario's timeline at run time: virtual time, the site's clock, and the events it fires.

Time in a scenario is virtual. It moves only when something waits: the download core's backoff
and the task sequence's retry delay (``sleep``), the fault proxy's stalls, throttling and delays
(``pass_time``), and clock jumps. So a run with a 400 s stall and three retries costs no wall
time, and ``expect.elapsed`` reads the same on every machine. Parallel transfers add their waits
up, since each one is charged as it happens.

Two clocks follow from it (docs/emulation.md, "Scenario timeline"):

* the **site clock** (token lifetimes: the CCM token, content access tokens) is the wall clock at
  the start of the run plus virtual time, so a ``clock: 9h`` jump expires an 8-hour token;
* **storage** keeps the wall clock (Azurite checks SAS times itself), so SAS expiry is scripted
  with ``gateway.sas_ttl``, never by a jump.
"""

from __future__ import annotations

import random
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._client.log import INFO, SmstsLog
from .._client.retry import RetryPolicy

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .._gateway.server import FakeCMG
    from .._storage.faultproxy import Fault, FaultProxy
    from .model import TimelineEvent

__all__ = ["ScenarioTime", "SiteClock", "Timeline", "TimelineLog", "storage_faults"]

_STEP_START = re.compile(r"^Start executing an instruction\. .*Instruction pointer: (\d+)$")


class ScenarioTime:
    """Virtual seconds since the start of a run, with actions due at a time.

    It offers what :class:`~pytest_cmg._client.retry.VirtualTime` offers (``clock``, ``sleep``,
    ``waits``, ``policy``), so the engine runs on it unchanged.
    """

    def __init__(self, start: datetime, *, seed: int = 0) -> None:
        self.start = start
        self.now = 0.0
        #: Retry waits (``sleep``), in the order they happened.
        self.waits: list[float] = []
        self._seed = seed
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
        """Time passes (a stall, a throttled body, a jump); actions now due run, once each."""
        with self._lock:
            self.now += max(0.0, seconds)
            due = [action for when, action in self._due if when <= self.now]
            self._due = [(when, action) for when, action in self._due if when > self.now]
        for action in due:
            action()

    def at(self, when: float, action: Callable[[], None]) -> None:
        """Run ``action`` when virtual time reaches ``when`` (at once if it has)."""
        with self._lock:
            if when > self.now:
                self._due.append((when, action))
                return
        action()

    def policy(self, **bounds: Any) -> RetryPolicy:  # noqa: ANN401 - RetryPolicy's own fields
        """A retry policy on this time, with jitter seeded so waits repeat run after run."""
        return RetryPolicy(
            sleep=self.sleep, clock=self.clock, rng=random.Random(self._seed), **bounds
        )

    def site_clock(self) -> SiteClock:
        return SiteClock(self)


@dataclass(frozen=True)
class SiteClock:
    """The site's clock during a run: wall time at the start plus virtual time."""

    time: ScenarioTime

    def now(self) -> datetime:
        return self.time.start + timedelta(seconds=self.time.clock())


class TimelineLog(SmstsLog):
    """smsts.log that tells the timeline when a step is about to start.

    The engine logs ``Start executing an instruction. ... Instruction pointer: N`` (the product's
    wording) just before each step, before its condition is evaluated: the one step boundary it
    shows, so ``before_step`` events fire there without the engine knowing about scenarios.
    """

    def __init__(self, path: Path, on_step: Callable[[int], None]) -> None:
        super().__init__(path)
        self._on_step = on_step

    def write(self, component: str, message: str, level: int = INFO) -> None:
        super().write(component, message, level)
        if component == "TSManager" and (match := _STEP_START.match(message)):
            self._on_step(int(match[1]))


def storage_faults(params: dict[str, Any]) -> list[Fault]:
    """The fault proxy faults of one ``storage`` entry (several combine on the same request)."""
    from .._storage import faultproxy as fp

    faults: list[Fault] = []
    if params.get("delay") is not None:
        faults.append(fp.delay(params["delay"]))
    if params.get("close_before_headers"):
        faults.append(fp.close_before_headers())
    if params.get("ignore_range"):
        faults.append(fp.ignore_range())
    if params.get("respond") is not None:
        headers = {}
        body = b""
        if params.get("retry_after") is not None:
            headers["Retry-After"] = str(params["retry_after"])
        if params.get("error_code") is not None:
            code = str(params["error_code"])
            headers["x-ms-error-code"] = code
            headers["Content-Type"] = "application/xml"
            body = (
                '<?xml version="1.0" encoding="utf-8"?><Error><Code>'
                f"{code}</Code><Message>scripted by the scenario</Message></Error>"
            ).encode()
        faults.append(fp.respond(int(params["respond"]), headers=headers, body=body))
    if params.get("throttle") is not None:
        faults.append(fp.throttle(int(params["throttle"])))
    if params.get("stall_after") is not None:
        faults.append(fp.stall_after(int(params["stall_after"]), float(params["stall_for"])))
    if params.get("flip_byte") is not None:
        faults.append(fp.flip_byte(int(params["flip_byte"])))
    if params.get("reset_after") is not None:
        faults.append(fp.reset_after(int(params["reset_after"])))
    if params.get("close_after") is not None:
        faults.append(fp.close_after(int(params["close_after"])))
    return faults


@dataclass
class Timeline:
    """Fires a scenario's ``faults`` entries on the gateway, the fault proxy and the clock."""

    events: tuple[TimelineEvent, ...]
    gateway: FakeCMG
    proxy: FaultProxy | None
    time: ScenarioTime
    #: ``(virtual seconds, event)`` for every event that fired, in order.
    fired: list[tuple[float, TimelineEvent]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Arm what fires before the run, and schedule what fires at a time."""
        for event in self.events:
            if event.before_step is None and event.at is None:
                self.fire(event)
            elif event.at is not None:
                self.time.at(event.at, lambda e=event: self.fire(e))  # type: ignore[misc]

    def before_step(self, index: int) -> None:
        for event in self.events:
            if event.before_step == index and not self.has_fired(event):
                self.fire(event)

    def has_fired(self, event: TimelineEvent) -> bool:
        with self._lock:
            return any(e is event for _, e in self.fired)

    def fire(self, event: TimelineEvent) -> None:
        with self._lock:
            self.fired.append((self.time.now, event))
        params = event.params
        if event.kind == "gateway":
            fault = {k: v for k, v in params.items() if k != "endpoint" and v is not None}
            fault.setdefault("delay", 0.0)
            self.gateway.fail(params.get("endpoint"), **fault)
        elif event.kind == "storage":
            if self.proxy is None:
                msg = f"{event.where}: storage faults need plain-http storage behind the fault proxy"
                raise RuntimeError(msg)
            for scripted in storage_faults(params):
                self.proxy.add(
                    scripted,
                    request=params.get("request"),
                    times=params.get("times", 1),
                    path=params.get("file"),
                )
        elif event.kind == "service":
            if params["service"] == "stop":
                self.gateway.stop_service(f"stopped by the scenario ({event.where})")
            else:
                self.gateway.start_service()
        else:
            self.time.pass_time(float(params["clock"]))

    def unfired(self) -> list[TimelineEvent]:
        return [e for e in self.events if not self.has_fired(e)]

    def report(self) -> list[str]:
        """One line per event: when it fired, or that it never did."""
        with self._lock:
            fired = list(self.fired)
        lines = [f"{when:8.1f}s  {e.where}: {e.describe()}" for when, e in fired]
        lines += [f"   never  {e.where}: {e.describe()}" for e in self.unfired()]
        return lines
