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
  ``clock: 9h`` jump expires an 8-hour token;
* **storage** keeps the wall clock (Azurite checks SAS times itself), so SAS expiry is scripted
  with ``gateway.sas_ttl``, never by a jump.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .._net.faults import Fault

if TYPE_CHECKING:
    from collections.abc import Callable

    from .._client.engine import StepEvent
    from .._client.retry import VirtualTime
    from .._gateway.faults import GatewayFault
    from .._gateway.requestlog import LoggedRequest
    from .._gateway.server import FakeCMG
    from .._net.proxy import FaultProxy, ProxiedRequest
    from .model import TimelineEvent

__all__ = ["Timeline", "TimelineFault", "storage_faults"]

#: Faults that act at a body offset: they can hit a request and still do nothing, when its
#: body ends before the offset (a reset after 30 MiB of a 20 MiB file).
_AT_OFFSET = ("reset_after", "close_after", "stall_after", "flip_byte")

#: The zero-length stalls a mid-download restart is armed as: they mark, in the fault proxy,
#: the moment storage has sent ``after_bytes`` of the file, then every ``CUT_STEP`` bytes up to
#: ``CUT_SLACK`` more. The power is cut at the first of them where the boot's journal has caught
#: up (the runner looks): the download core skips a checkpoint while the previous one is being
#: written, so a body held at exactly ``after_bytes`` may never see its last checkpoint.
_CUT_STALL = 0.0
CUT_STEP = 64 * 1024
CUT_SLACK = 1536 * 1024


def stalls_for_cut(params: dict[str, Any]) -> list[Fault]:
    """The faults a mid-download ``restart`` entry is armed as (see :data:`_CUT_STALL`)."""
    from .._net import faults as fp

    start = int(params["after_bytes"])
    return [
        fp.stall_after(offset, _CUT_STALL)
        for offset in range(start, start + CUT_SLACK + 1, CUT_STEP)
    ]


def storage_faults(params: dict[str, Any]) -> list[Fault]:
    """The fault proxy faults of one ``storage`` entry (several combine on the same request)."""
    from .._net import faults as fp

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
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _cut: set[str] = field(default_factory=set)

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
        params = event.params
        if event.kind == "gateway":
            fault = {k: v for k, v in params.items() if k != "endpoint" and v is not None}
            fault.setdefault("delay", 0.0)
            armed = self.gateway.fail(params.get("endpoint"), **fault)
            with self._lock:
                self.armed[event.where] = armed
        elif event.kind == "storage":
            if self.proxy is None:
                # The runner refuses such a scenario before it starts (a ScenarioError with
                # its file and line): reaching this is a bug, not a scenario mistake.
                msg = (
                    f"{event.where}: storage faults need plain-http storage behind the fault proxy"
                )
                raise AssertionError(msg)
            for scripted in storage_faults(params):
                self.proxy.add(
                    TimelineFault.of(scripted, event.where),
                    request=params.get("request"),
                    times=params.get("times", 1),
                    path=params.get("file"),
                )
        elif event.kind == "restart":
            if params.get("file") is not None:
                if self.proxy is None:
                    # Refused before the run like storage faults: reaching this is a bug.
                    msg = f"{event.where}: a mid-download restart needs the fault proxy"
                    raise AssertionError(msg)
                # Cut when storage has sent after_bytes of the file (:meth:`cut_due`).
                for stall in stalls_for_cut(params):
                    self.proxy.add(
                        TimelineFault.of(stall, event.where), times=1, path=params["file"]
                    )
            elif self.power_cut is not None:
                self.power_cut()
        elif event.kind == "service":
            if params["service"] == "stop":
                self.gateway.stop_service(f"stopped by the scenario ({event.where})")
            else:
                self.gateway.start_service()
        else:
            self.time.pass_time(float(params["clock"]))

    def cut_due(self, storage: list[ProxiedRequest]) -> tuple[TimelineEvent, int] | None:
        """The mid-download ``restart`` entry storage has now sent ``after_bytes`` for, and the
        body bytes sent; None when none is due. :meth:`cut` marks it done.

        Called from the fault proxy's stall hook, while the armed stalls hold the body.
        """
        for event in self.events:
            if event.kind != "restart" or event.params.get("file") is None:
                continue
            with self._lock:
                if event.where in self._cut:
                    continue
            tag = f"@{event.where}"
            sent = max(
                (r.body_bytes for r in storage if any(n.endswith(tag) for n in r.faults)),
                default=0,
            )
            if sent >= int(event.params["after_bytes"]):
                return event, sent
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
            elif event.kind == "gateway":
                why = self._gateway_miss(event, requests)
                if why:
                    out.append((event, why))
            elif event.kind == "storage" and storage is not None:
                why = _storage_miss(event, storage)
                if why:
                    out.append((event, why))
            elif event.kind == "restart" and event.params.get("file") and storage is not None:
                params = {
                    "file": event.params["file"],
                    "stall_after": event.params["after_bytes"],
                    "stall_for": _CUT_STALL,
                }
                why = _storage_miss(replace(event, params=params), storage)
                if why:
                    out.append((event, why))
        return out

    def _never_armed(self, event: TimelineEvent, steps: tuple[str, ...]) -> str:
        if event.before_step is not None:
            index = event.before_step
            name = steps[index] if index < len(steps) else f"#{index}"
            return f"step {name!r} never started, so the entry was never armed"
        return (
            f"virtual time reached only {self.time.clock():g}s, not {event.at:g}s, so the entry "
            "was never armed"
        )

    def _gateway_miss(self, event: TimelineEvent, requests: list[LoggedRequest]) -> str:
        armed = self.armed.get(event.where)
        faults = getattr(self.gateway, "faults", None)
        if armed is None or faults is None or faults.fired(armed):
            return ""
        endpoint = event.params.get("endpoint")
        asked = [r for r in requests if endpoint is None or r.endpoint == endpoint]
        what = f"{endpoint} request(s)" if endpoint else "request(s)"
        number = event.params.get("request")
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


def _storage_miss(event: TimelineEvent, storage: list[ProxiedRequest]) -> str:
    """Why an armed storage entry never fired or never acted; empty when it did."""
    tag = f"@{event.where}"
    hit = [r for r in storage if any(name.endswith(tag) for name in r.faults)]
    params = event.params
    if not hit:
        file = params.get("file")
        number = params.get("request")
        asked = [r for r in storage if file is None or file in unquote(r.path)]
        which = f"storage request #{number}" if number else "the next storage request"
        blobs = f" for a blob whose name contains {file!r}" if file else ""
        return (
            f"no storage request matched it: it waited for {which}{blobs}, and the run made "
            f"{len(asked)} such request(s)"
            + (f" ({len(storage)} storage request(s) in all)" if file else "")
        )
    for fault in storage_faults(params):
        if fault.kind not in _AT_OFFSET:
            continue
        # A cut or a stall acts when the body reaches its offset; a flipped byte must be sent.
        reached = [
            r
            for r in hit
            if f"{fault.name}{tag}" in r.faults
            and (
                r.body_bytes > fault.offset
                if fault.kind == "flip_byte"
                else r.body_bytes >= fault.offset
            )
        ]
        if not reached:
            bodies = ", ".join(f"#{r.number}: {r.body_bytes} body bytes" for r in hit[:5])
            return (
                f"{fault.name} hit {len(hit)} request(s) but never acted: none reached body "
                f"byte {fault.offset} ({bodies}); give a smaller offset, or name a larger file"
            )
    return ""
