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

:data:`VOCABULARY` is the table a script (a scenario's ``storage`` entry) asks for faults by: per
kind, the key naming it, the values it takes and their types, and how they become a
:class:`Fault`. The scenario language, its rules and its timeline derive from it, so a fault
added here (and applied in :mod:`pytest_cmg._net.connection`) is usable in a scenario file with
no other edit (docs/architecture.md, "Where a change goes").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from .._errors import InvalidValueError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

# Plan is for the proxy's own modules and VOCABULARY for scripts (the scenario language); these
# are the names pytest_cmg.faults makes public.
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

    def acted(self, body_bytes: int) -> bool:
        """Whether this fault acted on a request it hit whose body ran to ``body_bytes``.

        A fault at a body offset acts when the body reaches it (a cut, a stall), or for a flipped
        byte when that byte is sent; the others act on every request they hit.
        """
        if not any(w.kind == self.kind and w.type == "offset" for w in VOCABULARY):
            return True
        return body_bytes > self.offset if self.kind == "flip_byte" else body_bytes >= self.offset


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


#: What a script's value for a fault is: a response-body ``offset`` (bytes, counted from 0), a
#: ``rate`` (bytes per second), ``seconds``, an HTTP ``status`` (200-599), free ``text`` (a
#: header value), or a ``flag`` (true asks for the fault; it takes no value).
ValueType = Literal["offset", "rate", "seconds", "status", "text", "flag"]


@dataclass(frozen=True)
class FaultArg:
    """A further value a fault takes, under a key of its own (``stall_for`` of ``stall_after``)."""

    key: str
    type: ValueType
    doc: str
    #: False: the fault works without it (a ``respond`` without ``retry_after``).
    required: bool = True
    #: A value for the reference's examples; empty: one is made from the type.
    example: str = ""


@dataclass(frozen=True)
class FaultWord:
    """One word of the vocabulary: how a script asks for one kind of :class:`Fault`.

    ``key`` names the fault in a script (``reset_after: 300KiB``) and its value is of ``type``;
    ``args`` are the further keys it takes. ``make`` builds the fault from the key's value (none
    for a ``flag``) and then each arg's value (None when a script leaves an optional one out).
    """

    kind: FaultKind
    type: ValueType
    doc: str
    make: Callable[..., Fault]
    args: tuple[FaultArg, ...] = ()
    example: str = ""
    #: The key naming the fault in a script; empty: the kind's own name.
    name: str = ""

    @property
    def key(self) -> str:
        return self.name or self.kind

    @property
    def keys(self) -> tuple[str, ...]:
        """Every key of this word: its own, then its args'."""
        return (self.key, *(arg.key for arg in self.args))

    def asked(self, values: Mapping[str, Any]) -> bool:
        """Whether ``values`` (a script's keys and values, None for not given) ask for it.

        A flag asks when true; any other value when given, 0 included (``reset_after: 0``).
        """
        value = values.get(self.key)
        return value is True if self.type == "flag" else value is not None

    def build(self, values: Mapping[str, Any]) -> Fault:
        """The fault ``values`` ask for; ``ValueError`` (from :class:`Fault`) names a bad one."""
        first = () if self.type == "flag" else (values[self.key],)
        return self.make(*first, *(values.get(arg.key) for arg in self.args))


def _answer(status: int, retry_after: str | None, error_code: str | None) -> Fault:
    """``respond`` as a script asks for it: with a ``Retry-After``, and with an error document and
    its ``x-ms-error-code`` header, as Azure Storage answers an error."""
    headers: dict[str, str] = {}
    body = b""
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if error_code is not None:
        headers["x-ms-error-code"] = str(error_code)
        headers["Content-Type"] = "application/xml"
        body = (
            '<?xml version="1.0" encoding="utf-8"?><Error><Code>'
            f"{error_code}</Code><Message>scripted by the scenario</Message></Error>"
        ).encode()
    return respond(status, headers=headers, body=body)


#: The storage faults a script can ask for, in the order they are documented (and built, when
#: one entry asks for several: they combine on the same request).
VOCABULARY: tuple[FaultWord, ...] = (
    FaultWord("reset_after", "offset", "TCP reset after this many body bytes.", reset_after),
    FaultWord("close_after", "offset", "Clean close after this many body bytes.", close_after),
    FaultWord(
        "stall_after",
        "offset",
        "Stop sending after this many body bytes (see stall_for).",
        stall_after,
        args=(
            FaultArg(
                "stall_for",
                "seconds",
                "How long a stall lasts, on virtual time (passes at once, counts in elapsed).",
            ),
        ),
    ),
    FaultWord(
        "throttle",
        "rate",
        "Bytes per second the body is paced at, on virtual time.",
        throttle,
        example="1MiB",
    ),
    FaultWord("delay", "seconds", "Wait (virtual) before the answer's head.", delay),
    FaultWord("flip_byte", "offset", "Flip the body byte at this offset (0-based).", flip_byte),
    FaultWord(
        "close_before_headers",
        "flag",
        "Close the connection without a single answer byte.",
        close_before_headers,
    ),
    FaultWord(
        "respond",
        "status",
        "Answer this status instead of forwarding the request.",
        _answer,
        args=(
            FaultArg("retry_after", "text", "`Retry-After` header of `respond`.", required=False),
            FaultArg(
                "error_code",
                "text",
                "`x-ms-error-code` header of `respond`, e.g. ServerBusy.",
                required=False,
                example="ServerBusy",
            ),
        ),
        example="503",
    ),
    FaultWord(
        "ignore_range",
        "flag",
        "Forward without `Range`: storage answers 200, full body.",
        ignore_range,
    ),
)


def faults_from(values: Mapping[str, Any]) -> list[Fault]:
    """The faults a script's ``values`` (its keys, None for not given) ask for, in table order.

    Several combine on the same request. ``ValueError`` (from :class:`Fault`) names a value the
    proxy cannot act on (``throttle: 0``).
    """
    return [word.build(values) for word in VOCABULARY if word.asked(values)]
