"""The switches of the feature, in one place: CMG, client settings and deployment options.

Scenario files set them; the gateway and the client engine read them. Defaults are the product's
defaults where public (docs/emulation.md, Product reference: "Settings and task sequence
variables").
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from .._errors import InvalidValueError

__all__ = [
    "BOOT_IMAGE_OVER_CMG_SINCE",
    "BOOT_MEDIA_OVER_CMG_SINCE",
    "INTERNET_TS_SINCE",
    "NO_NEW_CLASSIC_CLOUD_DP_SINCE",
    "ON_DEMAND_FROM_CLOUD_SINCE",
    "SITE_TOKEN_AUTH_SINCE",
    "SITE_TOKEN_LIFETIME",
    "SITE_TOKEN_RENEWAL",
    "SITE_VERSIONS",
    "ClientSettings",
    "CmgSettings",
    "DeploymentSettings",
    "DownloadMode",
    "LaunchContext",
    "launch_refusal",
]


class DownloadMode:
    """Deployment › Distribution Points: how the task sequence gets its content."""

    ON_DEMAND = "on_demand"  # "Download content locally when needed by the running task sequence"
    ALL_BEFORE_START = "all_before_start"  # "Download all content locally before starting ..."
    ALL = (ON_DEMAND, ALL_BEFORE_START)


class LaunchContext:
    """Where the task sequence starts (docs/emulation.md, Product reference: "Versions and gates")."""

    SOFTWARE_CENTER = "software_center"
    BOOT_MEDIA = "boot_media"  # task sequence (boot) media, running in Windows PE
    PXE = "pxe"  # network boot into Windows PE
    ALL = (SOFTWARE_CENTER, BOOT_MEDIA, PXE)
    IN_WINDOWS_PE = (BOOT_MEDIA, PXE)


#: A task sequence with a boot image may start from Software Center over a CMG since 2006.
BOOT_IMAGE_OVER_CMG_SINCE = 2006
#: Boot media may be used over a CMG since 2010.
BOOT_MEDIA_OVER_CMG_SINCE = 2010


def launch_refusal(site_version: int, launch: str, *, boot_image: bool) -> str:
    """Why a task sequence cannot start over a CMG from ``launch`` on this site, or ``""``."""
    if launch == LaunchContext.PXE:
        return "PXE is not available over a cloud management gateway"
    if launch == LaunchContext.BOOT_MEDIA and site_version < BOOT_MEDIA_OVER_CMG_SINCE:
        return (
            f"boot media cannot be used over a cloud management gateway before "
            f"{BOOT_MEDIA_OVER_CMG_SINCE} (site version {site_version})"
        )
    if boot_image and site_version < BOOT_IMAGE_OVER_CMG_SINCE:
        return (
            f"a task sequence with a boot image cannot start over a cloud management gateway "
            f"before {BOOT_IMAGE_OVER_CMG_SINCE} (site version {site_version})"
        )
    return ""


#: Site versions with a gate in this feature (docs/emulation.md, Product reference: "Versions and
#: gates").
INTERNET_TS_SINCE = 1802  # a task sequence may run over a CMG, with "download all" only
ON_DEMAND_FROM_CLOUD_SINCE = 1910  # the TS engine may fetch on demand from a cloud source
#: Site-issued tokens (bulk registration, token-based client authentication) exist since 2002.
SITE_TOKEN_AUTH_SINCE = 2002
#: A site-issued client token is valid 90 days and the client renews it monthly over the CMG;
#: once it lapses, only an internal management point can give the client a new one (Microsoft
#: Learn: Token-based authentication for cloud management gateway). The issuing site and the
#: renewing client both read these.
SITE_TOKEN_LIFETIME = timedelta(days=90)
SITE_TOKEN_RENEWAL = timedelta(days=30)
#: No new classic cloud distribution point can be created from 2107: content-enabled CMGs only.
NO_NEW_CLASSIC_CLOUD_DP_SINCE = 2107
#: The newest version the emulation knows; the default site version.
CURRENT_SITE_VERSION = 2107
#: Released current-branch versions, for validating a scenario's site version.
SITE_VERSIONS = (
    1702,
    1706,
    1710,
    1802,
    1806,
    1810,
    1902,
    1906,
    1910,
    2002,
    2006,
    2010,
    2103,
    2107,
    2111,
    2203,
    2207,
    2211,
    2303,
    2309,
    2403,
    2409,
    2503,
)


@dataclass(frozen=True)
class CmgSettings:
    """CMG properties › Settings, and the site they belong to."""

    #: "Allow CMG to function as a cloud distribution point and serve content from Azure storage".
    content_enabled: bool = True
    #: The site's Configuration Manager version (YYMM), which gates the feature.
    site_version: int = CURRENT_SITE_VERSION
    #: 14-day outbound data transfer alert threshold in GB (default 10,000); critical at 90 %.
    egress_threshold_gb: float = 10_000.0
    #: "Stop this service when the critical threshold is exceeded".
    stop_when_critical: bool = False
    #: Boundary group option "Prefer cloud based sources over on-premises sources": the cloud
    #: record comes first in location replies instead of last.
    prefer_cloud_sources: bool = False
    #: Content comes from a classic cloud distribution point (its own service, not the CMG).
    #: Refused on a 2107 or later site, where no new classic cloud DP can be created.
    classic_cloud_dp: bool = False
    #: CMG setting "Verify client certificate revocation": a presented client certificate is
    #: checked against its issuer's CRL; a revoked one, or no reachable CRL, is refused.
    crl_check: bool = False
    #: The site's certificate trust list, as the subject CNs of the roots it lists. Empty: no
    #: CTL, every root uploaded to the CMG is accepted for client authentication.
    certificate_trust_list: tuple[str, ...] = ()
    #: Count egress from the bytes storage actually served for the gateway's SAS URLs (through
    #: a counting proxy) instead of the sizes of the manifests it issued.
    measure_egress: bool = False

    def __post_init__(self) -> None:
        if self.classic_cloud_dp and self.site_version >= NO_NEW_CLASSIC_CLOUD_DP_SINCE:
            msg = (
                f"a classic cloud distribution point cannot be created on a site of version "
                f"{self.site_version}: none can be created from {NO_NEW_CLASSIC_CLOUD_DP_SINCE} "
                "on; use a content-enabled CMG (classic_cloud_dp false) or a site version "
                f"before {NO_NEW_CLASSIC_CLOUD_DP_SINCE}"
            )
            raise InvalidValueError(msg)


@dataclass(frozen=True)
class ClientSettings:
    """Client settings › Cloud Services."""

    #: "Enable clients to use a cloud management gateway" (default Yes). With No, an internet
    #: client has no management point to ask, so no content location can be found.
    enable_cmg: bool = True
    #: "Allow access to cloud distribution point" (default Yes, as Microsoft Learn: Install
    #: cloud-based distribution points in Microsoft Azure says).
    allow_cloud_dp: bool = True


@dataclass(frozen=True)
class DeploymentSettings:
    """The task sequence deployment's options."""

    #: User Experience: "Allow task sequence to run for client on the Internet".
    allow_internet: bool = True
    download_mode: str = DownloadMode.ON_DEMAND
