"""The client-facing URL surface of a CMG (docs/emulation.md, Product reference: "CCM messages and
the content location" and "One on-demand download").

Only these paths are published; the gateway refuses everything else before any processing,
as the real CMG's URL filtering does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, urlencode

__all__ = [
    "CCM_METHOD",
    "MANIFEST_PATH",
    "TOKEN_SIGNATURE_HEADER",
    "Auth",
    "Endpoint",
    "Route",
    "aad_auth_info_path",
    "classify",
    "manifest_url",
    "mutual_auth_path",
    "sts_path",
    "token_auth_path",
]

CCM_METHOD = "CCM_POST"
MANIFEST_PATH = "/downloadrestservice.svc/getcontentxmlsecure"
#: Where the content access token's signature travels (not public; emulation design).
TOKEN_SIGNATURE_HEADER = "X-Cmg-Token-Signature"


class Endpoint:
    """Names used in the request log and in scenario expectations."""

    LOCATION = "location"  # MP_LocationManager through either proxy path
    MANIFEST = "manifest"  # downloadrestservice.svc/getcontentxmlsecure
    STS = "sts"  # CCM_STS: CCM token issuance
    METADATA = "metadata"  # ServiceMetadata
    MP_AUTH = "sms_aut"  # SMS_MP/.sms_aut?MPLIST | MPLIST2 | SITESIGNCERT
    AAD_INFO = "aad_info"  # CCM_Proxy_ServerAuth/AADAuthInfo?TenantID=<guid>
    ALL = (LOCATION, MANIFEST, STS, METADATA, MP_AUTH, AAD_INFO)


class Auth:
    """How a path authenticates its client."""

    TOKEN = "token"  # CCM_Proxy_ServerAuth: server-authenticated TLS + a site-signed token
    CERTIFICATE = "certificate"  # CCM_Proxy_MutualAuth: mutual TLS with a PKI client certificate
    #: CCM_Proxy_ServerAuth with an Azure AD device token instead of a CCM token (request log).
    AZURE_AD = "azure_ad"
    NONE = "none"


@dataclass(frozen=True)
class Route:
    endpoint: str
    auth: str
    role_id: str | None = None


# fullmatch with [0-9]: "$" alone would accept a trailing newline, "\d" any Unicode digit.
_ROUTES: tuple[tuple[str, re.Pattern[str], str, str], ...] = tuple(
    (method, re.compile(pattern, re.IGNORECASE), endpoint, auth)
    for method, pattern, endpoint, auth in (
        (
            CCM_METHOD,
            r"/CCM_Proxy_ServerAuth/(?P<role>[0-9]+)/ccm_system_tokenauth/request",
            Endpoint.LOCATION,
            Auth.TOKEN,
        ),
        (
            CCM_METHOD,
            r"/CCM_Proxy_MutualAuth/(?P<role>[0-9]+)/ccm_system/request",
            Endpoint.LOCATION,
            Auth.CERTIFICATE,
        ),
        ("POST", r"/CCM_Proxy_ServerAuth/(?P<role>[0-9]+)/CCM_STS", Endpoint.STS, Auth.TOKEN),
        ("POST", r"/CCM_Proxy_MutualAuth/(?P<role>[0-9]+)/CCM_STS", Endpoint.STS, Auth.CERTIFICATE),
        ("GET", r"/CCM_Proxy_ServerAuth/ServiceMetadata", Endpoint.METADATA, Auth.NONE),
        ("GET", r"/CCM_Proxy_ServerAuth/AADAuthInfo", Endpoint.AAD_INFO, Auth.NONE),
        ("GET", r"/CCM_Proxy_MutualAuth/ServiceMetadata", Endpoint.METADATA, Auth.NONE),
        (
            "GET",
            r"/CCM_Proxy_MutualAuth/(?P<role>[0-9]+)/SMS_MP/\.sms_aut",
            Endpoint.MP_AUTH,
            Auth.NONE,
        ),
        ("GET", re.escape(MANIFEST_PATH), Endpoint.MANIFEST, Auth.NONE),
    )
)


def token_auth_path(role_id: str) -> str:
    return f"/CCM_Proxy_ServerAuth/{role_id}/ccm_system_tokenauth/request"


def mutual_auth_path(role_id: str) -> str:
    return f"/CCM_Proxy_MutualAuth/{role_id}/ccm_system/request"


def sts_path(role_id: str, *, mutual: bool = False) -> str:
    """CCM_STS, where a client exchanges an Azure AD or registration token for a CCM token."""
    proxy = "CCM_Proxy_MutualAuth" if mutual else "CCM_Proxy_ServerAuth"
    return f"/{proxy}/{role_id}/CCM_STS"


def aad_auth_info_path(tenant_id: str) -> str:
    """Where ccmsetup asks the CMG for the Azure AD properties of its tenant (Microsoft Learn:
    Install and assign clients using Azure AD for authentication)."""
    return f"/CCM_Proxy_ServerAuth/AADAuthInfo?{urlencode({'TenantID': tenant_id})}"


def manifest_url(base_url: str, package_id: str, content_id: str) -> str:
    """The cloud location record's URL, before the client appends its token parameters."""
    query = urlencode({"pid": package_id, "cid": content_id}, quote_via=quote)
    return f"{base_url.rstrip('/')}{MANIFEST_PATH}?{query}"


def classify(method: str, path: str) -> Route | None:
    """Map a request to a published endpoint, or ``None`` if it is not published."""
    for route_method, pattern, endpoint, auth in _ROUTES:
        if method != route_method:
            continue
        match = pattern.fullmatch(path)
        if match:
            return Route(endpoint, auth, match.groupdict().get("role"))
    return None
