"""The fault vocabulary of the storage fault proxy: what can go wrong with one response.

A :class:`Fault` is one scripted misbehaviour, built with the constructors below
(``reset_after(300_000)``, ``respond(503, headers={"Retry-After": "2"})``...) and scripted on a
:class:`~pytest_cmg._net.proxy.FaultProxy` for a request number. :class:`Plan` folds the faults
of one request into what the forwarding code (:mod:`pytest_cmg._net.connection`) needs to know.

Body faults count *payload* bytes: in a chunked answer ``flip_byte(10)`` flips the 11th payload
byte, never a framing byte, and ``reset_after(n)`` cuts after n payload bytes. ``throttle``
sleeps ``slice / rate`` before each slice, so the real rate is slightly below the configured one
(send time is not subtracted); with a fake sleep the requested total is exactly
``body_length / rate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from .._errors import InvalidValueError

if TYPE_CHECKING:
    from collections.abc import Iterable

# Plan is for the proxy's own modules; these are the names pytest_cmg.faults makes public.
__all__ = [
    "Fault",
    "FaultKind",
    "close_after",
    "close_before_headers",
    "delay",
    "flip_byte",
    "ignore_range",
    "reset_after",
    "respond",
    "stall_after",
    "throttle",
]

FaultKind = Literal[
    "reset_after",
    "close_after",
    "stall_after",
    "throttle",
    "delay",
    "flip_byte",
    "close_before_headers",
    "respond",
    "ignore_range",
]


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour; build it with the functions below rather than directly.

    ``offset`` is the response-body offset of ``reset_after``/``close_after``/``stall_after``/
    ``flip_byte``; ``seconds`` is used by ``stall_after`` and ``delay``; ``rate`` (bytes per
    second) by ``throttle``; ``status``/``headers``/``body`` by ``respond``.
    """

    kind: FaultKind
    offset: int = 0
    seconds: float = 0.0
    rate: int = 0
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        if self.offset < 0:
            msg = f"{self.kind}: the body offset must be >= 0, not {self.offset}"
            raise InvalidValueError(msg)
        if not math.isfinite(self.seconds) or self.seconds < 0:
            msg = f"{self.kind}: seconds must be a finite number >= 0, not {self.seconds!r}"
            raise InvalidValueError(msg)
        if self.kind == "throttle" and self.rate <= 0:
            msg = f"throttle: bytes_per_second must be > 0, not {self.rate}"
            raise InvalidValueError(msg)
        if self.kind == "respond":
            # 1xx would be taken for an interim answer and leave the client waiting for a final one.
            if not 200 <= self.status <= 599:
                msg = f"respond: status must be a final status 200-599, not {self.status}"
                raise InvalidValueError(msg)
            for name, value in self.headers:
                broken = not name or any(c in name for c in "\r\n:") or "\r" in value
                if broken or "\n" in value or not (name + value).isascii():
                    msg = f"respond: header {name!r} would break the response head"
                    raise InvalidValueError(msg)

    @property
    def name(self) -> str:
        """Short, stable description used in :attr:`ProxiedRequest.faults`."""
        if self.kind in ("reset_after", "close_after", "flip_byte"):
            return f"{self.kind}({self.offset})"
        if self.kind == "stall_after":
            return f"stall_after({self.offset}, {self.seconds:g})"
        if self.kind == "throttle":
            return f"throttle({self.rate})"
        if self.kind == "delay":
            return f"delay({self.seconds:g})"
        if self.kind == "respond":
            return f"respond({self.status})"
        return f"{self.kind}()"


def reset_after(n: int) -> Fault:
    """After ``n`` response-body bytes, abort the client connection with a TCP RST."""
    return Fault("reset_after", offset=n)


def close_after(n: int) -> Fault:
    """After ``n`` response-body bytes, close the client connection cleanly (FIN)."""
    return Fault("close_after", offset=n)


def stall_after(n: int, seconds: float) -> Fault:
    """After ``n`` body bytes, forward nothing for ``seconds`` (through ``sleep``), then go on."""
    return Fault("stall_after", offset=n, seconds=seconds)


def throttle(bytes_per_second: int) -> Fault:
    """Pace the response body at about ``bytes_per_second`` (through ``sleep``)."""
    return Fault("throttle", rate=bytes_per_second)


def delay(seconds: float) -> Fault:
    """Wait ``seconds`` (through ``sleep``) before forwarding the response head."""
    return Fault("delay", seconds=seconds)


def flip_byte(offset: int) -> Fault:
    """XOR 0xFF the response-body byte at ``offset`` (0-based within the body)."""
    return Fault("flip_byte", offset=offset)


def close_before_headers() -> Fault:
    """Read the request, forward nothing, close the connection without a single response byte."""
    return Fault("close_before_headers")


def respond(status: int, *, headers: dict[str, str] | None = None, body: bytes = b"") -> Fault:
    """Answer ``status`` with these headers and body instead of forwarding the request.

    ``Content-Length`` is added unless given. Body faults (reset, flip, ...) scripted for the same
    request apply to this body.
    """
    return Fault("respond", status=status, headers=tuple((headers or {}).items()), body=body)


def ignore_range() -> Fault:
    """Forward the request without ``Range``/``x-ms-range``: upstream answers 200, full body."""
    return Fault("ignore_range")


@dataclass
class Plan:
    """The faults of one request, folded into what the forwarding code needs to know."""

    names: tuple[str, ...] = ()
    close_before_headers: bool = False
    respond: Fault | None = None
    ignore_range: bool = False
    delay: float = 0.0
    rate: int | None = None
    stalls: list[tuple[int, float]] = field(default_factory=list)
    flips: list[int] = field(default_factory=list)
    cut: tuple[int, Literal["reset", "close"]] | None = None

    @classmethod
    def build(cls, faults: Iterable[Fault]) -> Plan:
        plan = cls()
        names: list[str] = []
        for fault in faults:
            names.append(fault.name)
            if fault.kind == "close_before_headers":
                plan.close_before_headers = True
            elif fault.kind == "respond":
                plan.respond = plan.respond or fault
            elif fault.kind == "ignore_range":
                plan.ignore_range = True
            elif fault.kind == "delay":
                plan.delay += fault.seconds
            elif fault.kind == "throttle":
                plan.rate = fault.rate if plan.rate is None else min(plan.rate, fault.rate)
            elif fault.kind == "stall_after":
                plan.stalls.append((fault.offset, fault.seconds))
            elif fault.kind == "flip_byte":
                plan.flips.append(fault.offset)
            else:
                kind: Literal["reset", "close"] = (
                    "reset" if fault.kind == "reset_after" else "close"
                )
                if plan.cut is None or fault.offset < plan.cut[0]:
                    plan.cut = (fault.offset, kind)
        plan.names = tuple(names)
        plan.stalls.sort()
        plan.flips = sorted(set(plan.flips))
        return plan
