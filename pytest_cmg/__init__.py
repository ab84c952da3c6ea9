"""pytest-cmg: a test harness for ConfigMgr task sequence download on demand over a CMG.

The public API is exactly ``__all__`` (checked by ``tests/test_public_api.py``); everything else
lives in private modules and may change. Names are imported on first use: pytest imports this
package for the plugin in every session, and the parts (azure-storage-blob, cryptography,
faker) would otherwise add ~0.5 s to every ``pytest`` run, even one that never uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AZURITE_VERSION",
    "AzuriteProcess",
    "BlobEndpoint",
    "CMGClient",
    "CMGConnection",
    "CacheEntry",
    "ClientCache",
    "ClientSettings",
    "CloudDP",
    "CmgSettings",
    "CmgSite",
    "ContentDestination",
    "ContentError",
    "ContentManifest",
    "ContentProvider",
    "DeploymentSettings",
    "DownloadCore",
    "DownloadMode",
    "DownloadStats",
    "ExpectationFailed",
    "ExternalStorage",
    "FakeCMG",
    "FakeClock",
    "GatewayError",
    "Harness",
    "LoggedRequest",
    "ManifestFile",
    "PackageSource",
    "PackageTransfer",
    "ProgramProvider",
    "ProviderLocation",
    "ProviderRequest",
    "ProviderToken",
    "ProvisioningError",
    "PytestCmgError",
    "RequestLog",
    "Scenario",
    "ScenarioError",
    "ScenarioProblem",
    "ServiceStartError",
    "SiteRequest",
    "SiteResponse",
    "SmstsLog",
    "Step",
    "SystemClock",
    "TaskSequence",
    "TaskSequenceCache",
    "TaskSequenceEngine",
    "TaskSequenceResult",
    "load_scenario",
    "load_scenarios",
]

_HOMES = {
    "AZURITE_VERSION": "._storage.azurite",
    "AzuriteProcess": "._storage.azurite",
    "BlobEndpoint": "._storage.azurite",
    "CMGClient": "._client.engine",
    "CMGConnection": "._client.engine",
    "CacheEntry": "._client.cache",
    "ClientCache": "._client.cache",
    "ClientSettings": "._protocol.settings",
    "CloudDP": "._storage.clouddp",
    "CmgSettings": "._protocol.settings",
    "CmgSite": "._gateway.site",
    "ContentDestination": "._client.engine",
    "ContentError": "._errors",
    "ContentManifest": "._protocol.manifest",
    "ContentProvider": "._client.acp",
    "DeploymentSettings": "._protocol.settings",
    "DownloadCore": "._client.download",
    "DownloadMode": "._protocol.settings",
    "DownloadStats": "._client.download",
    "ExpectationFailed": "._errors",
    "ExternalStorage": "._storage.azurite",
    "FakeCMG": "._gateway.server",
    "FakeClock": "._protocol.clock",
    "GatewayError": "._errors",
    "Harness": "._harness",
    "LoggedRequest": "._gateway.requestlog",
    "ManifestFile": "._protocol.manifest",
    "PackageSource": "._storage.clouddp",
    "PackageTransfer": "._client.engine",
    "ProgramProvider": "._client.acp",
    "ProviderLocation": "._client.acp",
    "ProviderRequest": "._client.acp",
    "ProviderToken": "._client.acp",
    "ProvisioningError": "._errors",
    "PytestCmgError": "._errors",
    "RequestLog": "._gateway.requestlog",
    "Scenario": "._scenario.model",
    "ScenarioError": "._errors",
    "ScenarioProblem": "._errors",
    "ServiceStartError": "._errors",
    "SiteRequest": "._gateway.site",
    "SiteResponse": "._gateway.site",
    "SmstsLog": "._client.log",
    "Step": "._client.engine",
    "SystemClock": "._protocol.clock",
    "TaskSequence": "._client.engine",
    "TaskSequenceCache": "._client.tscache",
    "TaskSequenceEngine": "._client.engine",
    "TaskSequenceResult": "._client.engine",
    "load_scenario": "._scenario.model",
    "load_scenarios": "._scenario.model",
}

if TYPE_CHECKING:
    from ._client.acp import (
        ContentProvider,
        ProgramProvider,
        ProviderLocation,
        ProviderRequest,
        ProviderToken,
    )
    from ._client.cache import CacheEntry, ClientCache
    from ._client.download import DownloadCore, DownloadStats
    from ._client.engine import (
        CMGClient,
        CMGConnection,
        ContentDestination,
        PackageTransfer,
        Step,
        TaskSequence,
        TaskSequenceEngine,
        TaskSequenceResult,
    )
    from ._client.log import SmstsLog
    from ._client.tscache import TaskSequenceCache
    from ._errors import (
        ContentError,
        ExpectationFailed,
        GatewayError,
        ProvisioningError,
        PytestCmgError,
        ScenarioError,
        ScenarioProblem,
        ServiceStartError,
    )
    from ._gateway.requestlog import LoggedRequest, RequestLog
    from ._gateway.server import FakeCMG
    from ._gateway.site import CmgSite, SiteRequest, SiteResponse
    from ._harness import Harness
    from ._protocol.clock import FakeClock, SystemClock
    from ._protocol.manifest import ContentManifest, ManifestFile
    from ._protocol.settings import ClientSettings, CmgSettings, DeploymentSettings, DownloadMode
    from ._scenario.model import Scenario, load_scenario, load_scenarios
    from ._storage.azurite import AZURITE_VERSION, AzuriteProcess, BlobEndpoint, ExternalStorage
    from ._storage.clouddp import CloudDP, PackageSource


def __getattr__(name: str) -> Any:  # noqa: ANN401 - any public object
    home = _HOMES.get(name)
    if home is None:
        msg = f"module 'pytest_cmg' has no attribute {name!r}"
        raise AttributeError(msg)
    value = getattr(importlib.import_module(home, __name__), name)
    # Tracebacks and reprs name the public home of each object, not its private module.
    if getattr(value, "__module__", "").startswith("pytest_cmg._"):
        value.__module__ = "pytest_cmg"
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
