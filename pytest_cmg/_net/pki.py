"""Test PKI for the fake CMG and an HTTPS Azurite: CAs, server certificates, client certificates.

Built on ``cryptography`` rather than trustme because tests need the certificates the product
must refuse (docs/reliability.md test 32): expired, not yet valid, issued by a CA the CMG does not
trust, lacking the client-authentication usage, or revoked. OpenSSL enforces the first four
during the handshake; a certificate with *no* extended key usage at all counts as "any purpose"
there, as it does on Windows, and is accepted. Revocation is the gateway's check: each CA keeps
a revocation list (:meth:`CertificateAuthority.crl`) and names where it is published in the
certificates it issues (CRL distribution point).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

if TYPE_CHECKING:
    import ipaddress
    from pathlib import Path

__all__ = ["CertificateAuthority", "Credentials"]

_USAGES = {
    "client": [ExtendedKeyUsageOID.CLIENT_AUTH],
    "server": [ExtendedKeyUsageOID.SERVER_AUTH],
}


@dataclass(frozen=True)
class Credentials:
    """A certificate and its private key as PEM files (what TLS libraries load)."""

    cert: Path
    key: Path


def _now() -> dt.datetime:
    # Certificates are checked by OpenSSL against the real clock, never the harness's fake one.
    return dt.datetime.now(dt.UTC)


class CertificateAuthority:
    """A self-signed CA that issues server and client certificates."""

    def __init__(self, name: str) -> None:
        self.name = name
        #: Serial numbers this CA revoked, with when.
        self.revoked: dict[int, dt.datetime] = {}
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write_pem(self, path: Path) -> Path:
        path.write_bytes(self.cert_pem)
        return path

    def revoke(self, serial: int) -> None:
        self.revoked.setdefault(serial, _now())

    def crl(self, *, next_update: dt.timedelta = dt.timedelta(days=7)) -> bytes:
        """The CA's current certificate revocation list (DER), signed by the CA."""
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + next_update)
        )
        for serial, when in sorted(self.revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        return builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)

    def issue(
        self,
        folder: Path,
        common_name: str,
        *,
        usage: str | None = "client",
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[ipaddress.IPv4Address, ...] = (),
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        file_stem: str | None = None,
        crl_url: str | None = None,
    ) -> Credentials:
        """Issue a leaf certificate; ``usage`` is ``"client"``, ``"server"`` or ``None`` (no EKU).

        ``crl_url`` becomes the certificate's CRL distribution point.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        # Either bound alone must give a valid window: an expired certificate needs only
        # not_after in the past, a not-yet-valid one only not_before in the future.
        start = not_before or min(
            now - dt.timedelta(hours=1), (not_after or now) - dt.timedelta(days=1)
        )
        end = not_after or max(now + dt.timedelta(days=365), start + dt.timedelta(days=1))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
        )
        if usage is not None:
            builder = builder.add_extension(x509.ExtendedKeyUsage(_USAGES[usage]), critical=False)
        names: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        names += [x509.IPAddress(ip) for ip in ip_addresses]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        if crl_url is not None:
            point = x509.DistributionPoint(
                full_name=[x509.UniformResourceIdentifier(crl_url)],
                relative_name=None,
                reasons=None,
                crl_issuer=None,
            )
            builder = builder.add_extension(x509.CRLDistributionPoints([point]), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        folder.mkdir(parents=True, exist_ok=True)
        # The serial makes every issue its own pair of files: a second certificate for the same
        # client must not overwrite the key a running client still reads.
        stem = file_stem or (
            "".join(c if c.isalnum() else "-" for c in common_name) + f"-{cert.serial_number:x}"[:9]
        )
        cert_path = folder / f"{stem}.pem"
        key_path = folder / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)
        return Credentials(cert=cert_path, key=key_path)
