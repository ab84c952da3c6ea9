"""The switches of the feature, in one place: CMG, client settings and deployment options.

Scenario files set them; the gateway and the client engine read them. Defaults are the product's
defaults where public (protocol.md section 4).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ClientSettings", "CmgSettings", "DeploymentSettings", "DownloadMode", "LaunchContext"]


class DownloadMode:
    """Deployment › Distribution Points: how the task sequence gets its content."""

    ON_DEMAND = "on_demand"  # "Download content locally when needed by the running task sequence"
    ALL_BEFORE_START = "all_before_start"  # "Download all content locally before starting ..."
    ALL = (ON_DEMAND, ALL_BEFORE_START)


class LaunchContext:
    SOFTWARE_CENTER = "software_center"
    ALL = (SOFTWARE_CENTER,)


@dataclass(frozen=True)
class CmgSettings:
    """CMG properties › Settings."""

    #: "Allow CMG to function as a cloud distribution point and serve content from Azure storage".
    content_enabled: bool = True


@dataclass(frozen=True)
class ClientSettings:
    """Client settings › Cloud Services."""

    #: "Enable clients to use a cloud management gateway".
    enable_cmg: bool = True
    #: "Allow access to cloud distribution point" (default Yes, per S49).
    allow_cloud_dp: bool = True


@dataclass(frozen=True)
class DeploymentSettings:
    """The task sequence deployment's options."""

    #: User Experience: "Allow task sequence to run for client on the Internet".
    allow_internet: bool = True
    download_mode: str = DownloadMode.ON_DEMAND
