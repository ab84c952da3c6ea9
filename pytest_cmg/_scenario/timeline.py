"""A scenario's timeline at run time: the events it fires, on the run's virtual time.

Time in a scenario is virtual (one :class:`~pytest_cmg._client.retry.VirtualTime` per run, seeded
with the scenario's seed). It moves only when something waits: the download core's backoff
and the task sequence's retry delay (``sleep``), the fault proxy's stalls, throttling and delays
(``pass_time``), and clock jumps. So a run with a 400 s stall and three retries costs no wall
time, and ``expect.elapsed`` reads the same on every machine. Parallel transfers add their waits
up, since each one is charged as it happens.

Two clocks follow from it (docs/emulation.md, "Scenario runs: time, clocks and storage
accounting"):

* the **site clock** (token lifetimes: the CCM token, content access tokens;
  ``VirtualTime.site_clock``) is the wall clock at the start of the run plus virtual time, so a
  ``clock: 9h`` jump expires an 8-hour CCM token;
* **storage** keeps the wall clock (Azurite checks SAS times itself), so SAS expiry is scripted
  with ``gateway.sas_ttl``, never by a jump.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING
from urllib.parse import unquote

from .._net.faults import Fault
from .model import (
    ClockJump,
    GatewayFaultEntry,
    Restart,
    RestartMidDownload,
    ServiceEvent,
    StorageFaultEntry,
)
from .spec import show_seconds

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._client.engine import StepEvent
    from .._client.retry import VirtualTime
    from .._gateway.faults import GatewayFault
    from .._gateway.requestlog import LoggedRequest
    from .._gateway.server import FakeCMG
    from .._net.proxy import FaultProxy, ProxiedRequest
    from .model import TimelineEvent

__all__ = ["DueCut", "Timeline", "TimelineFault"]

#: The zero-length stalls a mid-download restart is armed as: they mark, in the fault proxy,
#: the moment storage has sent ``after_bytes`` of the file's body, then the next
#: ``CUT_CHANCES`` multiples of ``CUT_STEP`` body bytes. ``CUT_STEP`` is the download core's
#: receive buffer (``CHUNK``; tests/test_restarts.py checks they agree): the core fills a whole
#: buffer before it writes and hashes it, so its journal can hold exactly what storage has sent
#: only where a buffer ends. The runner cuts the power at the first of those stalls where the
#: journal does, and at the last one whatever the journal says.
_CUT_STALL = 0.0
CUT_STEP = 1 << 20
CUT_CHANCES = 3


def cut_offsets(after: int, size: int | None = None) -> list[int]:
    """The body offsets a mid-download restart after ``after`` bytes stalls at, in order.

    With the file's ``size``, only offsets inside the body: a stall at or past its end never
    holds it, so a file that ends before the next buffer end is cut at ``after`` itself (the
    language refuses an ``after`` that is not inside the file). The journal cannot equal an
    offset inside a buffer, so that cut is not byte-exact: the next boot fetches again what the
    journal did not hold (all of a file smaller than one buffer).
    """
    first = -(-after // CUT_STEP) * CUT_STEP
    aligned = [first + n * CUT_STEP for n in range(CUT_CHANCES)]
    offsets = aligned if first == after else [after, *aligned]
    inside = [o for o in offsets if size is None or o < size]
    return inside or offsets[:1]


@dataclass(frozen=True)
class Body:
    """Where one storage answer's body stands, as the fault proxy's log tells it."""

    #: The request's decoded path, which ends in the blob's name ``<PKG>.<ver>/<relpath>``.
    path: str
    #: The first byte of the file that request asked for (its ``Range``; 0 without one).
    start: int
    #: Body bytes storage has sent in answer to it.
    sent: int

    @classmethod
    def of(cls, request: ProxiedRequest) -> Body:
        return cls(unquote(request.path), _range_start(request.range), request.body_bytes)

    def is_blob(self, package_id: str, version: int, relpath: str) -> bool:
        """Whether the request is for that file of that package version."""
        return self.path.endswith(f"/{package_id}.{version}/{relpath}")

    @property
    def aligned(self) -> bool:
        """Whether the body stands where a receive buffer of the download core ends."""
        return self.sent % CUT_STEP == 0

    @property
    def journaled(self) -> int:
        """The file offset the boot's journal can record at most now: where its last full
        receive buffer ended (the bytes of a buffer still filling are not hashed yet)."""
        return self.start + self.sent - self.sent % CUT_STEP


def bodies_in_flight(storage: list[ProxiedRequest]) -> list[Body]:
    """The bodies storage is sending now with at least one receive buffer's worth sent: what a
    power cut at a time must let the boot journal first (the runner waits for it), since on
    virtual time the boot had all the time those bytes took to arrive."""
    return [
        Body.of(r)
        for r in storage
        if r.outcome is None and r.status in (200, 206) and r.body_bytes >= CUT_STEP
    ]


@dataclass(frozen=True)
class DueCut:
    """A mid-download ``restart`` entry whose request storage is now holding at a stall."""

    event: RestartMidDownload
    #: The held request's body (the entry's ``file`` is only a part of its blob's name, and
    #: may match several files).
    body: Body
    #: The last stall armed for the entry: the power is cut there in any case.
    last: bool


def stalls_for_cut(event: RestartMidDownload, size: int | None = None) -> list[Fault]:
    """The faults a mid-download ``restart`` entry is armed as (see :data:`_CUT_STALL`)."""
    from .._net import faults as fp

    return [fp.stall_after(offset, _CUT_STALL) for offset in cut_offsets(event.after_bytes, size)]


@dataclass(frozen=True)
class TimelineFault(Fault):
    """A fault proxy fault that names the ``faults`` entry that scripted it.

    The name is what the proxy records for each request it hits (``ProxiedRequest.faults``),
    so ``reset_after(307200)@faults[2]`` tells, from the proxy's log alone, which entry hit
    which request, even when two entries script the same fault; that is how an entry that
    never fired is found.
    """

    where: str = ""

    @property
    def name(self) -> str:
        return f"{super().name}@{self.where}"

    @classmethod
    def of(cls, fault: Fault, where: str) -> TimelineFault:
        return cls(**{f.name: getattr(fault, f.name) for f in fields(fault)}, where=where)


@dataclass
class Timeline:
    """Fires a scenario's ``faults`` entries on the gateway, the fault proxy and the clock."""

    events: tuple[TimelineEvent, ...]
    gateway: FakeCMG
    proxy: FaultProxy | None
    time: VirtualTime
    #: ``(virtual seconds, event)`` for every event that fired, in order.
    fired: list[tuple[float, TimelineEvent]] = field(default_factory=list)
    #: The gateway fault each fired ``gateway`` entry armed, by the entry's ``where``.
    armed: dict[str, GatewayFault] = field(default_factory=dict)
    #: Cuts the power of the running boot (``BootHost.power_cut``): a ``restart`` entry.
    power_cut: Callable[[], None] | None = None
    #: Blob name (``<PackageID>.<version>/<path>``) -> size in bytes, of the run's content: where
    #: a mid-download restart's stalls may fall.
    file_sizes: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cut: set[str] = field(default_factory=set)
    #: The offset of each mid-download restart's last armed stall, by the entry's ``where``.
    _last_stall: dict[str, int] = field(default_factory=dict)

    def size_of(self, file: str) -> int | None:
        """The size of the smallest blob whose name contains ``file``, None if none does (the
        fault proxy matches ``file`` the same way)."""
        sizes = [size for blob, size in self.file_sizes.items() if file in blob]
        return min(sizes) if sizes else None

    def start(self) -> None:
        """Arm what fires before the run, and schedule what fires at a time."""
        for event in self.events:
            if event.before_step is None and event.at is None:
                self.fire(event)
            elif event.at is not None:
                self.time.at(event.at, lambda e=event: self.fire(e))  # type: ignore[misc]

    def on_step(self, event: StepEvent) -> None:
        """The engine's step hook (``TaskSequenceEngine.on_step``): a step is about to start."""
        if event.phase == "start":
            self.before_step(event.index)

    def before_step(self, index: int) -> None:
        """Fire the entries due before the ``index``-th step, each once (a step started again
        after a power cut fires nothing more)."""
        for event in self.events:
            if event.before_step == index and not self.has_fired(event):
                self.fire(event)

    def has_fired(self, event: TimelineEvent) -> bool:
        with self._lock:
            return any(e is event for _, e in self.fired)

    def fire(self, event: TimelineEvent) -> None:
        with self._lock:
            self.fired.append((self.time.now, event))
        if isinstance(event, GatewayFaultEntry):
            fault = event.fault
            # The gateway arms a fault of its own from these: the one it returns is the one
            # ``FaultPlan.fired`` is asked about (by identity).
            settings = {
                f.name: getattr(fault, f.name) for f in fields(fault) if f.name != "endpoint"
            }
            armed = self.gateway.fail(fault.endpoint, **settings)
            with self._lock:
                self.armed[event.where] = armed
        elif isinstance(event, StorageFaultEntry):
            if self.proxy is None:
                # The runner refuses such a scenario before it starts (a ScenarioError with
                # its file and line): reaching this is a bug, not a scenario mistake.
                msg = (
                    f"{event.where}: storage faults need plain-http storage behind the fault proxy"
                )
                raise AssertionError(msg)
            for scripted in event.faults:
                self.proxy.add(
                    TimelineFault.of(scripted, event.where),
                    request=event.request,
                    times=event.times,
                    path=event.file,
                )
        elif isinstance(event, RestartMidDownload):
            if self.proxy is None:
                # Refused before the run like storage faults: reaching this is a bug.
                msg = f"{event.where}: a mid-download restart needs the fault proxy"
                raise AssertionError(msg)
            # Cut when storage has sent after_bytes of the file (:meth:`cut_due`).
            stalls = stalls_for_cut(event, self.size_of(event.file))
            with self._lock:
                self._last_stall[event.where] = stalls[-1].offset
            for stall in stalls:
                self.proxy.add(TimelineFault.of(stall, event.where), times=1, path=event.file)
        elif isinstance(event, Restart):
            if self.power_cut is not None:
                self.power_cut()
        elif isinstance(event, ServiceEvent):
            if event.service == "stop":
                self.gateway.stop_service(f"stopped by the scenario ({event.where})")
            else:
                self.gateway.start_service()
        elif isinstance(event, ClockJump):
            self.time.pass_time(event.seconds)

    def cut_due(self, storage: list[ProxiedRequest]) -> DueCut | None:
        """The mid-download ``restart`` entry storage has now sent ``after_bytes`` for, with
        where its request stands; None when none is due. :meth:`cut` marks it done.

        Called from the fault proxy's stall hook, while the armed stalls hold the body.
        """
        for event in self.events:
            if not isinstance(event, RestartMidDownload):
                continue
            with self._lock:
                if event.where in self._cut:
                    continue
            tag = f"@{event.where}"
            # The stalls are armed for one request (times=1): the one that carries the tag.
            hit = [r for r in storage if any(n.endswith(tag) for n in r.faults)]
            if not hit:
                continue
            request = max(hit, key=lambda r: r.body_bytes)
            after = event.after_bytes
            if request.body_bytes >= after:
                with self._lock:
                    last_stall = self._last_stall.get(event.where, cut_offsets(after)[-1])
                last = request.body_bytes >= last_stall
                return DueCut(event, Body.of(request), last)
        return None

    def cut(self, event: TimelineEvent) -> None:
        """The power was cut for ``event``: it is not due again."""
        with self._lock:
            self._cut.add(event.where)

    def unfired(self) -> list[TimelineEvent]:
        return [e for e in self.events if not self.has_fired(e)]

    def missed(
        self,
        requests: list[LoggedRequest],
        storage: list[ProxiedRequest] | None,
        steps: tuple[str, ...] = (),
    ) -> list[tuple[TimelineEvent, str]]:
        """Every event that never happened, or whose fault never fired, and why.

        A ``before_step`` or ``at`` event that was never armed never happened, whatever its
        kind. An armed gateway fault never fired when it hit no request (its endpoint was not
        asked again, or not that often); an armed storage fault when no storage request carries
        its name, or when every request it hit ended before the body offset it acts at.
        ``requests`` is the gateway's request log, ``storage`` the fault proxy's, ``steps`` the
        task sequence's step names (for the reason).
        """
        out: list[tuple[TimelineEvent, str]] = []
        for event in self.events:
            if not self.has_fired(event):
                out.append((event, self._never_armed(event, steps)))
            elif isinstance(event, GatewayFaultEntry):
                why = self._gateway_miss(event, requests)
                if why:
                    out.append((event, why))
            elif isinstance(event, StorageFaultEntry) and storage is not None:
                why = _storage_miss(event.where, event.file, event.request, event.faults, storage)
                if why:
                    out.append((event, why))
            elif isinstance(event, RestartMidDownload) and storage is not None:
                # Its first stall (at after_bytes) is the one that must act.
                first = stalls_for_cut(event)[:1]
                why = _storage_miss(event.where, event.file, None, first, storage)
                if why:
                    out.append((event, why))
        return out

    def _never_armed(self, event: TimelineEvent, steps: tuple[str, ...]) -> str:
        if event.before_step is not None:
            index = event.before_step
            name = steps[index] if index < len(steps) else f"#{index}"
            return f"step {name!r} never started, so the entry was never armed"
        at = show_seconds(event.at) if event.at is not None else "its time"
        return (
            f"virtual time reached only {show_seconds(self.time.clock())}, not {at}, so the "
            "entry was never armed"
        )

    def _gateway_miss(self, event: GatewayFaultEntry, requests: list[LoggedRequest]) -> str:
        armed = self.armed.get(event.where)
        faults = getattr(self.gateway, "faults", None)
        if armed is None or faults is None or faults.fired(armed):
            return ""
        endpoint = event.fault.endpoint
        asked = [r for r in requests if endpoint is None or r.endpoint == endpoint]
        what = f"{endpoint} request(s)" if endpoint else "request(s)"
        number = event.fault.request
        wanted = f"{endpoint or 'any'} request #{number}" if number else f"the next {what}"
        return f"it waited for {wanted}, and the gateway logged {len(asked)} {what} in the run"

    def report(self, missed: list[tuple[TimelineEvent, str]] | None = None) -> list[str]:
        """One line per event: when it fired (was armed, for a fault), or that it never did.

        ``missed`` (from :meth:`missed`) marks the faults that were armed but never fired.
        """
        with self._lock:
            fired = list(self.fired)
        silent = {id(event) for event, _ in missed or ()}
        lines = [
            f"{when:8.1f}s  {e.where}: {e.describe()}"
            + ("  (armed, never fired)" if id(e) in silent else "")
            for when, e in fired
        ]
        lines += [f"   never  {e.where}: {e.describe()}" for e in self.unfired()]
        return lines


def _range_start(value: str | None) -> int:
    """The first byte a ``Range`` value (``bytes=N-`` or ``bytes=N-M``) asks for; 0 without."""
    if not value or "=" not in value:
        return 0
    first = value.split("=", 1)[1].split("-", 1)[0].strip()
    return int(first) if first.isdigit() else 0


def _storage_miss(
    where: str,
    file: str | None,
    number: int | None,
    faults: Sequence[Fault],
    storage: list[ProxiedRequest],
) -> str:
    """Why an armed storage entry never fired or never acted; empty when it did.

    ``where``, ``file`` and ``number`` are the entry's, ``faults`` what it armed on the proxy.
    """
    tag = f"@{where}"
    hit = [r for r in storage if any(name.endswith(tag) for name in r.faults)]
    if not hit:
        asked = [r for r in storage if file is None or file in unquote(r.path)]
        which = f"storage request #{number}" if number else "the next storage request"
        blobs = f" for a blob whose name contains {file!r}" if file else ""
        return (
            f"no storage request matched it: it waited for {which}{blobs}, and the run made "
            f"{len(asked)} such request(s)"
            + (f" ({len(storage)} storage request(s) in all)" if file else "")
        )
    for fault in faults:
        # A cut or a stall acts when the body reaches its offset; a flipped byte must be sent.
        if any(f"{fault.name}{tag}" in r.faults and fault.acted(r.body_bytes) for r in hit):
            continue
        bodies = ", ".join(f"#{r.number}: {r.body_bytes} body bytes" for r in hit[:5])
        return (
            f"{fault.name} hit {len(hit)} request(s) but never acted: none reached body "
            f"byte {fault.offset} ({bodies}); give a smaller offset, or name a larger file"
        )
    return ""
