"""A loaded scenario: the frozen dataclasses :func:`.load.load_scenarios` builds, one per case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from .spec import Validation, show_seconds

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from .._client.sequence import TaskSequence
    from .._gateway.faults import GatewayFault
    from .._net.faults import Fault
    from .._protocol.settings import ClientSettings, CmgSettings, DeploymentSettings
    from .spec import Bounds


@dataclass(frozen=True)
class PackageSpec:
    id: str
    version: int
    name: str
    type: str
    on_cloud_dp: bool
    files: int
    size: int
    locale: str


@dataclass(frozen=True)
class DistributionPointSpec:
    """An on-premises DP of the scenario's site: the packages (declared versions) it holds."""

    fqdn: str
    #: The record's ``Locality``, as the product writes it: ``LOCAL``, ``REMOTE`` or ``SUBNET``.
    locality: str
    https: bool
    packages: tuple[str, ...]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark scenario's settings (``benchmark``): its baseline and how many rounds."""

    baseline: str = "hashlib"
    rounds: int = 1


@dataclass(frozen=True)
class MarkerUse:
    """A marker to put on the items, and where the file asked for it."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    where: str


@dataclass(frozen=True, kw_only=True)
class TimelineEvent:
    """One ``faults`` entry: what happens (a subclass per kind) and when (before the run,
    before a step, at a virtual time)."""

    #: The entry's kind, as the file names it: ``gateway``, ``storage``, ``service``, ``clock``,
    #: ``restart``.
    kind: ClassVar[str]
    where: str
    before_step: int | None = None
    at: float | None = None
    #: ``optional: true``: the run may end without it happening.
    optional: bool = False

    def what(self) -> str:
        """What happens, for the timeline report and failure messages."""
        raise NotImplementedError

    def describe(self) -> str:
        what = self.what()
        if self.before_step is not None:
            return f"{what} (before step {self.before_step})"
        if self.at is not None:
            return f"{what} (at {show_seconds(self.at)})"
        return what


def _settings(kind: str, settings: tuple[tuple[str, Any], ...]) -> str:
    return f"{kind} " + ", ".join(f"{k}={v}" for k, v in settings)


@dataclass(frozen=True, kw_only=True)
class GatewayFaultEntry(TimelineEvent):
    """A ``gateway`` entry: the fault armed on the fake CMG (``FakeCMG.fail``)."""

    kind: ClassVar[str] = "gateway"
    fault: GatewayFault
    #: The keys given a value, in the file's order (then defaults): how reports show the entry.
    settings: tuple[tuple[str, Any], ...] = ()

    def what(self) -> str:
        return _settings(self.kind, self.settings)


@dataclass(frozen=True, kw_only=True)
class StorageFaultEntry(TimelineEvent):
    """A ``storage`` entry: the fault proxy faults it scripts, and which requests they hit."""

    kind: ClassVar[str] = "storage"
    #: The 1-based storage request number (of ``file``'s requests, if given); None: the next.
    request: int | None = None
    times: int = 1
    #: Only requests for blobs whose name contains this.
    file: str | None = None
    #: Built from the entry by the fault vocabulary (``_net.faults.VOCABULARY``); they combine
    #: on the same request.
    faults: tuple[Fault, ...] = ()
    #: The keys given a value, in the file's order (then defaults): how reports show the entry.
    settings: tuple[tuple[str, Any], ...] = ()

    def what(self) -> str:
        return _settings(self.kind, self.settings)


@dataclass(frozen=True, kw_only=True)
class ServiceEvent(TimelineEvent):
    """A ``service`` entry: the CMG service stops (every request answered 503) or starts."""

    kind: ClassVar[str] = "service"
    service: str

    def what(self) -> str:
        return f"service {self.service}"


@dataclass(frozen=True, kw_only=True)
class ClockJump(TimelineEvent):
    """A ``clock`` entry: the site's clock and virtual time move forward."""

    kind: ClassVar[str] = "clock"
    seconds: float

    def what(self) -> str:
        return f"clock +{show_seconds(self.seconds)}"


@dataclass(frozen=True, kw_only=True)
class Restart(TimelineEvent):
    """A ``restart`` entry: the power of the running boot is cut (``before_step`` or ``at``)."""

    kind: ClassVar[str] = "restart"

    def what(self) -> str:
        return "restart"


@dataclass(frozen=True, kw_only=True)
class RestartMidDownload(Restart):
    """A ``restart`` entry with ``file`` and ``after_bytes``: the power is cut once storage has
    sent ``after_bytes`` of a blob whose name contains ``file``."""

    file: str
    after_bytes: int

    def what(self) -> str:
        return f"restart after {self.after_bytes} bytes of {self.file}"


@dataclass(frozen=True)
class Expectations:
    """``expect``: what must hold after the run, one field per key of the language (the
    ``EXPECT`` record, in its order), with the values it validated; None: not asked."""

    outcome: str
    exit_code: str | None = None
    cache: tuple[str, ...] | None = None
    downloaded: tuple[str, ...] | None = None
    #: Gateway request counts, by endpoint (only the endpoints the file names).
    requests: Mapping[str, Bounds] = field(default_factory=dict)
    log: tuple[str, ...] | None = None
    gateway_log: tuple[str, ...] | None = None
    absent_log: tuple[str, ...] | None = None
    absent_gateway_log: tuple[str, ...] | None = None
    storage_bytes: Mapping[str, Bounds] | None = None
    storage_requests: Bounds | None = None
    egress_bytes: Bounds | None = None
    retries: Bounds | None = None
    restarts: Bounds | None = None
    elapsed: Bounds | None = None
    ts_cache: tuple[str, ...] | None = None
    #: Task sequence variables and their exact values when the sequence ended ("": unset).
    variables: Mapping[str, str] | None = None
    throughput: Mapping[str, Bounds] | None = None


@dataclass(frozen=True)
class Scenario:
    """A validated scenario (one case of a parametrised file)."""

    path: Path
    name: str
    description: str
    seed: int
    site_code: str
    cmg: CmgSettings
    client: ClientSettings
    cache_size: int
    auth: str
    packages: tuple[PackageSpec, ...]
    task_sequence: TaskSequence
    launch: str
    deployment: DeploymentSettings
    expect: Expectations
    lines: dict[str, int] = field(default_factory=dict)
    #: Paths whose line is in another file (an included world, a catalog entry).
    files: dict[str, Path] = field(default_factory=dict)
    case_id: str | None = None
    #: Where the item is declared: ``scenario``, ``cases[1]`` or ``matrix``.
    item_where: str = "scenario"
    markers: tuple[MarkerUse, ...] = ()
    timeline: tuple[TimelineEvent, ...] = ()
    #: For each case value: the path it set and where the file gives it.
    case_values: tuple[tuple[str, str, str], ...] = ()
    #: On-premises DPs listed in location replies (``distribution_points``).
    distribution_points: tuple[DistributionPointSpec, ...] = ()
    #: The roots the site's certificate trust list names (``site``, ``partner``); empty: no CTL.
    #: The runner turns them into the gateway's CA names (``CmgSettings.certificate_trust_list``).
    trust_list: tuple[str, ...] = ()
    #: Whether the CRL distribution points can be read (``cmg.crl_reachable``).
    crl_reachable: bool = True
    #: The client certificate's kind (``client.certificate``), for ``auth: certificate``.
    certificate: str = "valid"
    #: The Azure AD tenant's state (``client.tenant``), for ``auth: azure_ad``.
    tenant: str = "enabled"
    #: Set when the scenario is a benchmark (``benchmark``): storage is reached directly.
    benchmark: BenchmarkSpec | None = None
    #: Client cache entries made before the run (``client.cache``): each a declared package
    #: at another (or the same) content version.
    cache_seed: tuple[PackageSpec, ...] = ()
    #: What it needs of the client (``requires``: keys of :data:`APPLICABILITY`), in file order.
    requires: tuple[str, ...] = ()
    #: ``expect`` keys not judged with another downloader (``builtin_expect``), in file order.
    builtin_expect: tuple[str, ...] = ()
    #: Virtual seconds one restart of the computer takes (``client.restart_takes``).
    restart_takes: float = 120.0

    @property
    def restarts(self) -> bool:
        """Whether the computer restarts in the run: then every boot is a process of its own."""
        return self.task_sequence.restarts or any(isinstance(e, Restart) for e in self.timeline)

    @property
    def item_name(self) -> str:
        """The pytest item name: ``name`` or ``name[case]``."""
        return self.name if self.case_id is None else f"{self.name}[{self.case_id}]"

    def line(self, where: str) -> int:
        """The file line of a dotted path such as ``expect.outcome``."""
        return self.location(where)[1]

    def location(self, where: str) -> tuple[Path, int]:
        """The file and line of a dotted path (an included file's, if it came from one)."""
        return Validation(self.path, lines=self.lines, files=self.files).location(where)
