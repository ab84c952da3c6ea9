"""What the site publishes to anyone: ServiceMetadata, .sms_aut and AADAuthInfo.

No client authentication is asked for these documents (docs/emulation.md, "ServiceMetadata and
.sms_aut" and "Azure AD client authentication").
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from .exchange import Refusal
from .tokens import AAD_RESOURCE

if TYPE_CHECKING:
    from .site import CmgSite

__all__ = ["aad_auth_info", "metadata_xml", "sms_aut"]


def aad_auth_info(site: CmgSite, query: dict[str, str]) -> str:
    """``AADAuthInfo?TenantID=``: the Azure AD properties ccmsetup needs, for an onboarded,
    enabled tenant only: otherwise "the CMG doesn't give the required properties"
    (docs/emulation.md, "Azure AD client authentication")."""
    tenant_id = next((v for k, v in query.items() if k.lower() == "tenantid"), "")
    if not tenant_id:
        raise Refusal(400, "Bad Request", "AADAuthInfo without TenantID")
    tenant = site.azure_ad.auth_info(tenant_id)
    if tenant is None:
        raise Refusal(
            404, "Not Found", f"tenant {tenant_id[:64]!r} is not onboarded or is disabled"
        )
    root = ET.Element(
        "AADAuthInfo",
        TenantID=tenant.tenant_id,
        AADCLIENTAPPID=tenant.client_app_id,
        AADRESOURCEURI=AAD_RESOURCE,
        AADAuthority=f"https://login.microsoftonline.com/{tenant.tenant_id}",
    )
    return ET.tostring(root, encoding="unicode")


def metadata_xml(site: CmgSite) -> str:
    """``ServiceMetadata``: the site and the management point published through the CMG."""
    root = ET.Element(
        "ServiceMetadata",
        SiteCode=site.site_code,
        SiteVersion=str(site.settings.site_version),
        ContentEnabled="1" if site.settings.content_enabled else "0",
    )
    ET.SubElement(
        root,
        "ManagementPoint",
        RoleId=site.role_id,
        MutualAuthPath=f"{site.hostname}/CCM_Proxy_MutualAuth/{site.role_id}",
        ServerAuthPath=f"{site.hostname}/CCM_Proxy_ServerAuth/{site.role_id}",
    )
    return ET.tostring(root, encoding="unicode")


def sms_aut(site: CmgSite, query: dict[str, str]) -> str:
    """``.sms_aut?MPLIST`` (the MP list) or ``?SITESIGNCERT`` (the site's signing certificate)."""
    if "MPLIST" in query or "MPLIST2" in query:
        root = ET.Element("MPList")
        mp = ET.SubElement(
            root,
            "MP",
            Name=f"{site.hostname}/CCM_Proxy_MutualAuth/{site.role_id}",
            FQDN=site.hostname,
        )
        ET.SubElement(mp, "Version").text = str(site.settings.site_version)
        caps = ET.SubElement(mp, "Capabilities", SchemaVersion="1.0")
        ET.SubElement(caps, "Property", Name="SSLState", Value="63")
        return ET.tostring(root, encoding="unicode")
    if "SITESIGNCERT" in query:
        return site.authority.signing_certificate_der().hex().upper()
    raise Refusal(404, "Not Found", "unknown .sms_aut query")
