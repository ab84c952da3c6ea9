"""Where content is: what MP_LocationManager answers through the CMG.

A location request (a CCM message) is answered with the on-premises DPs that hold the content
version and the cloud source with a fresh content access token, cloud last unless the boundary
group prefers cloud sources; the site-version gates decide whether a cloud source is offered
at all. docs/emulation.md, "Cloud location record", "On-premises sources and record order" and
"Site-version gates (all of them)".
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from .._protocol.ccm import (
    CCM_CONTENT_TYPE,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from .._protocol.location import (
    ContentLocationReply,
    ContentLocationRequest,
    LocationRecord,
    is_content_id,
)
from .._protocol.paths import manifest_url
from .._protocol.settings import INTERNET_TS_SINCE, ON_DEMAND_FROM_CLOUD_SINCE, DownloadMode
from .exchange import Refusal

if TYPE_CHECKING:
    from .faults import GatewayFault
    from .site import CmgSite

__all__ = ["answer", "locate", "no_cloud_reason"]


def no_cloud_reason(site: CmgSite, request: ContentLocationRequest) -> str:
    """Why the cloud source is not offered for ``request`` (empty: it is)."""
    if not is_content_id(request.package_id):
        return "not a valid package ID"
    version = site.settings.site_version
    if version < INTERNET_TS_SINCE:
        return f"site version {version} predates task sequences over a CMG ({INTERNET_TS_SINCE})"
    if version < ON_DEMAND_FROM_CLOUD_SINCE and (
        site.deployment.download_mode == DownloadMode.ON_DEMAND
    ):
        return (
            f"site version {version}: cloud sources are not offered to a task sequence "
            "deployed with 'Download content locally when needed' before "
            f"{ON_DEMAND_FROM_CLOUD_SINCE}"
        )
    if not site.settings.content_enabled and not site.settings.classic_cloud_dp:
        return "CMG does not serve content from Azure storage"
    if not request.use_azure:
        return "client does not allow cloud sources (UseAzure=0)"
    if site.cloud_dp is None:
        return "no cloud DP attached"
    return ""


def locate(site: CmgSite, request: ContentLocationRequest, client_id: str) -> ContentLocationReply:
    """What MP_LocationManager answers through this CMG.

    Every on-prem DP holding the content version is listed (the emulated MP does not filter
    by the client's network; the internet client skips what it cannot reach), then the cloud
    source: last, as content source priority puts it, or first when the boundary group
    prefers cloud sources. No source at all is the empty FALLBACK reply.
    """
    package_id, version = request.package_id, request.version
    where = f"{package_id}:{version}"
    on_prem = [
        dp for dp in site.on_prem_dps if is_content_id(package_id) and dp.holds(package_id, version)
    ]
    why_not = no_cloud_reason(site, request)
    manifest = None
    if not why_not:
        assert site.cloud_dp is not None
        manifest = site.cloud_dp.manifest(package_id, version)
        if manifest is None:
            why_not = "content version is not on the cloud DP"
    if manifest is None and not on_prem:
        site.service_log(f"No content location for {where}: {why_not}")
        return ContentLocationReply(site_code=site.site_code)
    records = [dp.record_for(package_id, version) for dp in on_prem]
    if manifest is None:
        site.service_log(f"No cloud location for {where}: {why_not}")
        package_hash = on_prem[0].content[(package_id, version)]
    else:
        package_hash = manifest.hash
        host = site.content_hostname
        token = site.authority.issue_access_token(package_id, package_id, client_id, host)
        site.keep_secret(token.signature)
        cloud = LocationRecord(
            url=manifest_url(site.url, package_id, package_id),
            server_remote_name=host,
            dp_type="CLOUD",
            locality="REMOTE",
            version=version,
            access_token=token,
        )
        if site.settings.prefer_cloud_sources:
            records.insert(0, cloud)
        else:
            records.append(cloud)
    sources = ", ".join(f"{r.server_remote_name} ({r.dp_type} {r.locality})" for r in records)
    kind = "cloud DP " + site.content_hostname if len(records) == 1 and manifest else sources
    site.service_log(f"Content location for {where}: {kind}")
    return ContentLocationReply(
        site_code=site.site_code, package_hash=package_hash, records=tuple(records)
    )


def answer(
    site: CmgSite,
    body: bytes,
    client_id: str,
    entry: dict[str, Any],
    faults: list[GatewayFault] | None = None,
) -> tuple[bytes, str]:
    """A location request (a CCM message to MP_LocationManager) answered with its reply."""
    try:
        message = decode_message(body)
    except EnvelopeError as exc:
        raise Refusal(400, "Bad Request", f"CCM message: {exc}") from exc
    if message.target_endpoint != "MP_LocationManager":
        raise Refusal(400, "Bad Request", f"endpoint {message.target_endpoint!r} is not served")
    try:
        request = ContentLocationRequest.from_xml(message.body)
    except ValueError as exc:
        raise Refusal(400, "Bad Request", f"ContentLocationRequest: {exc}") from exc
    entry["package_id"] = request.package_id
    reply = site.locate(request, client_id)
    if any(f.package_hash == "wrong" for f in faults or ()) and reply.package_hash:
        # Only the reply's hash changes: the manifest (files and their hashes) stays true to
        # the bytes, so the one thing wrong is the trust anchor the client must check.
        true_hash = reply.package_hash
        wrong = ("0" if true_hash[0] != "0" else "1") + true_hash[1:]
        reply = replace(reply, package_hash=wrong)
        entry["detail"] = f"scripted package hash {wrong} (the content's is {true_hash})"
    answer = CcmMessage(
        body=reply.to_xml(),
        target_endpoint="LS_ReplyLocations",
        reply_to="direct:mp:MP_LocationManager",
        source_host="mp",
    )
    return encode_message(answer), CCM_CONTENT_TYPE
