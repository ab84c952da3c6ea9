"""Scripted faults for the fake CMG, chosen by endpoint and request number.

Deterministic on purpose: a fault fires on the Nth request to an endpoint (or on the next N
requests), never at random, so a failing test fails the same way every time.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from .._errors import InvalidValueError
from .._protocol.paths import Endpoint

__all__ = ["PACKAGE_HASH_FAULTS", "FaultPlan", "GatewayFault"]

#: What ``GatewayFault.package_hash`` may ask for: ``wrong`` (another hash than the content's).
PACKAGE_HASH_FAULTS = ("wrong",)


@dataclass(frozen=True)
class GatewayFault:
    """What to do instead of (or on top of) a normal answer.

    :param endpoint: ``location``, ``manifest``, ``sts``, ``metadata``, ``sms_aut`` or ``None``
        for any endpoint.
    :param request: the 1-based number of the request to that endpoint the fault fires on;
        ``None`` means the next requests, whatever their number.
    :param times: how many requests it fires on (from ``request`` on).
    :param status: answer this status instead (with ``reason`` and, for 429/503, ``retry_after``).
    :param delay: seconds to wait before answering (bounded by the client's own timeout).
    :param drop: close the connection without any response.
    :param truncate: send only this many body bytes of the normal answer, then close.
    :param wrong_hash: manifest only: corrupt the first file's SHA-256.
    :param sas_ttl: manifest only: SAS URLs that expire this many seconds after issue.
    :param package_hash: location only: ``"wrong"`` makes the reply carry a package hash that is
        not the content's (its first hex digit changed). The manifest stays consistent with
        itself, so only a client that trusts the location reply's hash, as the product does,
        notices (0x80091007).
    """

    endpoint: str | None = None
    request: int | None = None
    times: int = 1
    status: int | None = None
    reason: str | None = None
    retry_after: str | None = None
    delay: float = 0.0
    drop: bool = False
    truncate: int | None = None
    wrong_hash: bool = False
    sas_ttl: float | None = None
    package_hash: str | None = None

    def describe(self) -> str:
        """The fault's non-default settings, e.g. ``fault(endpoint='location', drop=True)``."""
        # Compared by identity of type and value with the field defaults: True == 1, so a
        # value test alone would hide drop=True behind times=1.
        parts = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
            if type(getattr(self, f.name)) is not type(f.default)
            or getattr(self, f.name) != f.default
        ]
        return "fault(" + ", ".join(parts) + ")"


@dataclass
class _Armed:
    fault: GatewayFault
    remaining: int


class FaultPlan:
    """The faults armed on a gateway, and per-endpoint request counters they are matched against."""

    def __init__(self) -> None:
        self._armed: list[_Armed] = []
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, fault: GatewayFault) -> None:
        if fault.times < 1:
            msg = f"{fault.describe()}: times must be at least 1 (a fault fires once or more)"
            raise InvalidValueError(msg)
        if fault.package_hash is not None and fault.package_hash not in PACKAGE_HASH_FAULTS:
            msg = (
                f"{fault.describe()}: package_hash must be one of "
                f"{', '.join(PACKAGE_HASH_FAULTS)}, not {fault.package_hash!r}"
            )
            raise InvalidValueError(msg)
        if fault.package_hash is not None and fault.endpoint != Endpoint.LOCATION:
            msg = f"{fault.describe()}: package_hash needs endpoint='location' (the reply carries it)"
            raise InvalidValueError(msg)
        with self._lock:
            self._armed.append(_Armed(fault, fault.times))

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()
            self._counts.clear()

    def next_request(self, endpoint: str) -> tuple[int, list[GatewayFault]]:
        """Count a request to ``endpoint``; return its number and the faults that fire on it."""
        with self._lock:
            number = self._counts.get(endpoint, 0) + 1
            self._counts[endpoint] = number
            firing = []
            for armed in self._armed:
                fault = armed.fault
                if armed.remaining <= 0 or fault.endpoint not in (None, endpoint):
                    continue
                if fault.request is not None and not (
                    fault.request <= number < fault.request + fault.times
                ):
                    continue
                armed.remaining -= 1
                firing.append(fault)
            return number, firing

    def fired(self, fault: GatewayFault) -> int:
        """How many requests ``fault`` (the object :meth:`add` was given) has fired on.

        By identity, not equality: two equal faults armed by two timeline entries are told
        apart, so each entry can be told whether it ever fired.
        """
        with self._lock:
            return sum(a.fault.times - a.remaining for a in self._armed if a.fault is fault)

    @property
    def pending(self) -> list[GatewayFault]:
        """Faults that have not fired as often as they were armed for."""
        with self._lock:
            return [a.fault for a in self._armed if a.remaining > 0]
