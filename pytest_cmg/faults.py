"""Fault constructors for tests: storage-side faults for the ``storage_faults`` proxy.

Gateway-side faults are armed on the gateway itself: ``cmg.fail("manifest", status=503, ...)``.
"""

from __future__ import annotations

from ._storage.faultproxy import (
    Fault,
    FaultProxy,
    ProxiedRequest,
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

__all__ = [
    "Fault",
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
