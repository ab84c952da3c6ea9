"""pytest-cmg: a test harness for ConfigMgr task sequence download on demand over a CMG.

The public API is exactly ``__all__``: what a user constructs, receives from a fixture, a
result or a call, or catches. :data:`_API` below is its one list, each name with the private
module that defines it; ``__all__`` and the lazy imports both derive from it, and
``tests/test_public_api.py`` guards it. Everything else lives in private modules and may change.
The fault proxy's API (``storage_faults``) has its own public home, :mod:`pytest_cmg.faults`.

Names are imported on first use: pytest imports this package for the plugin in every session,
and the parts (azure-storage-blob, cryptography, faker) would otherwise add ~0.5 s to every
``pytest`` run, even one that never uses them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: The public API: name -> the private module that defines it (relative to this package).
_API: dict[str, str] = {
    "AZURITE_VERSION": "._storage.provision",
    "AccessToken": "._protocol.location",
    "AzureADTenant": "._gateway.tokens",
    "AzuriteProcess": "._storage.azurite",
    "BlobEndpoint": "._storage.endpoint",
    "CMGClient": "._client.cmg",
    "CMGConnection": "._client.cmg",
    "CacheEntry": "._client.cache",
    "CacheSpaceError": "._client.cache",
    "CheckFailed": "._errors",
    "ClientCache": "._client.cache",
    "ClientSettings": "._protocol.settings",
    "CloudDP": "._storage.clouddp",
    "CmgSettings": "._protocol.settings",
    "CmgSite": "._gateway.site",
    "Condition": "._client.sequence",
    "ContentDestination": "._client.sequence",
    "ContentError": "._errors",
    "ContentLocationReply": "._protocol.location",
    "ContentLocationRequest": "._protocol.location",
    "ContentManifest": "._protocol.manifest",
    "ContentProvider": "._client.acp",
    "Credentials": "._net.pki",
    "DeploymentSettings": "._protocol.settings",
    "DownloadCore": "._client.download",
    "DownloadMode": "._protocol.settings",
    "DownloadStats": "._client.download",
    "Eviction": "._client.cache",
    "ExpectationFailed": "._errors",
    "ExternalStorage": "._storage.azurite",
    "FakeCMG": "._gateway.server",
    "FakeClock": "._protocol.clock",
    "GatewayError": "._errors",
    "GatewayFault": "._gateway.faults",
    "Harness": "._harness",
    "InvalidValueError": "._errors",
    "Lease": "._client.cache",
    "LocationRecord": "._protocol.location",
    "LoggedRequest": "._gateway.requestlog",
    "ManifestFile": "._protocol.manifest",
    "NotFoundError": "._errors",
    "NotRunningError": "._errors",
    "OnPremDP": "._protocol.location",
    "PackageSource": "._storage.clouddp",
    "PackageTransfer": "._client.sequence",
    "ProgramProvider": "._client.acp",
    "ProviderLocation": "._client.acp",
    "ProviderRequest": "._client.acp",
    "ProviderRun": "._client.sequence",
    "ProviderToken": "._client.acp",
    "ProvisioningError": "._errors",
    "PytestCmgError": "._errors",
    "RequestLog": "._gateway.requestlog",
    "RetryPolicy": "._client.retry",
    "Scenario": "._scenario.model",
    "ScenarioError": "._errors",
    "ScenarioProblem": "._errors",
    "ServiceStartError": "._errors",
    "Setup": "._client.sequence",
    "SiteRequest": "._gateway.exchange",
    "SiteResponse": "._gateway.exchange",
    "SmstsLog": "._client.log",
    "SpaceReport": "._client.cache",
    "Step": "._client.sequence",
    "StepEvent": "._client.sequence",
    "TaskSequence": "._client.sequence",
    "TaskSequenceCache": "._client.tscache",
    "TaskSequenceEngine": "._client.engine",
    "TaskSequenceResult": "._client.sequence",
    "VirtualTime": "._client.retry",
    "load_scenario": "._scenario.load",
    "load_scenarios": "._scenario.load",
}

__all__ = sorted(_API)  # noqa: PLE0605 - derived from _API, the one list

# For type checkers only: without them, mypy would type every name as Any (the module
# ``__getattr__``), and ``X as X`` marks each as re-exported, since ``__all__`` is computed.
# tests/test_public_api.py checks these imports name exactly _API's names and modules.
if TYPE_CHECKING:
    from ._client.acp import ContentProvider as ContentProvider
    from ._client.acp import ProgramProvider as ProgramProvider
    from ._client.acp import ProviderLocation as ProviderLocation
    from ._client.acp import ProviderRequest as ProviderRequest
    from ._client.acp import ProviderToken as ProviderToken
    from ._client.cache import CacheEntry as CacheEntry
    from ._client.cache import CacheSpaceError as CacheSpaceError
    from ._client.cache import ClientCache as ClientCache
    from ._client.cache import Eviction as Eviction
    from ._client.cache import Lease as Lease
    from ._client.cache import SpaceReport as SpaceReport
    from ._client.cmg import CMGClient as CMGClient
    from ._client.cmg import CMGConnection as CMGConnection
    from ._client.download import DownloadCore as DownloadCore
    from ._client.download import DownloadStats as DownloadStats
    from ._client.engine import TaskSequenceEngine as TaskSequenceEngine
    from ._client.log import SmstsLog as SmstsLog
    from ._client.retry import RetryPolicy as RetryPolicy
    from ._client.retry import VirtualTime as VirtualTime
    from ._client.sequence import Condition as Condition
    from ._client.sequence import ContentDestination as ContentDestination
    from ._client.sequence import PackageTransfer as PackageTransfer
    from ._client.sequence import ProviderRun as ProviderRun
    from ._client.sequence import Setup as Setup
    from ._client.sequence import Step as Step
    from ._client.sequence import StepEvent as StepEvent
    from ._client.sequence import TaskSequence as TaskSequence
    from ._client.sequence import TaskSequenceResult as TaskSequenceResult
    from ._client.tscache import TaskSequenceCache as TaskSequenceCache
    from ._errors import CheckFailed as CheckFailed
    from ._errors import ContentError as ContentError
    from ._errors import ExpectationFailed as ExpectationFailed
    from ._errors import GatewayError as GatewayError
    from ._errors import InvalidValueError as InvalidValueError
    from ._errors import NotFoundError as NotFoundError
    from ._errors import NotRunningError as NotRunningError
    from ._errors import ProvisioningError as ProvisioningError
    from ._errors import PytestCmgError as PytestCmgError
    from ._errors import ScenarioError as ScenarioError
    from ._errors import ScenarioProblem as ScenarioProblem
    from ._errors import ServiceStartError as ServiceStartError
    from ._gateway.exchange import SiteRequest as SiteRequest
    from ._gateway.exchange import SiteResponse as SiteResponse
    from ._gateway.faults import GatewayFault as GatewayFault
    from ._gateway.requestlog import LoggedRequest as LoggedRequest
    from ._gateway.requestlog import RequestLog as RequestLog
    from ._gateway.server import FakeCMG as FakeCMG
    from ._gateway.site import CmgSite as CmgSite
    from ._gateway.tokens import AzureADTenant as AzureADTenant
    from ._harness import Harness as Harness
    from ._net.pki import Credentials as Credentials
    from ._protocol.clock import FakeClock as FakeClock
    from ._protocol.location import AccessToken as AccessToken
    from ._protocol.location import ContentLocationReply as ContentLocationReply
    from ._protocol.location import ContentLocationRequest as ContentLocationRequest
    from ._protocol.location import LocationRecord as LocationRecord
    from ._protocol.location import OnPremDP as OnPremDP
    from ._protocol.manifest import ContentManifest as ContentManifest
    from ._protocol.manifest import ManifestFile as ManifestFile
    from ._protocol.settings import ClientSettings as ClientSettings
    from ._protocol.settings import CmgSettings as CmgSettings
    from ._protocol.settings import DeploymentSettings as DeploymentSettings
    from ._protocol.settings import DownloadMode as DownloadMode
    from ._scenario.load import load_scenario as load_scenario
    from ._scenario.load import load_scenarios as load_scenarios
    from ._scenario.model import Scenario as Scenario
    from ._storage.azurite import AzuriteProcess as AzuriteProcess
    from ._storage.azurite import ExternalStorage as ExternalStorage
    from ._storage.clouddp import CloudDP as CloudDP
    from ._storage.clouddp import PackageSource as PackageSource
    from ._storage.endpoint import BlobEndpoint as BlobEndpoint
    from ._storage.provision import AZURITE_VERSION as AZURITE_VERSION


def __getattr__(name: str) -> Any:  # noqa: ANN401 - any public object
    home = _API.get(name)
    if home is None:
        msg = (
            f"module 'pytest_cmg' has no attribute {name!r}; the public names are "
            "pytest_cmg.__all__ (the fault proxy's are in pytest_cmg.faults)"
        )
        raise AttributeError(msg)
    value = getattr(importlib.import_module(home, __name__), name)
    # Tracebacks and reprs name the public home of each object, not its private module.
    if getattr(value, "__module__", "").startswith("pytest_cmg._"):
        value.__module__ = "pytest_cmg"
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
