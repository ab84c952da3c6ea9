"""Site-signed tokens: the CCM token clients present to the CMG, and the content access token.

Both are signed by the site's key. The CCM token is a JWT (RS256) carried as
``Authorization: Bearer <jwt>`` (the header name is not public; emulation design). The content
access token signs the ``pid cid tid iss st et`` parameters of the manifest request.
Lifetimes follow protocol.md section 2: CCM token 8 h, content access window 8 h.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .location import SHA256_RSA_OID, AccessToken

if TYPE_CHECKING:
    from .clock import Clock

__all__ = [
    "AUDIENCE",
    "BULK_REGISTRATION",
    "BULK_TOKEN_LIFETIME",
    "BULK_TOKEN_MAX_LIFETIME",
    "CCM_TOKEN_LIFETIME",
    "CONTENT_TOKEN_LIFETIME",
    "INVALID_TOKEN",
    "SiteAuthority",
    "TokenRejected",
]

AUDIENCE = "urn:sccm:service"
CCM_TOKEN_LIFETIME = timedelta(hours=8)
#: Bulk registration tokens: 4,320 min by default, at most 10,080 min (S10).
BULK_TOKEN_LIFETIME = timedelta(minutes=4320)
BULK_TOKEN_MAX_LIFETIME = timedelta(minutes=10080)
BULK_REGISTRATION = "BulkRegistration"
CONTENT_TOKEN_LIFETIME = timedelta(hours=8)
#: The status text the CMG answers a bad token with (S13).
INVALID_TOKEN = "CMGService_Invalid_Token"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class TokenRejected(Exception):
    """A token failed validation; ``reason`` says which rule (for the gateway's own log)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SiteAuthority:
    """The site's signing identity: issues and verifies tokens against an injectable clock."""

    clock: Clock
    site_guid: str = field(default_factory=lambda: str(uuid.uuid4()))
    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)
    )
    #: UniqueIds of bulk registration tokens an administrator has blocked.
    blocked: set[str] = field(default_factory=set)

    @property
    def issuer(self) -> str:
        return f"urn:sccm:oauth2:{self.site_guid}"

    def _sign(self, data: bytes) -> bytes:
        return self.key.sign(data, padding.PKCS1v15(), hashes.SHA256())

    def _verify(self, signature: bytes, data: bytes) -> bool:
        try:
            self.key.public_key().verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            return False
        return True

    # --- CCM token (JWT) -------------------------------------------------------------------

    def issue_ccm_token(
        self,
        client_id: str,
        *,
        lifetime: timedelta = CCM_TOKEN_LIFETIME,
        not_before: datetime | None = None,
        audience: str = AUDIENCE,
        token_type: str = "ClientToken",
    ) -> str:
        now = self.clock.now()
        nbf = not_before or now
        claims = {
            "SCCMTokenCategory": "ClientToken",
            "Authority": "SCCM",
            "Type": token_type,
            "UniqueId": client_id,
            "iss": self.issuer,
            "aud": audience,
            "nbf": int(nbf.timestamp()),
            "exp": int((nbf + lifetime).timestamp()),
        }
        header = {"alg": "RS256", "typ": "JWT", "x5t": self.thumbprint}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        return signing_input + "." + _b64url(self._sign(signing_input.encode("ascii")))

    @property
    def thumbprint(self) -> str:
        from cryptography.hazmat.primitives import serialization

        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return _b64url(hashlib.sha1(der, usedforsecurity=False).digest())

    def issue_bulk_token(self, lifetime: timedelta = BULK_TOKEN_LIFETIME) -> str:
        """A bulk registration token; like the product, refuses lifetimes over 10,080 minutes."""
        if lifetime > BULK_TOKEN_MAX_LIFETIME:
            msg = (
                f"bulk registration token lifetime {lifetime} exceeds the maximum of "
                f"{BULK_TOKEN_MAX_LIFETIME} (10,080 minutes)"
            )
            raise ValueError(msg)
        return self.issue_ccm_token(
            str(uuid.uuid4()), lifetime=lifetime, token_type=BULK_REGISTRATION
        )

    def block(self, unique_id: str) -> None:
        """Block a bulk registration token by its UniqueId (the console's "Block" action)."""
        self.blocked.add(unique_id)

    def verify_ccm_token(self, token: str, *, for_registration: bool = False) -> dict[str, Any]:
        """Return the claims, or raise :class:`TokenRejected` naming the rule that failed.

        A bulk registration token is only good for registering (``for_registration``, i.e. at
        CCM_STS) and never once blocked; client tokens are good everywhere.
        """
        claims = self._verify_jwt(token)
        if claims.get("Type") == BULK_REGISTRATION:
            if not for_registration:
                reason = "a bulk registration token can only be used to register (CCM_STS)"
                raise TokenRejected(reason)
            if claims.get("UniqueId") in self.blocked:
                reason = f"bulk registration token {claims.get('UniqueId')} is blocked"
                raise TokenRejected(reason)
        return claims

    def _verify_jwt(self, token: str) -> dict[str, Any]:
        parts = token.split(".")
        if len(parts) != 3:
            reason = "token is not a three-part JWT"
            raise TokenRejected(reason)
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError) as exc:
            reason = f"token is not decodable ({exc})"
            raise TokenRejected(reason) from exc
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            reason = f"token alg {header.get('alg') if isinstance(header, dict) else None!r} is not RS256"
            raise TokenRejected(reason)
        if not self._verify(signature, f"{parts[0]}.{parts[1]}".encode("ascii")):
            reason = "token signature does not verify against the site key"
            raise TokenRejected(reason)
        if not isinstance(claims, dict):
            reason = "token claims are not an object"
            raise TokenRejected(reason)
        if claims.get("aud") != AUDIENCE:
            reason = f"token audience {claims.get('aud')!r} is not {AUDIENCE!r}"
            raise TokenRejected(reason)
        if claims.get("iss") != self.issuer:
            reason = f"token issuer {claims.get('iss')!r} is not this site ({self.issuer})"
            raise TokenRejected(reason)
        now = self.clock.now().timestamp()
        if now < float(claims.get("nbf", 0)):
            reason = "token is not yet valid (nbf in the future)"
            raise TokenRejected(reason)
        if now >= float(claims.get("exp", 0)):
            reason = "IDX10223: Lifetime validation failed. The token is expired."
            raise TokenRejected(reason)
        return claims

    def signing_certificate_der(self) -> bytes:
        """The site signing certificate (self-signed over the site key), as ``.sms_aut`` serves it."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.x509.oid import NameOID

        name = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, "Site Server Signing Certificate")]
        )
        now = self.clock.now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(int(uuid.UUID(self.site_guid)))
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=365))
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

    # --- content access token -------------------------------------------------------------

    @staticmethod
    def _access_string(pid: str, cid: str, tid: str, iss: str, st: str, et: str) -> bytes:
        fields = [pid, cid, tid, iss, st, et]
        # Newline-joined, so a newline inside a field could move text between fields and keep
        # the signature valid: such fields are refused outright.
        if any("\n" in item for item in fields):
            reason = "access token fields must not contain newlines"
            raise TokenRejected(reason)
        return "\n".join(fields).encode("utf-8")

    def issue_access_token(
        self,
        package_id: str,
        content_id: str,
        client_id: str,
        issuer_host: str,
        lifetime: timedelta = CONTENT_TOKEN_LIFETIME,
    ) -> AccessToken:
        now = self.clock.now()
        st = now.strftime(_TIME_FORMAT)
        et = (now + lifetime).strftime(_TIME_FORMAT)
        data = self._access_string(package_id, content_id, client_id, issuer_host, st, et)
        return AccessToken(
            tid=client_id,
            iss=issuer_host,
            alg=SHA256_RSA_OID,
            st=st,
            et=et,
            signature=_b64url(self._sign(data)),
        )

    def verify_access(
        self, pid: str, cid: str, tid: str, iss: str, st: str, et: str, signature: str
    ) -> datetime:
        """Check a manifest request's token; return its end time (``et``) for SAS capping."""
        try:
            raw = _b64url_decode(signature)
        except ValueError as exc:
            reason = "access token signature is not base64url"
            raise TokenRejected(reason) from exc
        if not self._verify(raw, self._access_string(pid, cid, tid, iss, st, et)):
            reason = "access token signature does not match the request parameters"
            raise TokenRejected(reason)
        try:
            start = datetime.strptime(st, _TIME_FORMAT).replace(tzinfo=self.clock.now().tzinfo)
            end = datetime.strptime(et, _TIME_FORMAT).replace(tzinfo=self.clock.now().tzinfo)
        except ValueError as exc:
            reason = f"access token window st={st!r} et={et!r} is not {_TIME_FORMAT}"
            raise TokenRejected(reason) from exc
        now = self.clock.now()
        if now < start:
            reason = "access token is not yet valid (st in the future)"
            raise TokenRejected(reason)
        if now >= end:
            reason = "access token is expired (et in the past)"
            raise TokenRejected(reason)
        return end
