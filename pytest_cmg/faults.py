"""Fault constructors for tests: storage-side faults for the ``storage_faults`` proxy.

Gateway-side faults are armed on the gateway itself: ``cmg.fail("manifest", status=503, ...)``.
This module is the public home of the fault proxy's API; its names are defined once, there.
"""

from __future__ import annotations

from ._storage import faultproxy as _faultproxy
from ._storage.faultproxy import *  # noqa: F403

__all__ = list(_faultproxy.__all__)
