"""The fake CMG: the site's decisions (``site.py``) behind an HTTPS front door (``frontdoor.py``).

It works without pytest (``with FakeCMG(cloud_dp=dp) as cmg: ...``); the pytest plugin only wires
it into fixtures. Everything a test scripts or asserts (settings, faults, tokens, the request
log) belongs to the site; this class adds the listener on 127.0.0.1, its TLS material and its
limits, and the lifecycle.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .._errors import NotRunningError
from .._util.service import Service
from .frontdoor import FrontDoor, FrontDoorLimits
from .site import CmgSite
from .tls import GatewayTLS

__all__ = ["FakeCMG"]


class FakeCMG(CmgSite, Service):
    """A content-enabled CMG in front of a :class:`~pytest_cmg.CloudDP`, served over HTTPS.

    Takes :class:`~pytest_cmg._gateway.site.CmgSite`'s keywords (``cloud_dp``, ``clock``,
    ``site_code``, ``role_id``, ``hostname``, ``sas_lifetime``, ``workdir``,
    ``classic_dp_hostname``, ``server_certificate``) and the front door's limits
    (``max_connections``, ``handshake_timeout``, ``header_timeout``, ``idle_timeout``,
    ``body_timeout``, ``max_header_bytes``, ``max_headers``, ``drain_limit``; see
    :class:`FrontDoorLimits` for what each bounds and its default).
    """

    def __init__(self, **options: Any) -> None:  # noqa: ANN401 - split between the two parts
        limit_names = set(FrontDoorLimits.__dataclass_fields__)
        limits = {name: options.pop(name) for name in list(options) if name in limit_names}
        super().__init__(**options)
        self.limits = FrontDoorLimits(**limits)
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._door: FrontDoor | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeCMG:
        if self._door is not None:
            return self
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="pytest-cmg-gw-")
            self._workdir = Path(self._tempdir.name)
        self._tls = GatewayTLS.create(
            self._workdir, self.hostname, server_certificate=self.server_certificate
        )
        door = FrontDoor(self, self._tls.server_context(), self.limits)
        door.start()
        self._door = door
        self.service_log(f"CMG service started on {self.url} (role {self.role_id})")
        return self

    def stop(self) -> None:
        self.close_egress_meter()
        if self._door is None:
            return
        self._door.stop()
        self._door = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._workdir = None

    # --- what clients need -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._door is None:
            msg = "FakeCMG is not started; call start() or use it as a context manager"
            raise NotRunningError(msg)
        return self._door.port

    @property
    def url(self) -> str:
        """The gateway's base URL, e.g. ``https://127.0.0.1:40123``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        """Client connections the front door holds now."""
        return self._door.open_connections if self._door is not None else 0

    @property
    def refused_connections(self) -> int:
        """Connections closed at accept because ``max_connections`` were already open."""
        return self._door.refused_connections if self._door is not None else 0
