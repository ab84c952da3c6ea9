"""TLS material for the fake CMG: a test CA that clients trust and the gateway's server certificate."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trustme

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["GatewayTLS"]


@dataclass
class GatewayTLS:
    """A CA, a server certificate for the CMG's names, and PEM files clients can point at."""

    ca: trustme.CA
    server_cert: trustme.LeafCert
    ca_pem: Path

    @classmethod
    def create(cls, folder: Path, hostname: str) -> GatewayTLS:
        folder.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name="pytest-cmg test CA")
        # Clients connect to 127.0.0.1; the service FQDN is there so a client that checks the CN
        # against the CMG name (as the real client does) also succeeds.
        server_cert = ca.issue_cert("127.0.0.1", "localhost", hostname)
        ca_pem = folder / "cmg-ca.pem"
        ca.cert_pem.write_to_path(str(ca_pem))
        return cls(ca=ca, server_cert=server_cert, ca_pem=ca_pem)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # "Enforce TLS 1.2" is on by default on the CMG (protocol.md section 4).
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.server_cert.configure_cert(context)
        return context
