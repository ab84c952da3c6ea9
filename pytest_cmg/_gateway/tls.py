"""TLS material for the fake CMG: the server CA clients trust, and the client CA the CMG trusts."""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .pki import CertificateAuthority, Credentials

if TYPE_CHECKING:
    import datetime as dt
    from pathlib import Path

__all__ = ["GatewayTLS"]


@dataclass
class GatewayTLS:
    """Two CAs: one signs the gateway's server certificate, one the clients' certificates.

    They are separate, as in the product: the CMG's server certificate chains to whatever CA the
    clients trust, while the roots the CMG accepts for client authentication are uploaded to it.
    """

    folder: Path
    server_ca: CertificateAuthority
    client_ca: CertificateAuthority
    server: Credentials
    ca_pem: Path
    client_ca_pem: Path

    @classmethod
    def create(cls, folder: Path, hostname: str) -> GatewayTLS:
        folder.mkdir(parents=True, exist_ok=True)
        server_ca = CertificateAuthority("pytest-cmg server CA")
        client_ca = CertificateAuthority("pytest-cmg client CA")
        # Clients connect to 127.0.0.1; the CMG FQDN is in the certificate too, so a client that
        # checks the name against the CMG service name (as the real client does) also succeeds.
        server = server_ca.issue(
            folder,
            hostname,
            usage="server",
            dns_names=(hostname, "localhost"),
            ip_addresses=(ipaddress.IPv4Address("127.0.0.1"),),
            file_stem="cmg-server",
        )
        return cls(
            folder=folder,
            server_ca=server_ca,
            client_ca=client_ca,
            server=server,
            ca_pem=server_ca.write_pem(folder / "cmg-ca.pem"),
            client_ca_pem=client_ca.write_pem(folder / "cmg-client-ca.pem"),
        )

    def issue_client(
        self,
        client_id: str,
        *,
        usage: str | None = "client",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        rogue: bool = False,
    ) -> Credentials:
        """A client certificate whose subject CN is ``client_id``.

        ``rogue=True`` signs it with a fresh CA the CMG does not trust.
        """
        ca = CertificateAuthority("rogue CA") if rogue else self.client_ca
        return ca.issue(
            self.folder / "clients",
            client_id,
            usage=usage,
            not_before=not_before,
            not_after=not_after,
        )

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # "Enforce TLS 1.2" is on by default on the CMG (protocol.md section 4).
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server.cert, self.server.key)
        # Optional at the TLS layer so token clients (no certificate) can connect; the
        # mutual-auth paths then require one. A certificate that is presented is always
        # verified: a bad one fails the handshake, on every path (fail closed).
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(self.client_ca_pem))
        return context
