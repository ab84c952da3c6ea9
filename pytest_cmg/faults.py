"""Fault constructors for tests: storage-side faults for the ``storage_faults`` proxy.

Gateway-side faults are armed on the gateway itself: ``cmg.fail("manifest", status=503, ...)``.
This module is the public home of the fault proxy's API; the names are defined once, in
:mod:`pytest_cmg._net.faults` (the vocabulary) and :mod:`pytest_cmg._net.proxy` (the proxy).
"""

from __future__ import annotations

from ._net import faults as _vocabulary
from ._net.faults import *  # noqa: F403
from ._net.proxy import FaultProxy, ProxiedRequest

# The vocabulary's names come from its own __all__, so they are listed once.
__all__ = list(_vocabulary.__all__)
__all__ += ["FaultProxy", "ProxiedRequest"]
