"""The client-facing URL surface of a CMG (protocol.md sections 1.3 and 1.6).

Only these paths are published; the gateway refuses everything else before any processing,
as the real CMG's URL filtering does.
"""

from __future__ import annotations

import re
from urllib.parse import quote, urlencode

__all__ = [
    "CCM_METHOD",
    "MANIFEST_PATH",
    "TOKEN_SIGNATURE_HEADER",
    "Endpoint",
    "classify",
    "manifest_url",
    "token_auth_path",
]

CCM_METHOD = "CCM_POST"
MANIFEST_PATH = "/downloadrestservice.svc/getcontentxmlsecure"
#: Where the content access token's signature travels (not public; emulation design).
TOKEN_SIGNATURE_HEADER = "X-Cmg-Token-Signature"

# fullmatch and ASCII digits: "$" alone would accept a trailing newline, "\d" any Unicode digit.
_TOKEN_AUTH = re.compile(
    r"/CCM_Proxy_ServerAuth/(?P<role>[0-9]+)/ccm_system_tokenauth/request", re.IGNORECASE
)


class Endpoint:
    """Names used in the request log and in scenario expectations."""

    LOCATION = "location"
    MANIFEST = "manifest"


def token_auth_path(role_id: str) -> str:
    return f"/CCM_Proxy_ServerAuth/{role_id}/ccm_system_tokenauth/request"


def manifest_url(base_url: str, package_id: str, content_id: str) -> str:
    """The cloud location record's URL, before the client appends its token parameters."""
    query = urlencode({"pid": package_id, "cid": content_id}, quote_via=quote)
    return f"{base_url.rstrip('/')}{MANIFEST_PATH}?{query}"


def classify(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    """Map a request to a published endpoint and its path parameters, or ``None`` if unpublished."""
    if method == CCM_METHOD:
        match = _TOKEN_AUTH.fullmatch(path)
        if match:
            return Endpoint.LOCATION, {"role_id": match["role"]}
        return None
    if method == "GET" and path.lower() == MANIFEST_PATH.lower():
        return Endpoint.MANIFEST, {}
    return None
