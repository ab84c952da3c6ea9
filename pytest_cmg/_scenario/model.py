"""A loaded scenario: the frozen dataclasses :func:`.load.load_scenarios` builds, one per case."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .spec import Validation

if TYPE_CHECKING:
    from pathlib import Path

    from .._client.sequence import TaskSequence
    from .._protocol.settings import ClientSettings, CmgSettings, DeploymentSettings


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


@dataclass(frozen=True)
class TimelineEvent:
    """One ``faults`` entry: what happens and when (before the run, before a step, at a time)."""

    where: str
    kind: str
    params: dict[str, Any]
    before_step: int | None = None
    at: float | None = None
    #: ``optional: true``: the run may end without it happening.
    optional: bool = False

    def describe(self) -> str:
        if self.kind in ("gateway", "storage"):
            given = {k: v for k, v in self.params.items() if v not in (None, False)}
            what = f"{self.kind} " + ", ".join(f"{k}={v}" for k, v in given.items())
        elif self.kind == "service":
            what = f"service {self.params['service']}"
        elif self.kind == "restart":
            what = "restart"
            if self.params.get("file") is not None:
                what += f" after {self.params['after_bytes']} bytes of {self.params['file']}"
        else:
            what = f"clock +{self.params['clock']:g}s"
        if self.before_step is not None:
            return f"{what} (before step {self.before_step})"
        if self.at is not None:
            return f"{what} (at {self.at:g}s)"
        return what


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
    expect: dict[str, Any]
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
        return self.task_sequence.restarts or any(e.kind == "restart" for e in self.timeline)

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
