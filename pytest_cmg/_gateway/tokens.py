"""Tokens: the site's CCM and content access tokens, and Azure AD tokens of a fake tenant.

The site's tokens are signed by the site's key. The CCM token is a JWT (RS256) carried as
``Authorization: Bearer <jwt>`` (the header name is not public; emulation design). The content
access token signs the ``pid cid tid iss st et`` parameters of the manifest request.
Lifetimes are the product's: CCM token 8 h (Microsoft Learn: Install and assign Configuration
Manager Windows clients using Azure AD for authentication), content access window 8 h; see
docs/emulation.md "The CCM token".

Azure AD (docs/emulation.md "Azure AD client authentication", docs/reliability.md test 33):
:class:`AzureADTenant` is a fake
tenant that signs device tokens (RS256, ``kid`` in the header) for the resource
``https://ConfigMgrService``; :class:`AzureADDirectory` is what the site knows of Azure AD (the
onboarded tenants, enabled or not, their signing keys, and which Azure AD device is which
client) and validates those tokens the way Microsoft.IdentityModel does, with its ``IDX`` texts.

Every token reaching a verifier is untrusted input: before a signature can be checked its JSON
has to be read. That reading refuses, always as :class:`TokenRejected`, a token longer than
:data:`MAX_TOKEN_LENGTH`, anything but exactly three segments of unpadded base64url, segments
that are not UTF-8, and JSON nesting deeper than :data:`MAX_JSON_DEPTH` (checked before
``json.loads``, whose recursion a 5,000-deep array overflows).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from .._errors import InvalidValueError, PytestCmgError
from .._protocol.location import SHA256_RSA_OID, AccessToken

if TYPE_CHECKING:
    from collections.abc import Mapping

    from .._protocol.clock import Clock

__all__ = [
    "AAD_CLOCK_SKEW",
    "AAD_RESOURCE",
    "AAD_TOKEN_LIFETIME",
    "AUDIENCE",
    "BULK_REGISTRATION",
    "BULK_TOKEN_LIFETIME",
    "BULK_TOKEN_MAX_LIFETIME",
    "CCM_TOKEN_LIFETIME",
    "CONTENT_TOKEN_LIFETIME",
    "INVALID_TOKEN",
    "MAX_JSON_DEPTH",
    "MAX_TOKEN_LENGTH",
    "AzureADDirectory",
    "AzureADTenant",
    "SiteAuthority",
    "TokenRejected",
    "is_azure_ad_token",
]

AUDIENCE = "urn:sccm:service"
CCM_TOKEN_LIFETIME = timedelta(hours=8)
#: Bulk registration tokens: 4,320 min by default, at most 10,080 min (Microsoft Learn:
#: Token-based authentication for cloud management gateway).
BULK_TOKEN_LIFETIME = timedelta(minutes=4320)
BULK_TOKEN_MAX_LIFETIME = timedelta(minutes=10080)
BULK_REGISTRATION = "BulkRegistration"
CONTENT_TOKEN_LIFETIME = timedelta(hours=8)
#: The status text the CMG answers a bad token with (Microsoft Learn: Troubleshoot CMG
#: communication errors).
INVALID_TOKEN = "CMGService_Invalid_Token"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
#: The longest token (or access token signature) a verifier reads, in characters. A site CCM
#: token is under 1 KiB and an Azure AD device token 1-3 KiB; the cap leaves room for large
#: Azure AD claim sets and refuses anything bigger before one byte of it is decoded.
MAX_TOKEN_LENGTH = 16 * 1024
#: How deeply a JWT's header or claims may nest JSON objects and arrays. Both are flat objects
#: (depth 1); Azure AD claims hold arrays of strings (``amr``, ``groups``: depth 2).
MAX_JSON_DEPTH = 8
#: Unpadded base64url (RFC 7515 section 2): what a JWT segment is made of, and nothing else.
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
#: The characters that matter to the depth of a JSON text: brackets, and what delimits strings.
_JSON_STRUCTURE = re.compile(r'[\[\]{}"\\]')


class TokenRejected(PytestCmgError):
    """A token failed validation; ``reason`` says which rule (for the gateway's own log)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url; ``ValueError`` otherwise.

    The standard library's decoder silently skips characters outside the alphabet, so
    ``"e30!!!"`` would read as ``{}``: two readers of one token could then disagree on it.
    """
    if _B64URL.fullmatch(text) is None or len(text) % 4 == 1:
        msg = (
            f"{len(text)} characters that are not unpadded base64url (RFC 7515 section 2: "
            "only A-Z a-z 0-9 - _, no '=' padding, a length never 1 more than a multiple of 4)"
        )
        raise InvalidValueError(msg)
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json_too_deep(text: str, limit: int) -> bool:
    """Whether ``text`` opens more than ``limit`` nested arrays or objects, found without
    recursing: ``json.loads`` recurses once per level and a few thousand levels overflow the
    interpreter's stack (RecursionError), so depth is bounded before it runs. Brackets inside
    strings do not count; on invalid JSON the answer may over-count, never under-count."""
    depth = 0
    in_string = False
    escaped = -1  # position of the character a backslash escapes
    for match in _JSON_STRUCTURE.finditer(text):
        char, position = match.group(), match.start()
        if in_string:
            if position == escaped:
                continue
            if char == "\\":
                escaped = position + 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _json_segment(data: bytes, part: str) -> Any:  # noqa: ANN401 - whatever JSON value it holds
    """One decoded JWT segment read as JSON; ``ValueError`` names the segment and the rule."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        msg = f"JWT {part} is not UTF-8 JSON (RFC 7519 section 7.2): byte {exc.start}"
        raise InvalidValueError(msg) from exc
    if _json_too_deep(text, MAX_JSON_DEPTH):
        msg = (
            f"JWT {part} nests JSON more than {MAX_JSON_DEPTH} levels deep; a JWT's "
            "header and claims are flat objects"
        )
        raise InvalidValueError(msg)
    try:
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError, or an integer of over 4,300 digits
        msg = f"JWT {part} is not JSON ({exc})"
        raise InvalidValueError(msg) from exc


class _NotJwt(PytestCmgError):
    """A token that is not a compact JWS of JSON segments; ``detail`` says which rule it
    breaks, ``segments`` is True when it does not even have three segments."""

    def __init__(self, detail: str, *, segments: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.segments = segments


@dataclass(frozen=True)
class _Jwt:
    header: Any
    claims: Any
    signature: bytes
    #: What the signature signs: the first two segments as sent.
    signed: bytes


def _split_jwt(token: str) -> _Jwt:
    """The decoded segments of a compact JWS, or :class:`_NotJwt`. Shared by the site's and
    Azure AD's verifiers, which word the same failures differently (ours, and IDX codes).

    Bounded before anything is decoded: the length first (:data:`MAX_TOKEN_LENGTH`), then
    strict base64url, UTF-8 and JSON depth per segment (:data:`MAX_JSON_DEPTH`). Header and
    claims may still be any JSON value; each verifier refuses non-objects in its own words.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        detail = (
            f"token of {len(token)} characters is longer than the {MAX_TOKEN_LENGTH} "
            "a verifier reads"
        )
        raise _NotJwt(detail)
    parts = token.split(".")
    if len(parts) != 3:
        detail = f"{len(parts)} segments, not 3"
        raise _NotJwt(detail, segments=True)
    decoded = []
    for part, text in zip(("header", "claims", "signature"), parts, strict=True):
        try:
            decoded.append(_b64url_decode(text))
        except ValueError as exc:
            detail = f"JWT {part}: {exc}"
            raise _NotJwt(detail) from exc
    try:
        header = _json_segment(decoded[0], "header")
        claims = _json_segment(decoded[1], "claims")
    except ValueError as exc:
        raise _NotJwt(str(exc)) from exc
    # ASCII once all three segments were found to be base64url.
    return _Jwt(header, claims, decoded[2], f"{parts[0]}.{parts[1]}".encode("ascii"))


def _jwt_or_rejected(token: str, *, not_three: str, not_decodable: str) -> _Jwt:
    """:func:`_split_jwt`, its refusal a :class:`TokenRejected` in the verifier's own words:
    ``not_three`` when the token does not have three segments, else ``not_decodable``, each a
    template whose ``{detail}`` is the rule the token broke."""
    try:
        return _split_jwt(token)
    except _NotJwt as bad:
        template = not_three if bad.segments else not_decodable
        raise TokenRejected(template.format(detail=bad.detail)) from bad


def _numeric_date(claims: Mapping[str, Any], name: str, default: float | None) -> float:
    """Claim ``name`` as a NumericDate (RFC 7519 section 2: a JSON number of seconds).

    ``TokenRejected`` for a missing claim without a default, or for one that is not a finite
    number: ``float()`` of a string, a list or a 400-digit integer would raise something else
    (ValueError, TypeError, OverflowError) and the caller would answer 500.
    """
    value = claims.get(name, default)
    if value is None:
        reason = f"IDX10225: Lifetime validation failed. The token is missing the {name!r} claim"
        raise TokenRejected(reason)
    if isinstance(value, bool) or not isinstance(value, int | float):
        reason = f"token claim {name!r} is not a NumericDate (a JSON number of seconds)"
        raise TokenRejected(reason)
    try:
        seconds = float(value)
    except OverflowError as exc:
        reason = f"token claim {name!r} is out of range for a NumericDate"
        raise TokenRejected(reason) from exc
    if not math.isfinite(seconds):
        # json.loads reads NaN and Infinity: every comparison with NaN is False, so a NaN
        # "exp" would never expire a token; an infinite one says the same outright.
        reason = f"token claim {name!r} is {seconds}, not a finite NumericDate"
        raise TokenRejected(reason)
    return seconds


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
            raise InvalidValueError(msg)
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
        unique_id = claims.get("UniqueId")
        if not isinstance(unique_id, str):
            # Callers read it as the client's ID, and a list would not even be hashable for
            # the blocked-token check (TypeError, answered 500).
            reason = f"token claim 'UniqueId' is {type(unique_id).__name__}, not a string"
            raise TokenRejected(reason)
        if claims.get("Type") == BULK_REGISTRATION:
            if not for_registration:
                reason = "a bulk registration token can only be used to register (CCM_STS)"
                raise TokenRejected(reason)
            if unique_id in self.blocked:
                reason = f"bulk registration token {unique_id} is blocked"
                raise TokenRejected(reason)
        return claims

    def _verify_jwt(self, token: str) -> dict[str, Any]:
        jwt = _jwt_or_rejected(
            token,
            not_three="token is not a three-part JWT ({detail})",
            not_decodable="token is not decodable ({detail})",
        )
        header, claims, signature = jwt.header, jwt.claims, jwt.signature
        if not isinstance(header, dict) or header.get("alg") != "RS256":
            reason = f"token alg {header.get('alg') if isinstance(header, dict) else None!r} is not RS256"
            raise TokenRejected(reason)
        if not self._verify(signature, jwt.signed):
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
        if now < _numeric_date(claims, "nbf", 0):
            reason = "token is not yet valid (nbf in the future)"
            raise TokenRejected(reason)
        if now >= _numeric_date(claims, "exp", 0):
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
        try:
            return "\n".join(fields).encode("utf-8")
        except UnicodeEncodeError as exc:
            # A lone surrogate, as a path decoded with surrogateescape can carry: no signed
            # token ever holds one, and UnicodeEncodeError would otherwise escape as a 500.
            reason = f"access token field holds a lone surrogate at character {exc.start}"
            raise TokenRejected(reason) from exc

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
        if len(signature) > MAX_TOKEN_LENGTH:
            reason = (
                f"access token signature of {len(signature)} characters is longer than the "
                f"{MAX_TOKEN_LENGTH} a verifier reads"
            )
            raise TokenRejected(reason)
        try:
            raw = _b64url_decode(signature)
        except ValueError as exc:
            reason = f"access token signature is not base64url ({exc})"
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


# --- Azure AD ---------------------------------------------------------------------------------

#: The resource Azure AD tokens are requested for: the App ID URI of the CMG's server app
#: (Microsoft Learn: Install and assign Configuration Manager Windows clients using Azure AD).
AAD_RESOURCE = "https://ConfigMgrService"
#: Azure AD access tokens live 60 to 90 minutes; the fake tenant issues 1-hour ones.
AAD_TOKEN_LIFETIME = timedelta(hours=1)
#: Microsoft.IdentityModel's default clock skew (``TokenValidationParameters.DefaultClockSkew``).
AAD_CLOCK_SKEW = timedelta(minutes=5)
_AAD_ISSUERS = ("https://sts.windows.net/", "https://login.microsoftonline.com/")


def _unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT without any check; only ever used to choose how to validate it.

    Read with the verifiers' own bounded decoder: whatever it cannot read gives ``{}`` here, so
    the site's verifier is chosen and refuses the token as :class:`TokenRejected`.
    """
    try:
        claims = _split_jwt(token).claims
    except _NotJwt:
        return {}
    return claims if isinstance(claims, dict) else {}


def is_azure_ad_token(token: str) -> bool:
    """Whether ``token`` says it comes from Azure AD (unverified ``iss``): picks the validator.

    Nothing is trusted from this answer: the token is then validated against the tenant's keys,
    and a forged ``iss`` only selects a validator that refuses it.
    """
    issuer = _unverified_claims(token).get("iss")
    return isinstance(issuer, str) and issuer.startswith(_AAD_ISSUERS)


def _new_kid() -> str:
    return _b64url(uuid.uuid4().bytes)


@dataclass
class AzureADTenant:
    """A fake Azure AD tenant: signs device tokens for the CMG's server app.

    Keys rotate like Azure AD's: :meth:`rotate_key` adds a key with a new ``kid`` and signs with
    it from then on; older keys stay published until :meth:`retire_key`.
    """

    clock: Clock
    tenant_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: The native client app registered for the clients (ccmsetup's ``AADCLIENTAPPID``).
    client_app_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    kid: str = ""

    def __post_init__(self) -> None:
        if not self.keys:
            self.rotate_key()

    @property
    def issuer(self) -> str:
        return f"https://sts.windows.net/{self.tenant_id}/"

    def rotate_key(self) -> str:
        """Add a signing key and sign with it from now on; return its ``kid``."""
        kid = _new_kid()
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid
        return kid

    def retire_key(self, kid: str) -> None:
        """Stop publishing a key: tokens it signed no longer validate (``kid`` unknown)."""
        self.keys.pop(kid, None)

    def device_id_of(self, client_id: str) -> str:
        """The Azure AD device ID of the device a client runs on (stable per tenant and client)."""
        return str(uuid.uuid5(uuid.UUID(self.tenant_id), client_id))

    def issue_device_token(
        self,
        device_id: str,
        *,
        audience: str = AAD_RESOURCE,
        lifetime: timedelta = AAD_TOKEN_LIFETIME,
        not_before: datetime | None = None,
        kid: str | None = None,
        signing_key: rsa.RSAPrivateKey | None = None,
        alg: str = "RS256",
    ) -> str:
        """A v1.0 Azure AD device token; the keyword arguments make the ones a CMG must refuse.

        ``kid`` names a key the tenant never published, ``signing_key`` signs with a key other
        than the one ``kid`` names (bad signature), ``alg="none"`` leaves the token unsigned.
        """
        now = self.clock.now()
        nbf = not_before or now
        object_id = str(uuid.uuid5(uuid.UUID(self.tenant_id), "object:" + device_id))
        claims = {
            "aud": audience,
            "iss": self.issuer,
            "iat": int(now.timestamp()),
            "nbf": int(nbf.timestamp()),
            "exp": int((nbf + lifetime).timestamp()),
            "appid": self.client_app_id,
            "deviceid": device_id,
            "oid": object_id,
            "sub": object_id,
            "tid": self.tenant_id,
            "ver": "1.0",
        }
        header = {"typ": "JWT", "alg": alg, "kid": kid or self.kid}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        if alg == "none":
            return signing_input + "."
        # An unpublished ``kid`` still gets a real signature (the current key's): what fails
        # is finding the key, not the signature.
        key = signing_key or self.keys.get(kid or self.kid) or self.keys[self.kid]
        signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)


@dataclass
class AzureADDirectory:
    """What the site knows of Azure AD: onboarded tenants, their state, and their devices.

    :meth:`verify` validates a device token as Microsoft.IdentityModel would for the CMG's server
    app (signature by a published key of the tenant, issuer, audience, lifetime with a 5-minute
    skew), then the site's own rules: the tenant must be onboarded and enabled.
    """

    clock: Clock
    tenants: dict[str, AzureADTenant] = field(default_factory=dict)
    disabled: set[str] = field(default_factory=set)
    #: (tenant ID, Azure AD device ID) -> the SMSID the device registered as.
    devices: dict[tuple[str, str], str] = field(default_factory=dict)

    def onboard(self, tenant: AzureADTenant | None = None) -> AzureADTenant:
        """Add a tenant to the site (Cloud Services > Azure Services); a new one by default."""
        tenant = tenant or AzureADTenant(clock=self.clock)
        self.tenants[tenant.tenant_id] = tenant
        return tenant

    def disable(self, tenant_id: str) -> None:
        self.disabled.add(tenant_id)

    def enable(self, tenant_id: str) -> None:
        self.disabled.discard(tenant_id)

    def auth_info(self, tenant_id: str) -> AzureADTenant | None:
        """The tenant ccmsetup may get Azure AD properties for, or None (unknown or disabled)."""
        tenant = self.tenants.get(tenant_id)
        if tenant is None or tenant_id in self.disabled:
            return None
        return tenant

    def register_device(self, tenant_id: str, device_id: str, client_id: str) -> None:
        self.devices[(tenant_id, device_id)] = client_id

    def client_of(self, claims: Mapping[str, Any]) -> str | None:
        """The SMSID of the device a validated token names, if it registered."""
        return self.devices.get((str(claims.get("tid")), str(claims.get("deviceid"))))

    def verify(self, token: str) -> dict[str, Any]:
        """Return the claims of a valid device token, or raise :class:`TokenRejected`."""
        jwt = _jwt_or_rejected(
            token,
            not_three="IDX12741: JWT must have three segments ({detail})",
            not_decodable="IDX12729: Unable to decode the token ({detail})",
        )
        header, claims, signature = jwt.header, jwt.claims, jwt.signature
        if not isinstance(header, dict) or not isinstance(claims, dict):
            reason = "IDX12729: Unable to decode the token (header or payload is not an object)"
            raise TokenRejected(reason)
        alg = header.get("alg")
        if alg == "none" or not signature:
            reason = f"IDX10504: Unable to validate signature, token does not have a signature (alg {alg!r})"
            raise TokenRejected(reason)
        if alg != "RS256":
            reason = f"IDX10511: Signature validation failed: alg {alg!r} is not RS256"
            raise TokenRejected(reason)
        tenant = self.tenants.get(str(claims.get("tid")))
        if tenant is None:
            reason = (
                f"IDX10205: Issuer validation failed. Issuer: '{claims.get('iss')}': tenant "
                f"{claims.get('tid')} is not onboarded to this site"
            )
            raise TokenRejected(reason)
        kid = header.get("kid")
        key = tenant.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            reason = f"IDX10501: Signature validation failed. Unable to match key: kid: '{kid}'"
            raise TokenRejected(reason)
        try:
            key.public_key().verify(
                signature,
                jwt.signed,
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature as exc:
            reason = f"IDX10511: Signature validation failed. Keys tried: kid '{kid}'"
            raise TokenRejected(reason) from exc
        if claims.get("iss") != tenant.issuer:
            reason = (
                f"IDX10205: Issuer validation failed. Issuer: '{claims.get('iss')}'. "
                f"Did not match: '{tenant.issuer}'"
            )
            raise TokenRejected(reason)
        if claims.get("aud") != AAD_RESOURCE:
            reason = (
                f"IDX10214: Audience validation failed. Audiences: '{claims.get('aud')}'. "
                f"Did not match: validationParameters.ValidAudience: '{AAD_RESOURCE}'"
            )
            raise TokenRejected(reason)
        now = self.clock.now().timestamp()
        skew = AAD_CLOCK_SKEW.total_seconds()
        nbf, exp = _numeric_date(claims, "nbf", None), _numeric_date(claims, "exp", None)
        if now + skew < nbf:
            reason = "IDX10222: Lifetime validation failed. The token is not yet valid."
            raise TokenRejected(reason)
        if now - skew >= exp:
            reason = "IDX10223: Lifetime validation failed. The token is expired."
            raise TokenRejected(reason)
        if tenant.tenant_id in self.disabled:
            reason = f"tenant {tenant.tenant_id} is disabled for this site"
            raise TokenRejected(reason)
        if not claims.get("deviceid"):
            reason = "not a device token (no deviceid claim)"
            raise TokenRejected(reason)
        return claims
