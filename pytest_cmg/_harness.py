"""The running services of a test session: one blob service and one fake CMG, started lazily.

One harness per pytest session, hence one per xdist worker: Azurite is never started per test
(it costs ~2 s) and never shared between workers (in-memory state cannot be shared, and a shared
instance would make tests depend on each other). Each test gets its own container instead.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from typing import TYPE_CHECKING

from ._storage.azurite import make_backend

if TYPE_CHECKING:
    from ._gateway.server import FakeCMG
    from ._storage.azurite import AzuriteContainer, AzuriteProcess, BlobEndpoint, ExternalStorage
    from ._storage.clouddp import CloudDP

__all__ = ["Harness"]


class Harness:
    """Starts the blob backend and the gateway on first use; stops them at the end."""

    def __init__(
        self,
        backend: str = "process",
        *,
        connection_string: str | None = None,
        startup_timeout: float = 60.0,
        storage_https: bool = False,
    ) -> None:
        self.backend_name = backend
        # HTTP by default: the storage fault proxy and the egress meter speak HTTP only.
        self._backend: AzuriteProcess | AzuriteContainer | ExternalStorage = make_backend(
            backend,
            connection_string=connection_string,
            startup_timeout=startup_timeout,
            https=storage_https,
        )
        self._endpoint: BlobEndpoint | None = None
        self._gateway: FakeCMG | None = None
        self._lock = threading.Lock()
        # Container names must be unique across workers sharing an external account, and
        # across sessions reusing one: the pid tells workers apart, the counter tests.
        self._names = itertools.count(1)
        self._prefix = f"cmg-{os.getpid()}"
        # Shared by every cloud DP made here; set by cancel(), never waited on (see there).
        self._cancel = threading.Event()
        # Weak: a session makes one DP per test, and a DP nobody holds has nothing to close.
        self._dps: weakref.WeakSet[CloudDP] = weakref.WeakSet()

    @property
    def started(self) -> bool:
        return self._endpoint is not None

    @property
    def endpoint(self) -> BlobEndpoint:
        with self._lock:
            if self._endpoint is None:
                self._endpoint = self._backend.start()
            return self._endpoint

    @property
    def gateway(self) -> FakeCMG:
        with self._lock:
            if self._gateway is None:
                # Imported here: the plugin builds a Harness in every session, most of which
                # never reach a gateway (``--collect-only``, unrelated test runs).
                from ._gateway.server import FakeCMG

                self._gateway = FakeCMG().start()
            return self._gateway

    @property
    def backend_pid(self) -> int | None:
        return getattr(self._backend, "pid", None)

    def new_cloud_dp(self) -> CloudDP:
        """A cloud DP in a fresh private container of the session's blob service."""
        from ._storage.clouddp import CloudDP

        dp = CloudDP(self.endpoint, f"{self._prefix}-{next(self._names)}", cancel=self._cancel)
        self._dps.add(dp)
        dp.create()
        return dp

    def cancel(self) -> None:
        """Make distributions under way end soon: no further file is uploaded, and
        ``CloudDP.distribute`` raises ``CancelledError`` (the serve command's SIGTERM/SIGINT).

        Safe from a signal handler: ``Event.set`` takes the event's own lock, which nothing else
        ever holds (the DPs only call ``is_set``, which takes none), so it cannot deadlock on
        the interrupted main thread. Not undone: the harness is being stopped.
        """
        self._cancel.set()

    def stop(self) -> None:
        """Stop the gateway and the blob backend; safe after an interrupted start.

        The backend is stopped even when ``endpoint`` never returned: a start interrupted by
        serve's SIGTERM has already spawned Azurite, and every backend's ``stop`` does nothing
        when there is nothing to stop.
        """
        with self._lock:
            gateway, self._gateway = self._gateway, None
            self._endpoint = None
            try:
                if gateway is not None:
                    gateway.stop()
                # Azurite may wait for open keep-alive connections before it exits: not ours.
                for dp in list(self._dps):
                    dp.close()
            finally:
                self._backend.stop()
