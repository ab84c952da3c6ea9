"""Who a request comes from: the site's client-authentication decisions.

Mutual TLS (a certificate the handshake verified, then the site's certificate trust list and
CRL check), a site-signed CCM token, or an Azure AD device token of an onboarded tenant on the
ServerAuth paths; and at CCM_STS, whom a token is issued to (a bulk registration token or an
Azure AD device token registers a new client, nothing else does). docs/emulation.md, "CCM_STS",
"Mutual TLS" and "Azure AD client authentication".
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cryptography import x509

from .._protocol.location import is_content_id
from .._protocol.paths import Auth, Endpoint
from .._protocol.settings import SITE_TOKEN_AUTH_SINCE
from .exchange import Refusal
from .tokens import BULK_REGISTRATION, INVALID_TOKEN, TokenRejected, is_azure_ad_token

if TYPE_CHECKING:
    from .._protocol.paths import Route
    from .exchange import SiteRequest
    from .site import CmgSite
    from .tls import CertificateRefusal

__all__ = [
    "authenticate",
    "authenticate_aad",
    "certificate_refusal",
    "common_name",
    "registering",
    "registering_aad",
]


def authenticate(site: CmgSite, route: Route, request: SiteRequest, entry: dict[str, Any]) -> str:
    """The client a request authenticates as (recorded in ``entry``), or a :class:`Refusal`."""
    if route.auth == Auth.CERTIFICATE:
        if not request.peer_certificate:
            raise Refusal(
                403, "Client certificate required", "mutual-auth path without a certificate"
            )
        client_id = common_name(request.peer_certificate)
        entry.update(auth=Auth.CERTIFICATE, client_id=client_id)
        return client_id
    auth = request.header("Authorization")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Refusal(401, INVALID_TOKEN, "no bearer token")
    if is_azure_ad_token(token.strip()):
        return authenticate_aad(site, route, token.strip(), entry)
    try:
        claims = site.authority.verify_ccm_token(
            token.strip(), for_registration=route.endpoint == Endpoint.STS
        )
    except TokenRejected as exc:
        raise Refusal(401, INVALID_TOKEN, exc.reason) from exc
    client_id = str(claims.get("UniqueId", ""))
    if claims.get("Type") == BULK_REGISTRATION:
        version = site.settings.site_version
        if version < SITE_TOKEN_AUTH_SINCE:
            raise Refusal(
                401,
                INVALID_TOKEN,
                f"site version {version} predates token-based authentication "
                f"({SITE_TOKEN_AUTH_SINCE})",
            )
        entry["_bulk"] = True
    entry.update(auth=Auth.TOKEN, client_id=client_id)
    return client_id


def authenticate_aad(site: CmgSite, route: Route, token: str, entry: dict[str, Any]) -> str:
    """An Azure AD device token: the registered client of the device (empty at CCM_STS if new)."""
    try:
        claims = site.azure_ad.verify(token)
    except TokenRejected as exc:
        raise Refusal(401, INVALID_TOKEN, f"Azure AD token: {exc.reason}") from exc
    tenant_id, device_id = str(claims["tid"]), str(claims["deviceid"])
    site.service_log(
        f"Validated AAD token. TokenType: Device TenantId: {tenant_id} DeviceId: {device_id}"
    )
    client_id = site.azure_ad.client_of(claims) or ""
    if not client_id and route.endpoint != Endpoint.STS:
        raise Refusal(
            401, INVALID_TOKEN, f"Azure AD device {device_id} is not registered with the site"
        )
    entry.update(auth=Auth.AZURE_AD, client_id=client_id, _aad=(tenant_id, device_id))
    return client_id


def registering(site: CmgSite, client_id: str, body: bytes, entry: dict[str, Any]) -> str:
    """Whom CCM_STS issues a token to.

    Only a bulk registration token registers a *new* client, named in the body (emulation
    design). A client authenticated by certificate or client token gets a token for itself,
    never for an identity it names: that would let any client impersonate any other.
    """
    requested = body.decode("utf-8", "replace").strip()
    if "_aad" in entry:
        return registering_aad(site, client_id, requested, entry["_aad"])
    if entry.get("_bulk"):
        if not requested:
            raise Refusal(400, "Bad Request", "registration without a client ID in the body")
        return requested
    if requested and requested != client_id:
        raise Refusal(403, "Forbidden", f"{client_id} asked for a token for {requested}")
    return client_id


def registering_aad(site: CmgSite, client_id: str, requested: str, device: tuple[str, str]) -> str:
    """CCM_STS with an Azure AD device token: the device's client, registered if new.

    A device the site knows gets a token for its own client only. An unknown device
    registers as the SMSID in the body ("Registering device using AAD auth"), unless another
    device already registered as that client (no taking over someone else's identity).
    """
    tenant_id, device_id = device
    if client_id:
        if requested and requested != client_id:
            raise Refusal(403, "Forbidden", f"{client_id} asked for a token for {requested}")
        return client_id
    if not requested or not is_content_id(requested):
        raise Refusal(400, "Bad Request", "registration without a valid client ID in the body")
    if requested in site.azure_ad.devices.values():
        raise Refusal(403, "Forbidden", f"{requested} is registered to another device")
    site.azure_ad.register_device(tenant_id, device_id, requested)
    site.service_log(
        f"Registering device using AAD auth: DeviceId='{device_id}', TenantId='{tenant_id}'"
    )
    return requested


def certificate_refusal(site: CmgSite, request: SiteRequest) -> CertificateRefusal | None:
    """The CTL and revocation checks, for a connection that presented a certificate."""
    settings = site.settings
    if not settings.certificate_trust_list and not settings.crl_check:
        return None
    if not request.peer_certificate:
        return None
    return site.tls.refusal(
        request.peer_certificate,
        trust_list=settings.certificate_trust_list,
        crl_check=settings.crl_check,
    )


def common_name(der: bytes) -> str:
    """The subject CN of a DER certificate (the client identity on the mutual-auth paths)."""
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
