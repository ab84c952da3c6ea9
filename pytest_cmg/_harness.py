"""The running services of a test session: one blob service and one fake CMG, started lazily.

One harness per pytest session, hence one per xdist worker: Azurite is never started per test
(it costs ~2 s) and never shared between workers (in-memory state cannot be shared, and a shared
instance would make tests depend on each other). Each test gets its own container instead.
"""

from __future__ import annotations

import itertools
import os
import threading
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

        dp = CloudDP(self.endpoint, f"{self._prefix}-{next(self._names)}")
        dp.create()
        return dp

    def stop(self) -> None:
        with self._lock:
            if self._gateway is not None:
                self._gateway.stop()
                self._gateway = None
            if self._endpoint is not None:
                self._backend.stop()
                self._endpoint = None
