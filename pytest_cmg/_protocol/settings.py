"""The switches of the feature, in one place: CMG, client settings and deployment options.

Scenario files set them; the gateway and the client engine read them. Defaults are the product's
defaults where public (protocol.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "INTERNET_TS_SINCE",
    "ON_DEMAND_FROM_CLOUD_SINCE",
    "SITE_VERSIONS",
    "ClientSettings",
    "CmgSettings",
    "DeploymentSettings",
    "DownloadMode",
    "LaunchContext",
]


class DownloadMode:
    """Deployment › Distribution Points: how the task sequence gets its content."""

    ON_DEMAND = "on_demand"  # "Download content locally when needed by the running task sequence"
    ALL_BEFORE_START = "all_before_start"  # "Download all content locally before starting ..."
    ALL = (ON_DEMAND, ALL_BEFORE_START)


class LaunchContext:
    SOFTWARE_CENTER = "software_center"
    ALL = (SOFTWARE_CENTER,)


#: Site versions with a gate in this feature (protocol.md section 0).
INTERNET_TS_SINCE = 1802  # a task sequence may run over a CMG, with "download all" only
ON_DEMAND_FROM_CLOUD_SINCE = 1910  # the TS engine may fetch on demand from a cloud source
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
    site_version: int = 2107
    #: 14-day outbound data transfer alert threshold in GB (default 10,000); critical at 90 %.
    egress_threshold_gb: float = 10_000.0
    #: "Stop this service when the critical threshold is exceeded".
    stop_when_critical: bool = False


@dataclass(frozen=True)
class ClientSettings:
    """Client settings › Cloud Services."""

    #: "Enable clients to use a cloud management gateway" (default Yes). With No, an internet
    #: client has no management point to ask, so no content location can be found.
    enable_cmg: bool = True
    #: "Allow access to cloud distribution point" (default Yes, per S49).
    allow_cloud_dp: bool = True


@dataclass(frozen=True)
class DeploymentSettings:
    """The task sequence deployment's options."""

    #: User Experience: "Allow task sequence to run for client on the Internet".
    allow_internet: bool = True
    download_mode: str = DownloadMode.ON_DEMAND
