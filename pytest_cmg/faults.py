"""Fault constructors for tests: storage-side faults for the ``storage_faults`` proxy.

Gateway-side faults are armed on the gateway itself: ``cmg.fail("manifest", status=503, ...)``.
This module is the public home of the fault proxy's API; the names are defined once, in
:mod:`pytest_cmg._net.faults` (the vocabulary) and :mod:`pytest_cmg._net.proxy` (the proxy).
"""

from __future__ import annotations

from ._net.faults import (
    Fault,
    FaultKind,
    close_after,
    close_before_headers,
    delay,
    flip_byte,
    ignore_range,
    reset_after,
    respond,
    stall_after,
    throttle,
)
from ._net.proxy import FaultProxy, ProxiedRequest

__all__ = [
    "Fault",
    "FaultKind",
    "FaultProxy",
    "ProxiedRequest",
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
