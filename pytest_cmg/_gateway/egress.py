"""Measured egress: the bytes storage actually served for the SAS URLs the gateway minted.

The product's egress is metered by Azure on the storage account (docs/emulation.md "Egress and
limits"; Microsoft Learn: Monitor the cloud management gateway): what
leaves storage counts, whatever the CMG authorised. :class:`EgressMeter` puts a counting proxy
(the project's :class:`~pytest_cmg._net.proxy.FaultProxy`, with no fault scripted) in
front of each storage host the gateway's SAS URLs point at, and sums the body bytes it handed to
clients for successful reads (``GET`` answered 200 or 206). A transfer cut midway counts the bytes
that went out; a download resumed with ``Range`` counts only what was sent again.

Limits: the proxy speaks plain HTTP only, so HTTPS storage cannot be measured
(:meth:`EgressMeter.rewrite` returns None for it and the gateway falls back to counting manifest
sizes for those URLs). Only reads through URLs the gateway minted pass the meter: the harness's
uploads and listings (shared key, straight to storage) are never counted.
"""

from __future__ import annotations

import contextlib
import threading
from urllib.parse import urlsplit

from .._net.proxy import FaultProxy

__all__ = ["EgressMeter"]

_SERVED = frozenset({200, 206})


class EgressMeter:
    """Counting proxies in front of storage, one per upstream ``http://host:port``."""

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._proxies: dict[str, FaultProxy] = {}
        self._lock = threading.Lock()

    def rewrite(self, url: str) -> str | None:
        """``url`` through the meter, or None when it cannot be metered (not plain HTTP)."""
        parts = urlsplit(url)
        if parts.scheme.lower() != "http" or not parts.hostname:
            return None
        upstream = f"http://{parts.netloc.lower()}"
        with self._lock:
            proxy = self._proxies.get(upstream)
            if proxy is None:
                proxy = FaultProxy(upstream, timeout=self.timeout).start()
                self._proxies[upstream] = proxy
        return proxy.rewrite(url)

    @property
    def served_bytes(self) -> int:
        """Body bytes of successful reads handed to clients so far."""
        with self._lock:
            proxies = list(self._proxies.values())
        return sum(
            record.body_bytes
            for proxy in proxies
            for record in proxy.log
            if record.method == "GET" and record.status in _SERVED
        )

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no metered transfer is in flight; False if one still runs at ``timeout``."""
        with self._lock:
            proxies = list(self._proxies.values())
        return all(proxy.wait_idle(timeout) for proxy in proxies)

    def reset(self) -> None:
        """Stop every proxy and forget what they counted (URLs minted before stop working)."""
        with self._lock:
            proxies, self._proxies = list(self._proxies.values()), {}
        for proxy in proxies:
            with contextlib.suppress(Exception):
                proxy.stop()

    close = reset
