"""TLS material for the fake CMG: the server CA clients trust, and the client CAs the CMG trusts.

Client authentication follows the product's layers (docs/emulation.md, Product reference:
"Authentication and tokens"; docs/reliability.md rows 31 and 32):

1. **Trusted roots uploaded to the CMG** (two here: the client CA and a partner CA). A
   certificate that does not chain to one of them, is expired or not yet valid, or lacks the
   client-authentication usage fails the TLS handshake.
2. **The site's certificate trust list** (CTL), when one is configured, narrows the acceptable
   issuing roots: a certificate from an uploaded root that is not in the CTL is refused.
3. **Revocation** ("Verify client certificate revocation"): the certificate's CRL distribution
   point is read; a revoked certificate is refused, and so is one whose CRL cannot be read, is
   not signed by the issuer, or is out of date (fail closed).

Layers 2 and 3 run after the handshake, as IIS does, and refuse with IIS's 403 texts.
Emulation choice: CRLs are published as files and the distribution point is a ``file://`` URL,
so "unreachable" is a missing file (:meth:`GatewayTLS.publish_crls`), never a network timeout.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit
from urllib.request import url2pathname

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import InvalidValueError
from .._net.pki import CertificateAuthority, Credentials

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "CERT_REVOKED",
    "CERT_UNTRUSTED",
    "SERVER_CERTIFICATES",
    "WRONG_SERVER_NAME",
    "CertificateRefusal",
    "GatewayTLS",
]

#: IIS 403.13 and 403.16 texts: what a refused client certificate is answered with.
CERT_REVOKED = "Client certificate revoked"
CERT_UNTRUSTED = "Client certificate is untrusted or invalid"
#: Names of the client CAs, for ``issuer=`` and for a CTL in settings.
CLIENT_CA_NAME = "pytest-cmg client CA"
PARTNER_CA_NAME = "pytest-cmg partner CA"
#: The server certificates the CMG can present (``FakeCMG(server_certificate=...)``): a good
#: one, or one a client must refuse although a trusted CA signed it (docs/reliability.md row 31):
#: ``"wrong-host"`` names only :data:`WRONG_SERVER_NAME`, ``"expired"`` ended a day ago.
SERVER_CERTIFICATES = ("valid", "wrong-host", "expired")
#: The only name in a ``"wrong-host"`` server certificate: not the CMG, not 127.0.0.1.
WRONG_SERVER_NAME = "not-the-cmg.contoso.test"


@dataclass(frozen=True)
class CertificateRefusal:
    """Why the CMG refuses a client certificate that passed the handshake."""

    reason: str
    detail: str


def _common_name(name: x509.Name) -> str:
    values = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(values[0].value) if values else name.rfc4514_string()


@dataclass
class GatewayTLS:
    """The CMG's server certificate and CA, and the client CAs uploaded to it.

    They are separate, as in the product: the CMG's server certificate chains to whatever CA the
    clients trust, while the roots the CMG accepts for client authentication are uploaded to it.
    """

    folder: Path
    server_ca: CertificateAuthority
    client_ca: CertificateAuthority
    server: Credentials
    ca_pem: Path
    client_ca_pem: Path
    #: A second uploaded root (another PKI the organisation trusts): left out of a CTL that lists
    #: only the client CA, it shows that the CTL narrows the uploaded roots.
    partner_ca: CertificateAuthority | None = None
    partner_ca_pem: Path | None = None

    @classmethod
    def create(
        cls, folder: Path, hostname: str, *, server_certificate: str = "valid"
    ) -> GatewayTLS:
        """Fresh CAs and a server certificate of the kind ``server_certificate`` names.

        Every kind is signed by the server CA clients trust, so a refusal can only come from
        the defect the kind names (see :data:`SERVER_CERTIFICATES`).
        """
        if server_certificate not in SERVER_CERTIFICATES:
            msg = (
                f"no server certificate kind {server_certificate!r}; choose one of "
                f"{', '.join(SERVER_CERTIFICATES)}"
            )
            raise InvalidValueError(msg)
        folder.mkdir(parents=True, exist_ok=True)
        server_ca = CertificateAuthority("pytest-cmg server CA")
        client_ca = CertificateAuthority(CLIENT_CA_NAME)
        partner_ca = CertificateAuthority(PARTNER_CA_NAME)
        # Clients connect to 127.0.0.1; the CMG FQDN is in the certificate too, so a client that
        # checks the name against the CMG service name (as the real client does) also succeeds.
        name = hostname
        dns_names: tuple[str, ...] = (hostname, "localhost")
        ip_addresses: tuple[ipaddress.IPv4Address, ...] = (ipaddress.IPv4Address("127.0.0.1"),)
        not_after = None
        if server_certificate == "wrong-host":
            # No name a client could reach this CMG by, neither its FQDN nor the loopback.
            name, dns_names, ip_addresses = WRONG_SERVER_NAME, (WRONG_SERVER_NAME,), ()
        elif server_certificate == "expired":
            not_after = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
        server = server_ca.issue(
            folder,
            name,
            usage="server",
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            not_after=not_after,
            file_stem="cmg-server",
        )
        tls = cls(
            folder=folder,
            server_ca=server_ca,
            client_ca=client_ca,
            server=server,
            ca_pem=server_ca.write_pem(folder / "cmg-ca.pem"),
            client_ca_pem=client_ca.write_pem(folder / "cmg-client-ca.pem"),
            partner_ca=partner_ca,
            partner_ca_pem=partner_ca.write_pem(folder / "cmg-partner-ca.pem"),
        )
        tls.publish_crls()
        return tls

    # --- client certificates ---------------------------------------------------------------

    @property
    def uploaded_roots(self) -> tuple[CertificateAuthority, ...]:
        """The roots the CMG accepts client certificates from (before any CTL)."""
        return tuple(ca for ca in (self.client_ca, self.partner_ca) if ca is not None)

    def _ca_named(self, name: str) -> CertificateAuthority:
        for ca in self.uploaded_roots:
            if ca.name == name:
                return ca
        choices = ", ".join(repr(ca.name) for ca in self.uploaded_roots)
        msg = f"no uploaded client CA named {name!r}; choose one of {choices}"
        raise InvalidValueError(msg)

    def crl_path(self, ca: CertificateAuthority) -> Path:
        slug = "".join(c if c.isalnum() else "-" for c in ca.name)
        return self.folder / "crl" / f"{slug}.crl"

    def issue_client(
        self,
        client_id: str,
        *,
        usage: str | None = "client",
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        rogue: bool = False,
        issuer: str = CLIENT_CA_NAME,
    ) -> Credentials:
        """A client certificate whose subject CN is ``client_id``.

        ``rogue=True`` signs it with a fresh CA the CMG does not trust; ``issuer`` picks one of
        the uploaded roots (``"pytest-cmg client CA"`` or ``"pytest-cmg partner CA"``).
        """
        if rogue:
            ca = CertificateAuthority("rogue CA")
            crl_url = None
        else:
            ca = self._ca_named(issuer)
            crl_url = self.crl_path(ca).as_uri()
        return ca.issue(
            self.folder / "clients",
            client_id,
            usage=usage,
            not_before=not_before,
            not_after=not_after,
            crl_url=crl_url,
        )

    def revoke(self, credentials: Credentials) -> None:
        """Revoke a client certificate and publish its issuer's new CRL."""
        cert = x509.load_pem_x509_certificate(credentials.cert.read_bytes())
        ca = self._ca_named(_common_name(cert.issuer))
        ca.revoke(cert.serial_number)
        self.publish_crls((ca,))

    def publish_crls(self, cas: Iterable[CertificateAuthority] | None = None) -> None:
        """Write the CRLs of ``cas`` (all uploaded roots by default) where certificates say."""
        for ca in self.uploaded_roots if cas is None else cas:
            path = self.crl_path(ca)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(ca.crl())

    def withdraw_crls(self) -> None:
        """Make every CRL unreachable (the distribution point answers nothing)."""
        for ca in self.uploaded_roots:
            self.crl_path(ca).unlink(missing_ok=True)

    def refusal(
        self, der: bytes, *, trust_list: tuple[str, ...], crl_check: bool
    ) -> CertificateRefusal | None:
        """The CTL and revocation checks for a certificate that passed the handshake."""
        cert = x509.load_der_x509_certificate(der)
        issuer = _common_name(cert.issuer)
        if trust_list and issuer not in trust_list:
            return CertificateRefusal(
                CERT_UNTRUSTED,
                f"issuing root {issuer!r} is not in the certificate trust list",
            )
        if crl_check:
            return self._revocation(cert, issuer)
        return None

    def _revocation(self, cert: x509.Certificate, issuer: str) -> CertificateRefusal | None:
        try:
            ca = self._ca_named(issuer)
        except ValueError:
            return CertificateRefusal(CERT_UNTRUSTED, f"issuer {issuer!r} is not an uploaded root")
        try:
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except x509.ExtensionNotFound:
            return CertificateRefusal(
                CERT_UNTRUSTED, "no CRL distribution point: revocation status unknown"
            )
        urls = [
            name.value
            for point in points
            for name in point.full_name or ()
            if isinstance(name, x509.UniformResourceIdentifier)
        ]
        crl = next((c for c in map(_read_crl, urls) if c is not None), None)
        if crl is None:
            return CertificateRefusal(
                CERT_UNTRUSTED,
                f"CRL of {issuer!r} is unreachable: the revocation server was offline",
            )
        public_key = ca.certificate.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not crl.is_signature_valid(
            public_key
        ):
            return CertificateRefusal(CERT_UNTRUSTED, f"CRL of {issuer!r} is not signed by it")
        next_update = crl.next_update_utc
        if next_update is None or next_update < dt.datetime.now(dt.UTC):
            return CertificateRefusal(
                CERT_UNTRUSTED, f"CRL of {issuer!r} is out of date: revocation status unknown"
            )
        if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
            return CertificateRefusal(
                CERT_REVOKED, f"certificate serial {cert.serial_number:x} is revoked by {issuer!r}"
            )
        return None

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # "Enforce TLS 1.2" is on by default on the CMG (Microsoft Learn: Modify a cloud management
        # gateway; docs/emulation.md, Product reference: "Authentication and tokens").
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.server.cert, self.server.key)
        # Optional at the TLS layer so token clients (no certificate) can connect; the
        # mutual-auth paths then require one. A certificate that is presented is always
        # verified: a bad one fails the handshake, on every path (fail closed).
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cafile=str(self.client_ca_pem))
        if self.partner_ca_pem is not None:
            context.load_verify_locations(cafile=str(self.partner_ca_pem))
        return context


def _read_crl(url: str) -> x509.CertificateRevocationList | None:
    """The CRL at a ``file://`` distribution point, or None when it cannot be read."""
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    try:
        data = Path(url2pathname(parts.path)).read_bytes()
    except OSError:
        return None
    try:
        return x509.load_der_x509_crl(data)
    except ValueError:
        return None
