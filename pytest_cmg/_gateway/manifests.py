"""The manifest call: a content manifest with fresh per-file SAS URLs, for a valid access token.

The token's fields and signature are checked, the newest content version on the cloud DP is
signed for ``min(token end, now + sas_lifetime)`` with its start back-dated for clock skew, the
SAS signatures are remembered as secrets no client log may hold, and egress is accounted.
docs/emulation.md, "Content access token", "Which version the manifest serves" and "SAS URLs".
"""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit

from .._protocol.location import SHA256_RSA_OID, ManifestQuery
from .._protocol.paths import TOKEN_SIGNATURE_HEADER
from .exchange import Refusal
from .tokens import INVALID_TOKEN, TokenRejected

if TYPE_CHECKING:
    from .faults import GatewayFault
    from .site import CmgSite

__all__ = ["SAS_CLOCK_SKEW", "manifest_xml"]

#: SAS start is back-dated so a client whose clock runs behind is not refused (docs/reliability.md row 22).
SAS_CLOCK_SKEW = timedelta(minutes=15)
#: A SAS URL's signature parameter, as its query carries it.
_SAS_SIGNATURE = re.compile(r"(?:^|&)sig=([^&]+)")


def manifest_xml(
    site: CmgSite, query: str, signature: str, faults: list[GatewayFault] | None = None
) -> str:
    """The content manifest with fresh SAS URLs, or a :class:`Refusal`."""
    faults = faults or []
    try:
        params = ManifestQuery.parse(query)
    except ValueError as exc:
        raise Refusal(400, "Bad Request", str(exc)) from exc
    if not signature:
        raise Refusal(401, INVALID_TOKEN, f"no {TOKEN_SIGNATURE_HEADER} header")
    if params.alg != SHA256_RSA_OID:
        # The signature covers the other fields; alg names how to check it, and the
        # emulated site signs with one algorithm only (docs/emulation.md, manifest call).
        raise Refusal(
            401, INVALID_TOKEN, f"access token alg {params.alg[:64]!r} is not {SHA256_RSA_OID}"
        )
    try:
        token_end = site.authority.verify_access(
            params.pid, params.cid, params.tid, params.iss, params.st, params.et, signature
        )
    except TokenRejected as exc:
        raise Refusal(401, INVALID_TOKEN, exc.reason) from exc
    package_id = params.pid
    serves_content = site.settings.content_enabled or site.settings.classic_cloud_dp
    if not serves_content or site.cloud_dp is None:
        raise Refusal(404, "Not Found", "CMG does not serve content from Azure storage")
    versions = site.cloud_dp.versions(package_id)
    manifest = site.cloud_dp.manifest(package_id, versions[-1]) if versions else None
    if manifest is None:
        raise Refusal(404, "Not Found", f"{package_id} is not on the cloud DP")
    # In UTC whatever zone the clock reports in: the service log's "...Z" must be the
    # instant the SAS carries, not the clock's wall-clock digits.
    now = site.clock.now().astimezone(UTC)
    expiry = min(token_end.astimezone(UTC), now + site.sas_lifetime)
    for fault in faults:
        if fault.sas_ttl is not None:
            expiry = now + timedelta(seconds=fault.sas_ttl)
    start = now - SAS_CLOCK_SKEW
    signed = site.cloud_dp.signed_manifest(manifest, start=start, expiry=expiry)
    urls = {f.relpath: f.url for f in signed.files}
    for url in urls.values():
        for raw in _SAS_SIGNATURE.findall(urlsplit(url).query):
            # As this URL carries it (the storage SDK escapes '+' and '=' but not '/'),
            # decoded, and fully escaped: a log may hold any of them.
            value = unquote(raw)
            for form in {raw, value, quote(value, safe="")}:
                site.keep_secret(form)
    unmetered = site.meter_urls(manifest, urls)
    served = manifest.with_urls(urls)
    if any(f.wrong_hash for f in faults) and served.files:
        first = served.files[0]
        bad = replace(first, sha256=("0" if first.sha256[0] != "0" else "1") + first.sha256[1:])
        served = replace(served, files=(bad, *served.files[1:]))
    site.service_log(
        f"Issued manifest for {package_id}.{manifest.version}: {len(urls)} file(s), "
        f"SAS valid until {expiry:%Y-%m-%dT%H:%M:%SZ}"
    )
    site.account_egress(manifest.total_size, unmetered)
    return served.to_xml()
