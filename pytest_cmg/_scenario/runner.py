"""Running a scenario: build its world on the harness, run the client, check the expectations.

Storage is reached through a :class:`~pytest_cmg._net.proxy.FaultProxy` (when it is
plain HTTP, as Azurite is): it injects the scenario's storage faults and counts the bytes served
per package, which is what ``expect.storage_bytes`` proves on-demand behaviour with. A benchmark
scenario (``benchmark``) is the exception: its client reaches storage directly, since the proxy
would be the bottleneck it measures, and each package's rate is timed against a baseline after
the run (:mod:`.benchmark`). The engine runs on the scenario's virtual time (:mod:`.timeline`),
and the gateway's token authority on the site clock derived from it, for the length of the run.
"""

from __future__ import annotations

import difflib
import hashlib
import re
import shutil
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .._client.acp import ALLOW_TOKEN_AUTH, DOWNLOAD_PROGRAM, TOKEN_AUTH_FOR_ACP_SINCE
from .._client.boot import BootHost
from .._client.cache import ClientCache
from .._client.log import SmstsLog
from .._errors import ExpectationFailed, ScenarioError, ScenarioProblem
from .._protocol import codes
from .._protocol.manifest import ContentManifest, ManifestFile
from .._protocol.paths import Endpoint
from .benchmark import BenchmarkRound, Throughput, collect_rounds, hashlib_seconds, raw_seconds
from .content import generated_package
from .timeline import CUT_SLACK, ScenarioTime, Timeline, TimelineLog

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .._client.boot import BootSpec
    from .._client.engine import CMGConnection, TaskSequenceEngine, TaskSequenceResult
    from .._gateway.requestlog import LoggedRequest
    from .._gateway.server import FakeCMG
    from .._harness import Harness
    from .._net.pki import Credentials
    from .._net.proxy import ProxiedRequest
    from .._storage.clouddp import CloudDP, PackageSource
    from .model import PackageSpec, Scenario
    from .spec import Bounds

__all__ = [
    "CLIENT_ID",
    "ExpectationNotMet",
    "ScenarioRun",
    "World",
    "build_world",
    "check_expectations",
    "not_applicable",
    "not_judged",
    "run_scenario",
    "seed_cache",
    "storage_bytes_by_package",
    "with_download_program",
]

#: The SMSID of the client a scenario runs (stable, so logs compare across runs).
CLIENT_ID = "GUID:5C1E7A2B-0D1A-4E0F-9C3B-6A8D2E4F1B07"
_RETRY_LINE = re.compile(r"retry \d+")


class ExpectationNotMet(ExpectationFailed):
    """A failed expectation that also keeps what was expected and what happened, apart.

    The conformance report (``--cmg-conformance-report``) gives them as fields of its own.
    """

    def __init__(
        self, path: Path, line: int, expectation: str, detail: str, expected: str, actual: str
    ) -> None:
        super().__init__(path, line, expectation, detail)
        self.expected = expected
        self.actual = actual


@dataclass
class ScenarioRun:
    """Everything a scenario's expectations are checked against."""

    result: TaskSequenceResult
    smsts: list[str]
    gateway_log: list[str]
    requests: list[LoggedRequest]
    cache: ClientCache
    manifests: dict[str, ContentManifest]
    blob_endpoint: str
    cmg_url: str
    workdir: Path
    #: What storage was asked, through the fault proxy (None when storage was not proxied).
    storage: list[ProxiedRequest] | None = None
    #: Virtual seconds at the end of the run, and the retry waits within them.
    elapsed: float = 0.0
    waits: list[float] = field(default_factory=list)
    #: The timeline as it happened: one line per fired (or never fired) event.
    timeline: list[str] = field(default_factory=list)
    #: ``(where, why)`` for each ``faults`` entry that never happened or never fired.
    unfired: list[tuple[str, str]] = field(default_factory=list)
    #: The manifests of the entries the client cache was seeded with (``client.cache``), by key.
    seeded: dict[str, ContentManifest] = field(default_factory=dict)
    #: Outbound bytes as the CMG counted them (``FakeCMG.egress_bytes``) at the end of the run.
    egress_bytes: int = 0
    #: A benchmark scenario's figures, by package ID (empty for other scenarios).
    throughput: dict[str, Throughput] = field(default_factory=dict)
    #: Benchmark rounds after the first that did not complete, and why.
    benchmark_errors: list[str] = field(default_factory=list)
    #: The secrets the gateway handed out during the run (``CmgSite.issued_secrets``).
    secrets: list[str] = field(default_factory=list)
    #: The program under test in conformance mode (``--cmg-download-program``), or None.
    download_program: str | None = None
    #: Files seen torn under a package file's name while storage stalled (:class:`_TornWatch`).
    torn: list[str] = field(default_factory=list)
    #: How each boot ended, when the computer restarted (``BootHost.boots``); empty in-process.
    boots: list[str] = field(default_factory=list)


@dataclass
class World:
    """A scenario's world on a running harness: its cloud DP, gateway and distributed content.

    ``certificate`` and ``tenant`` are the client's variants (``client.certificate``,
    ``client.tenant``): :meth:`connection` hands out that kind of certificate, and a token of a
    tenant in that state.
    """

    dp: CloudDP
    gateway: FakeCMG
    manifests: dict[str, ContentManifest]
    certificate: str = "valid"
    tenant: str = "enabled"

    @property
    def storage_ca_cert(self) -> Path | None:
        """The CA to trust for HTTPS storage (None: storage is plain HTTP)."""
        return self.dp.endpoint.ca_cert if self.dp.endpoint.url.startswith("https:") else None

    def connection(self, client_id: str, auth: str) -> CMGConnection:
        """How a client with ``client_id`` reaches the gateway.

        ``auth`` is ``token`` (a site-issued CCM token), ``certificate`` (a client certificate
        of the world's kind) or ``azure_ad`` (an Azure AD device token of the world's tenant,
        for the device registered as ``client_id``).
        """
        from .._client.factory import connection_for

        credentials = self._certificate(client_id) if auth == "certificate" else None
        aad_token = self._aad_token(client_id) if auth == "azure_ad" else None
        return connection_for(
            self.gateway, client_id, auth, credentials=credentials, aad_token=aad_token
        )

    def _certificate(self, client_id: str) -> Credentials:
        from .._gateway.tls import PARTNER_CA_NAME

        gateway, kind = self.gateway, self.certificate
        now = datetime.now(UTC)
        if kind == "partner_ca":
            return gateway.issue_client_certificate(client_id, issuer=PARTNER_CA_NAME)
        if kind == "expired":
            return gateway.issue_client_certificate(client_id, not_after=now - timedelta(days=1))
        if kind == "not_yet_valid":
            return gateway.issue_client_certificate(client_id, not_before=now + timedelta(days=1))
        if kind == "untrusted_ca":
            return gateway.issue_client_certificate(client_id, rogue=True)
        if kind == "no_client_auth":
            return gateway.issue_client_certificate(client_id, usage="server")
        credentials = gateway.issue_client_certificate(client_id)
        if kind == "revoked":
            gateway.revoke_client_certificate(credentials)
        return credentials

    def _aad_token(self, client_id: str) -> str:
        from .._gateway.tokens import AzureADTenant

        gateway = self.gateway
        if self.tenant == "not_onboarded":
            # A tenant of its own that the site never onboarded (issuer validation fails).
            return gateway.issue_aad_token(client_id, tenant=AzureADTenant(clock=gateway.clock))
        token = gateway.issue_aad_token(client_id)
        if self.tenant == "disabled":
            gateway.azure_ad.disable(gateway.tenant.tenant_id)
        return token


def build_world(scenario: Scenario, harness: Harness) -> World:
    """Distribute the scenario's packages into a fresh container and set the gateway up for it.

    Packages on the cloud DP are uploaded; on-premises DPs (``distribution_points``) are listed
    with the hash of the content the scenario generates for them, which is never uploaded
    anywhere (the internet client cannot reach an intranet DP). The caller owns the world:
    ``world.dp.delete()`` removes its content.
    """
    from .._gateway.tls import CLIENT_CA_NAME, PARTNER_CA_NAME

    dp = harness.new_cloud_dp()
    gateway = harness.gateway
    gateway.clear()
    on_prem = {p for point in scenario.distribution_points for p in point.packages}
    held: dict[str, ContentManifest] = {}
    try:
        manifests = {}
        for package in scenario.packages:
            if not package.on_cloud_dp and package.id not in on_prem:
                continue
            # A large package is generated into a temporary folder, removed once it is
            # uploaded (Azurite then holds the bytes) or hashed.
            with generated_package(package, scenario.seed) as files:
                if package.on_cloud_dp:
                    manifests[package.id] = dp.distribute(package.id, package.version, files)
                    held[package.id] = manifests[package.id]
                else:
                    held[package.id] = _local_manifest(package.id, package.version, files)
    except BaseException:
        dp.delete()
        raise
    roots = {"site": CLIENT_CA_NAME, "partner": PARTNER_CA_NAME}
    settings = replace(
        scenario.cmg, certificate_trust_list=tuple(roots[name] for name in scenario.trust_list)
    )
    gateway.site_code = scenario.site_code
    gateway.configure(settings=settings, cloud_dp=dp, deployment=scenario.deployment)
    for point in scenario.distribution_points:
        gateway.add_on_prem_dp(
            point.fqdn,
            *(held[package_id] for package_id in point.packages),
            locality=point.locality,
            https=point.https,
        )
    if not scenario.crl_reachable:
        # Until the next clear(), which publishes them again.
        gateway.tls.withdraw_crls()
    return World(dp, gateway, manifests, scenario.certificate, scenario.tenant)


def seed_cache(
    cache: ClientCache, entries: tuple[PackageSpec, ...], seed: int
) -> dict[str, ContentManifest]:
    """Make each of ``entries`` a verified entry of ``cache``, through its public API.

    As a download would: the content (generated from ``seed``, like the package's) is written
    into the entry's staging folder, hashed from the bytes written, pruned to those files and
    committed. Returns each entry's manifest, by key, for the run's checks of the cache.
    """
    made: dict[str, ContentManifest] = {}
    for spec in entries:
        with generated_package(spec, seed) as files, cache.staging(spec.id, spec.version) as staged:
            digests: dict[str, str] = {}
            items = []
            for source in files:
                target = staged.joinpath(*source.relpath.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source.data, bytes):
                    target.write_bytes(source.data)
                else:
                    shutil.copyfile(source.data, target)
                # Hashed from what is on disk, as the download core verifies what it wrote.
                with target.open("rb") as handle:
                    digests[source.relpath] = hashlib.file_digest(handle, "sha256").hexdigest()
                items.append(
                    ManifestFile(source.relpath, target.stat().st_size, digests[source.relpath])
                )
            cache.prune_unverified(staged, digests)
            entry = cache.commit(staged, spec.id, spec.version)
        made[entry.key] = ContentManifest(
            package_id=spec.id, version=spec.version, files=tuple(items)
        )
    return made


def _local_manifest(package_id: str, version: int, files: list[PackageSource]) -> ContentManifest:
    """The manifest of generated content that is not uploaded (it is on an on-prem DP only)."""
    items = []
    for source in files:
        if isinstance(source.data, bytes):
            digest, size = hashlib.sha256(source.data).hexdigest(), len(source.data)
        else:
            # A large package is generated on disk: hash it as the upload reads it, in pieces.
            with source.data.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            size = source.data.stat().st_size
        items.append(ManifestFile(source.relpath, size, digest))
    return ContentManifest(package_id=package_id, version=version, files=tuple(items))


def not_applicable(scenario: Scenario) -> str | None:
    """Why another downloader's run (``--cmg-download-program``) does not apply, or None.

    Read from the file's ``requires`` alone: an item is never called not applicable because it
    failed.
    """
    from .vocabulary import APPLICABILITY

    if not scenario.requires:
        return None
    return "; ".join(f"requires {name}: {APPLICABILITY[name]}" for name in scenario.requires)


def not_judged(
    scenario: Scenario, failures: list[ExpectationFailed]
) -> tuple[list[ExpectationFailed], list[ExpectationFailed]]:
    """``failures`` split into those that count with another downloader, and those of the
    ``expect`` keys the file names in ``builtin_expect`` (``expect.retries``,
    ``expect.log[0]``, ``expect.storage_bytes.PS100012``...), which do not.
    """

    def exempt(key: str) -> bool:
        return any(
            key == f"expect.{name}" or key.startswith((f"expect.{name}.", f"expect.{name}["))
            for name in scenario.builtin_expect
        )

    return (
        [f for f in failures if not exempt(f.expectation)],
        [f for f in failures if exempt(f.expectation)],
    )


def with_download_program(scenario: Scenario, program: str) -> Scenario:
    """``scenario`` as it runs with ``program`` as its alternate content provider.

    The task sequence sets ``SMSTSDownloadProgram`` to ``program`` and
    ``SMSTSAllowTokenAuthURLForACP`` to true, and the site is raised to at least 2203, so that
    the program is offered the CMG: without both, an ACP is never handed a source it can
    download from, and every package would fall back to the built-in download. Only the
    ACP's gate changes with the raise: every other site-version gate is at or before 2107, the
    default (a scenario that tests one declares ``requires: [site_gates]``).
    """
    variables = {
        **scenario.task_sequence.variables,
        DOWNLOAD_PROGRAM: program,
        ALLOW_TOKEN_AUTH: "true",
    }
    cmg = replace(
        scenario.cmg, site_version=max(scenario.cmg.site_version, TOKEN_AUTH_FOR_ACP_SINCE)
    )
    return replace(
        scenario, cmg=cmg, task_sequence=replace(scenario.task_sequence, variables=variables)
    )


def run_scenario(
    scenario: Scenario, harness: Harness, workdir: Path, *, download_program: str | None = None
) -> ScenarioRun:
    """Build the scenario's world and run its task sequence on a client engine.

    With ``download_program``, the task sequence hands each package to that program as its
    alternate content provider (:func:`with_download_program`).
    """
    from .._net.proxy import FaultProxy

    if download_program is not None:
        scenario = with_download_program(scenario, download_program)
    world = build_world(scenario, harness)
    gateway = world.gateway
    time = ScenarioTime(datetime.now(UTC), seed=scenario.seed)
    authority = gateway.authority
    # Only this run's secrets: a session's gateway has handed out thousands, and each one is a
    # pattern every log line is searched for.
    secrets_before = gateway.secrets_issued
    wall_clock = authority.clock
    proxy: FaultProxy | None = None
    watch = _TornWatch(world.manifests, time.pass_time)
    host: BootHost | None = None
    timeline: Timeline | None = None

    def stalled(seconds: float) -> None:
        # A mid-download restart is armed as a stall: when storage has sent its bytes, the power
        # of the boot is cut there, once the boot's journal has caught up (a checkpoint apart).
        if host is not None and timeline is not None and proxy is not None:
            due = timeline.cut_due(proxy.log)
            if due is not None:
                event, sent = due
                after = int(event.params["after_bytes"])
                last = sent >= after + CUT_SLACK
                # Bytes flow to the next stall until the journal has caught up; at the last
                # stall the power is cut whatever the journal says.
                if _journal_caught_up(workdir, event.params["file"], after, last) or last:
                    timeline.cut(event)
                    host.power_cut()
        watch.stalled(seconds)

    try:
        # A benchmark's client reaches storage directly: validation refused everything that
        # needs the proxy (storage faults and counts), which would otherwise cap the rate.
        if scenario.benchmark is None and world.dp.endpoint.url.startswith("http://"):
            proxy = FaultProxy(world.dp.endpoint.url, sleep=stalled).start()
            world.dp.route_through(proxy.rewrite)
        else:
            _no_storage_faults(scenario, world.dp.endpoint.url)
        # Token lifetimes follow the scenario's clock for this run only; the session's gateway
        # gets its wall clock back in ``finally``.
        authority.clock = time.site_clock()
        timeline = Timeline(scenario.timeline, gateway, proxy, time)
        workers = 1
        if scenario.restarts:
            # Every boot a process of its own: nothing in memory survives a restart.
            host = BootHost(
                clock=time.clock,
                sleep=time.sleep,
                pass_time=time.pass_time,
                before_step=timeline.before_step,
                restart_takes=scenario.restart_takes,
            )
            timeline.power_cut = host.power_cut
            cache = ClientCache(workdir / "Windows" / "ccmcache", _cache_mb(scenario))
            watch.cache = cache
            seeded = seed_cache(cache, scenario.cache_seed, scenario.seed)
            timeline.start()
            # An Azure AD device gets a new device token from Azure AD at each start; a
            # site-issued token or a certificate is what the client has, restart or not.
            fresh = (
                (lambda: world.connection(CLIENT_ID, scenario.auth))
                if scenario.auth == "azure_ad"
                else None
            )
            result = host.run(_boot_spec(scenario, world, workdir, time), fresh)
            smsts = [f"{c}: {m}" for c, m, _, _ in SmstsLog.read(workdir / "smsts.log")]
        else:
            # Every line carries the scenario's virtual time (docs/emulation.md, "Windows form
            # and one clock"): a 15 s retry delay is 15 s between two lines.
            log = TimelineLog(workdir / "smsts.log", timeline.before_step, time.site_clock().now)
            engine = _engine(scenario, world, workdir, log, time)
            cache = engine.cache
            watch.cache = cache
            workers = engine.core.workers
            try:
                seeded = seed_cache(cache, scenario.cache_seed, scenario.seed)
                timeline.start()
                result = engine.run(scenario.task_sequence, scenario.launch)
            finally:
                engine.close()
            smsts = log.messages
        if proxy is not None:
            proxy.wait_idle()
        # Measured egress is counted as the meter forwards bytes: wait for its last ones.
        gateway.wait_egress_idle()
        missed = timeline.missed(
            gateway.log.entries,
            proxy.log if proxy is not None else None,
            tuple(step.name for step in scenario.task_sequence.steps),
        )
        run = ScenarioRun(
            result=result,
            smsts=smsts,
            gateway_log=gateway.service_lines,
            requests=gateway.log.entries,
            cache=cache,
            manifests=world.manifests,
            blob_endpoint=world.dp.endpoint.url,
            cmg_url=gateway.url,
            workdir=workdir,
            storage=proxy.log if proxy is not None else None,
            elapsed=time.clock(),
            waits=list(time.waits),
            timeline=timeline.report(missed),
            unfired=[(event.where, why) for event, why in missed],
            egress_bytes=gateway.egress_bytes,
            seeded=seeded,
            secrets=gateway.issued_secrets(since=secrets_before),
            torn=watch.found,
            download_program=download_program,
            boots=list(host.boots) if host is not None else [],
        )
        if scenario.benchmark is not None:
            # After the run's evidence is taken: further rounds add requests and egress.
            _benchmark(scenario, world, run, workers)
        gateway.check()
        return run
    finally:
        authority.clock = wall_clock
        world.dp.route_through(None)
        if proxy is not None:
            proxy.stop()
        world.dp.delete()


def _benchmark(scenario: Scenario, world: World, run: ScenarioRun, workers: int) -> None:
    """Time each package read from storage against the baseline, round after round.

    Round 1 is the run the expectations check; each further round runs the task sequence again
    on a fresh client cache in ``<workdir>/round-<n>`` (removed after it), without the timeline.
    Each round's baselines are timed right after its run, in this process, on the same bytes.
    """
    spec = scenario.benchmark
    assert spec is not None
    rounds: dict[str, list[BenchmarkRound]] = {}
    sizes: dict[str, tuple[int, int]] = {}

    def measure(result: TaskSequenceResult) -> None:
        # A package read twice in a round (two destinations) counts as one larger transfer.
        done: dict[str, list[float]] = {}
        for transfer in result.transfers:
            if transfer.from_cache or transfer.bytes <= 0:
                continue
            files, size, seconds = done.setdefault(transfer.package_id, [0, 0, 0.0])
            done[transfer.package_id] = [
                files + transfer.files,
                size + transfer.bytes,
                seconds + transfer.seconds,
            ]
        for package_id, (files, size, seconds) in done.items():
            baseline = _baseline_seconds(spec.baseline, world, package_id, int(size), workers)
            rounds.setdefault(package_id, []).append(BenchmarkRound(seconds, baseline))
            sizes[package_id] = (int(files), int(size))

    measure(run.result)
    for number in range(2, spec.rounds + 1):
        folder = run.workdir / f"round-{number}"
        try:
            result = _run_again(scenario, world, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        if not result.succeeded:
            why = f"failed 0x{result.exit_code:08X}"
            if result.failed_step:
                why += f" at step {result.failed_step!r}"
            if result.error:
                why += f": {result.error}"
            run.benchmark_errors.append(f"round {number} {why}")
            break
        measure(result)
    run.throughput = {
        package_id: collect_rounds(package_id, spec.baseline, *sizes[package_id], measured)
        for package_id, measured in rounds.items()
    }


def _baseline_seconds(
    baseline: str, world: World, package_id: str, size: int, workers: int
) -> float:
    if baseline == "hashlib":
        return hashlib_seconds(size)
    manifest = world.manifests[package_id]
    now = datetime.now(UTC)
    signed = world.dp.signed_manifest(
        manifest, start=now - timedelta(minutes=5), expiry=now + timedelta(hours=1)
    )
    urls = [item.url for item in signed.files]
    return raw_seconds(urls, size, workers=workers, ca_file=world.storage_ca_cert)


def _run_again(scenario: Scenario, world: World, folder: Path) -> TaskSequenceResult:
    """The task sequence once more on a fresh cache: a benchmark round after the first."""
    time = ScenarioTime(datetime.now(UTC), seed=scenario.seed)
    log = SmstsLog(folder / "smsts.log", time.site_clock().now)
    engine = _engine(scenario, world, folder, log, time)
    try:
        return engine.run(scenario.task_sequence, scenario.launch)
    finally:
        engine.close()


#: Checkpoint spacing of a restarting scenario's download core: a power cut loses at most this
#: much of a file (the core's default, 8 MiB a second at most, would lose all of a small one).
RESTART_JOURNAL_BYTES = 256 * 1024
#: Wall-clock bounds on waiting for a boot's journal before a mid-download power cut: at each
#: of the armed stalls, and at the last one.
_JOURNAL_GLANCE = 0.2
_JOURNAL_WAIT = 5.0


def _cache_mb(scenario: Scenario) -> int:
    return max(1, scenario.cache_size // 2**20)


def _boot_spec(scenario: Scenario, world: World, folder: Path, time: ScenarioTime) -> BootSpec:
    """What each boot of the scenario's client is built from (as :func:`_engine` builds it)."""
    from .._client.boot import BootSpec

    return BootSpec(
        connection=world.connection(CLIENT_ID, scenario.auth),
        folder=folder,
        sequence=scenario.task_sequence,
        launch=scenario.launch,
        cache_mb=_cache_mb(scenario),
        settings=scenario.client,
        deployment=scenario.deployment,
        site_version=scenario.cmg.site_version,
        storage_ca_file=world.storage_ca_cert,
        start=time.start,
        seed=scenario.seed,
        journal_bytes=RESTART_JOURNAL_BYTES,
        journal_seconds=0.0,
    )


def _journal_caught_up(folder: Path, file: str, sent: int, last: bool) -> bool:
    """Whether a download journal under ``folder`` records ``file`` to within one checkpoint of
    ``sent`` bytes, waiting a little (longer at the ``last`` chance) for its checkpoint."""
    import json
    import time as wall

    deadline = wall.monotonic() + (_JOURNAL_WAIT if last else _JOURNAL_GLANCE)
    while wall.monotonic() < deadline:
        for path in folder.rglob("*.part.journal"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if file in str(record.get("relpath", "")) and (
                int(record.get("offset", 0)) >= sent - RESTART_JOURNAL_BYTES
            ):
                return True
        wall.sleep(0.02)
    return False


def _engine(
    scenario: Scenario, world: World, folder: Path, log: SmstsLog, time: ScenarioTime
) -> TaskSequenceEngine:
    """The scenario's client: its cache under ``folder``, retries on ``time``'s virtual clock."""
    from .._client.factory import build_engine

    return build_engine(
        world.connection(CLIENT_ID, scenario.auth),
        folder,
        log=log,
        cache_mb=_cache_mb(scenario),
        settings=scenario.client,
        deployment=scenario.deployment,
        retry=time.policy(),
        # Trusted by the core, and named to an alternate content provider, which must trust
        # HTTPS storage as the core does.
        storage_ca_file=world.storage_ca_cert,
        site_version=scenario.cmg.site_version,
    )


class _TornWatch:
    """Looks for a torn file under a package file's name whenever storage stalls.

    The fault proxy calls :meth:`stalled` for every scripted wait (``stall_after``,
    ``throttle``, ``delay``), while the downloader waits mid-file: the one moment a file being
    written is surely incomplete. A downloader that writes straight to a file's own name shows
    it torn there, where a crash would leave it looking like content (the built-in download and
    a content provider alike: :meth:`ClientCache.final_folders`). Then the wait is passed on.
    """

    #: Looks per run: a throttled body stalls once per slice, and each look reads the folders.
    LOOKS = 200
    #: Files larger than this are compared by size only (hashing them at every stall costs more
    #: than it finds: a torn file is almost always short).
    HASHED = 64 * 2**20

    def __init__(
        self, manifests: dict[str, ContentManifest], wait: Callable[[float], None]
    ) -> None:
        self.manifests = manifests
        self.wait = wait
        #: Set once the engine exists; no look before.
        self.cache: ClientCache | None = None
        self.found: list[str] = []
        self._looks = 0
        #: (path, size, mtime_ns) already hashed and found whole.
        self._whole: set[tuple[str, int, int]] = set()

    def stalled(self, seconds: float) -> None:
        self.look()
        self.wait(seconds)

    def look(self) -> None:
        if self.cache is None or self._looks >= self.LOOKS:
            return
        self._looks += 1
        for manifest in list(self.manifests.values()):
            for folder in self.cache.final_folders(manifest.package_id, manifest.version):
                for item in manifest.files:
                    path = folder.joinpath(*item.relpath.split("/"))
                    problem = self._torn(path, item)
                    seen = f"{path.relative_to(self.cache.root)}: {problem}" if problem else ""
                    if seen and seen not in self.found:
                        self.found.append(seen)

    def _torn(self, path: Path, item: ManifestFile) -> str:
        try:
            info = path.lstat()
        except OSError:
            return ""  # not there (yet): fine
        if info.st_size != item.size:
            return f"{info.st_size} of {item.size} bytes"
        stamp = (str(path), info.st_size, info.st_mtime_ns)
        if info.st_size > self.HASHED or stamp in self._whole:
            return ""
        try:
            with path.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            return ""  # moved away meanwhile
        if digest != item.sha256.lower():
            return f"{item.size} bytes that are not the file's (SHA-256 {digest[:12]}...)"
        self._whole.add(stamp)
        return ""


def _no_storage_faults(scenario: Scenario, url: str) -> None:
    """Refuse, before anything runs, a scenario whose storage faults cannot be injected."""
    for event in scenario.timeline:
        # A mid-download restart is armed as storage stalls: it needs the proxy as much.
        if event.kind == "storage" or (event.kind == "restart" and event.params.get("file")):
            path, line = scenario.location(event.where)
            rule = (
                f"{event.where}: storage faults need plain-http storage behind the fault proxy, "
                f"and storage is {url.split(':', 1)[0]} ({url})"
            )
            hint = "run this scenario without HTTPS storage (--cmg-storage-https)"
            raise ScenarioError([ScenarioProblem(path, line, rule, hint)])


def storage_bytes_by_package(storage: list[ProxiedRequest]) -> dict[str, int]:
    """Content bytes storage served per package ID (blob ``<container>/<ID>.<ver>/...``).

    Only the bodies of 200 and 206 answers are content; a 403's error document is not.
    """
    served: dict[str, int] = {}
    for request in storage:
        parts = request.path.split("/")
        if len(parts) > 3 and request.status in (200, 206):
            package_id = parts[3].split(".", 1)[0]
            served[package_id] = served.get(package_id, 0) + request.body_bytes
    return served


def _verified_entries(run: ScenarioRun) -> tuple[list[str], list[str]]:
    """Cache entries, and any whose bytes do not match the manifest they were distributed with."""
    keys, bad = [], []
    for entry in run.cache.entries():
        keys.append(entry.key)
        manifest = run.manifests.get(entry.package_id)
        if manifest is None or manifest.version != entry.version:
            # An entry the run started with (client.cache) is checked against its own content.
            manifest = run.seeded.get(entry.key)
        if manifest is None or manifest.version != entry.version:
            bad.append(f"{entry.key}: no distributed manifest matches this entry")
            continue
        for item in manifest.files:
            path = entry.path / item.relpath
            if not path.is_file():
                bad.append(f"{entry.key}: {item.relpath} is missing")
                continue
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if digest != item.sha256:
                bad.append(
                    f"{entry.key}: {item.relpath} has SHA-256 {digest}, manifest {item.sha256}"
                )
    return keys, bad


def _excerpt(title: str, lines: list[str], limit: int = 12) -> str:
    if not lines:
        return f"{title}: (empty)"
    shown = lines[-limit:]
    more = f" (last {limit} of {len(lines)})" if len(lines) > limit else ""
    return f"{title}{more}:\n" + "\n".join(f"    {line}" for line in shown)


def _literal(pattern: str) -> str:
    """A regular expression read as the text it most likely means (for similarity only)."""
    return re.sub(r"\\(.)", r"\1", re.sub(r"\\[dswDSW][+*]?|[\^$]", "", pattern))


def closest_lines(pattern: str, lines: list[str], limit: int = 3) -> list[str]:
    """The lines most like what ``pattern`` looks for: why a regular expression did not match."""
    wanted = _literal(pattern)
    scored = []
    for line in lines:
        matcher = difflib.SequenceMatcher(None, wanted, line, autojunk=False)
        if matcher.real_quick_ratio() > 0.2:
            scored.append((matcher.ratio(), line))
    scored.sort(key=lambda pair: -pair[0])
    return [line for ratio, line in scored[:limit] if ratio > 0.3]


def _storage_lines(storage: list[ProxiedRequest], package_id: str | None = None) -> list[str]:
    out = []
    for r in storage:
        parts = r.path.split("/")
        if package_id is not None and (len(parts) < 4 or parts[3].split(".")[0] != package_id):
            continue
        rng = f" range={r.range}" if r.range else ""
        faults = f" faults={','.join(r.faults)}" if r.faults else ""
        out.append(
            f"#{r.number} {r.method} {unquote('/'.join(parts[3:]))}{rng} -> {r.status} "
            f"{r.body_bytes} bytes {r.outcome}{faults}"
        )
    return out


def _size(n: float) -> str:
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor and n % factor == 0:
            return f"{int(n // factor)}{unit} ({int(n)} bytes)"
    return f"{int(n)} bytes"


def _bounds(bounds: Bounds, show: Any = None) -> str:  # noqa: ANN401 - a formatter
    if show is None:
        return bounds.describe()

    def fmt(x: float | None) -> str:
        return "" if x is None else show(x)

    if bounds.at_least is not None and bounds.at_least == bounds.at_most:
        return f"exactly {fmt(bounds.at_least)}"
    parts = []
    if bounds.at_least is not None:
        parts.append(f"at least {fmt(bounds.at_least)}")
    if bounds.at_most is not None:
        parts.append(f"at most {fmt(bounds.at_most)}")
    return " and ".join(parts)


def check_expectations(scenario: Scenario, run: ScenarioRun) -> list[ExpectationFailed]:
    """Every expectation that does not hold, each pointing at its line in the scenario file."""
    expect = scenario.expect
    failures: list[ExpectationFailed] = []
    result = run.result

    def fail(where: str, expected: str, actual: str, *context: str, key: str = "") -> None:
        # ``key`` names a rule no line of the file states (it is then reported at ``where``).
        path, line = scenario.location(where)
        detail = ""
        source = _source_line(path, line)
        if source is not None:
            detail += f"  {line:>4} | {source}\n"
        detail += f"  expected: {expected}\n  actual:   {actual}"
        if context:
            detail += "\n" + "\n".join(c for c in context if c)
        failures.append(ExpectationNotMet(path, line, key or where, detail, expected, actual))

    smsts = _excerpt("  smsts.log", run.smsts)
    requests = _excerpt("  gateway requests", [r.summary() for r in run.requests])
    gateway_log = _excerpt("  gateway log", run.gateway_log, limit=6)
    timeline = _excerpt("  timeline", run.timeline) if run.timeline else ""

    outcome = "success" if result.succeeded else "failure"
    if outcome != expect["outcome"]:
        why = f"failure 0x{result.exit_code:08X}"
        if result.failed_step:
            why += f" at step {result.failed_step!r}"
        if result.error:
            why += f": {result.error}"
        fail(
            "expect.outcome",
            expect["outcome"],
            why if outcome == "failure" else outcome,
            smsts,
            requests,
            gateway_log,
            timeline,
        )
    if expect["exit_code"] is not None and int(expect["exit_code"], 16) != result.exit_code:
        fail("expect.exit_code", expect["exit_code"], f"0x{result.exit_code:08X}", smsts, timeline)

    keys, bad = _verified_entries(run)
    if bad:
        fail("expect", "every cache entry matches its manifest", "; ".join(bad))
    if expect["cache"] is not None and sorted(expect["cache"]) != sorted(keys):
        fail(
            "expect.cache",
            ", ".join(sorted(expect["cache"])) or "(empty)",
            ", ".join(sorted(keys)) or "(empty)",
            smsts,
        )
    wanted_ts = expect.get("ts_cache")
    if wanted_ts is not None and sorted(wanted_ts) != sorted(result.ts_cache):
        fail(
            "expect.ts_cache",
            ", ".join(sorted(wanted_ts)) or "(empty)",
            ", ".join(sorted(result.ts_cache)) or "(empty)",
            smsts,
        )
    leftovers = run.cache.staging_leftovers()
    if leftovers:
        fail(
            "expect",
            "no unverified download left in the cache",
            ", ".join(p.name for p in leftovers),
        )

    if expect["downloaded"] is not None:
        read = sorted({t.package_id for t in result.transfers if t.bytes > 0})
        if sorted(expect["downloaded"]) != read:
            fail(
                "expect.downloaded",
                ", ".join(sorted(expect["downloaded"])) or "(none)",
                ", ".join(read) or "(none)",
                requests,
            )

    for endpoint in Endpoint.ALL:
        wanted: Bounds | None = (expect["requests"] or {}).get(endpoint)
        if wanted is None:
            continue
        got = [r for r in run.requests if r.endpoint == endpoint]
        if not wanted.holds(len(got)):
            fail(
                f"expect.requests.{endpoint}",
                f"{_bounds(wanted)} {endpoint} request(s)",
                str(len(got)),
                _excerpt(f"  {endpoint} requests", [r.summary() for r in got]),
                requests if got else "",
            )

    for key, lines, title in (
        ("log", run.smsts, "smsts.log"),
        ("gateway_log", run.gateway_log, "gateway log"),
    ):
        for index, pattern in enumerate(expect[key] or []):
            if pattern is None or any(re.search(pattern, line) for line in lines):
                continue
            close = closest_lines(pattern, lines)
            fail(
                f"expect.{key}[{index}]",
                f"a {title} line matching /{pattern}/",
                "no such line",
                # The nearest lines say why; the log's tail only when none comes near.
                _excerpt(f"  closest {title} lines", close)
                if close
                else _excerpt(f"  {title}", lines),
            )
    for key, lines, title in (
        ("absent_log", run.smsts, "smsts.log"),
        ("absent_gateway_log", run.gateway_log, "gateway log"),
    ):
        for index, pattern in enumerate(expect[key] or []):
            found = [line for line in lines if pattern is not None and re.search(pattern, line)]
            if found:
                fail(
                    f"expect.{key}[{index}]",
                    f"no {title} line matching /{pattern}/",
                    f"{len(found)} line(s) match",
                    _excerpt("  matching lines", found, limit=5),
                )

    _check_secrets(run, fail)
    _check_machine_paths(run, fail)
    if run.torn:
        fail(
            "expect",
            "a package file's name holds the whole, verified file or nothing, at every moment "
            "(a download in progress belongs under another name)",
            f"{len(run.torn)} file(s) seen torn while storage stalled",
            _excerpt("  torn files", run.torn, limit=5),
            key="no torn file under a package name",
        )
    if run.download_program is not None:
        _check_program(scenario, run, fail, smsts)
    _check_storage(expect, run, fail)
    _check_faults_fired(scenario, run, fail, timeline)

    if expect["egress_bytes"] is not None and not expect["egress_bytes"].holds(run.egress_bytes):
        egress_lines = [line for line in run.gateway_log if "gress" in line]
        fail(
            "expect.egress_bytes",
            f"{_bounds(expect['egress_bytes'], _size)} of egress",
            _size(run.egress_bytes)
            + (" (measured)" if scenario.cmg.measure_egress else " (manifest sizes)"),
            _excerpt("  egress lines in the gateway log", egress_lines) if egress_lines else "",
        )
    if expect["retries"] is not None and not expect["retries"].holds(len(run.waits)):
        retry_lines = [line for line in run.smsts if _RETRY_LINE.search(line)]
        fail(
            "expect.retries",
            f"{_bounds(expect['retries'])} retries",
            f"{len(run.waits)} (waits: {', '.join(f'{w:g}s' for w in run.waits) or 'none'})",
            _excerpt("  retry lines in smsts.log", retry_lines),
        )
    if expect["restarts"] is not None and not expect["restarts"].holds(run.result.reboots):
        fail(
            "expect.restarts",
            f"{_bounds(expect['restarts'])} restart(s) of the computer",
            f"{run.result.reboots}",
            _excerpt("  boots", run.boots) if run.boots else "  (every boot ran in-process)",
        )
    if expect["elapsed"] is not None and not expect["elapsed"].holds(run.elapsed):
        fail(
            "expect.elapsed",
            f"{_bounds(expect['elapsed'], lambda s: f'{s:g}s')} of virtual time",
            f"{run.elapsed:g}s (retry waits {sum(run.waits):g}s)",
            timeline,
        )
    _check_throughput(scenario, run, fail)
    # In the order of the file, as a reader goes through it.
    return sorted(failures, key=lambda f: (str(f.path) != str(scenario.path), str(f.path), f.line))


def _check_storage(expect: dict[str, Any], run: ScenarioRun, fail: Any) -> None:  # noqa: ANN401
    wants_bytes = expect["storage_bytes"] or {}
    if (wants_bytes or expect["storage_requests"] is not None) and run.storage is None:
        fail(
            "expect.storage_bytes" if wants_bytes else "expect.storage_requests",
            "storage seen through the fault proxy",
            "storage is not plain HTTP, so it was not proxied and nothing was counted",
        )
        return
    storage = run.storage or []
    served = storage_bytes_by_package(storage)
    for package_id, wanted in wants_bytes.items():
        got = served.get(package_id, 0)
        if wanted is not None and not wanted.holds(got):
            fail(
                f"expect.storage_bytes.{package_id}",
                f"{_bounds(wanted, _size)} served for {package_id}",
                _size(got),
                _excerpt(
                    f"  storage requests for {package_id}", _storage_lines(storage, package_id)
                ),
            )
    wanted_requests = expect["storage_requests"]
    if wanted_requests is not None and not wanted_requests.holds(len(storage)):
        fail(
            "expect.storage_requests",
            f"{_bounds(wanted_requests)} storage request(s)",
            str(len(storage)),
            _excerpt("  storage requests", _storage_lines(storage)),
        )


def _check_machine_paths(run: ScenarioRun, fail: Any) -> None:  # noqa: ANN401
    """No path of the machine running the tests in smsts.log (so in no variable: each is logged).

    The client is a Windows client: its paths read ``C:\\...`` (``winpath``), whatever folder
    stands for its drive here. The run's work folder, or any absolute POSIX path under it,
    in a line means a path escaped the mapping. Always checked, as secrets are.
    """
    root = str(run.workdir.absolute())
    roots = {root, str(run.workdir.resolve())}
    leaked = [line for line in run.smsts if any(r in line for r in roots)]
    if leaked:
        fail(
            "expect",
            "no path of the machine running the tests in smsts.log or a variable (the client's "
            'paths read C:\\..., docs/emulation.md, "Windows form and one clock")',
            f"{len(leaked)} line(s) name a path under the work folder {root}",
            _excerpt("  smsts.log lines naming a path of this machine", leaked, limit=5),
            key="no machine path in smsts.log",
        )


def _check_secrets(run: ScenarioRun, fail: Any) -> None:  # noqa: ANN401
    """No secret the gateway handed out is in smsts.log, whatever the scenario says.

    A token or SAS signature in a log lets whoever reads the log act as the client or read the
    content; the product's own logs leave them out. Always checked, as a leftover staging folder
    is, so a leak fails every scenario it happens in, not only those that thought of it. The
    lines are shown with the secret cut out: the failure report is a log too.
    """
    secrets = [s for s in run.secrets if s]
    if not secrets:
        return
    pattern = re.compile(
        "|".join(re.escape(s) for s in sorted(set(secrets), key=len, reverse=True))
    )
    leaked = [pattern.sub("<secret>", line) for line in run.smsts if pattern.search(line)]
    if leaked:
        fail(
            "expect",
            "no secret the gateway handed out (a token's or a SAS URL's signature) in smsts.log",
            f"{len(leaked)} line(s) hold one",
            _excerpt("  smsts.log lines holding a secret (cut out here)", leaked, limit=5),
            key="no secret in smsts.log",
        )


def _check_program(scenario: Scenario, run: ScenarioRun, fail: Any, smsts: str) -> None:  # noqa: ANN401
    """Conformance mode: the program under test did the downloading, and failed cleanly.

    The engine falls back to its built-in download when the program exits non-zero, as the
    product does; that rescue would hide the program's failures, so a package the program gave
    up on and the built-in download then delivered fails the item: the program failed where a
    downloader can succeed. A program that did not deliver must also leave nothing in its
    destination (the engine removes it, after recording it).
    """
    delivered_builtin = {
        (t.package_id, t.version)
        for t in run.result.transfers
        if t.provider is None and not t.from_cache
    }
    where = scenario.item_where
    for attempt in run.result.provider_runs:
        key = f"{attempt.package_id}.{attempt.version}"
        ended = (
            f"exited with {attempt.exit_code}"
            if attempt.exit_code is not None
            else "failed without an exit code (a timeout, or it could not start)"
        )
        if attempt.left:
            fail(
                where,
                f"the download program leaves nothing in its destination when it does not "
                f"deliver {key}",
                f"it {ended} and left {len(attempt.left)} file(s): {', '.join(attempt.left[:5])}",
                smsts,
                key="download program: leaves nothing",
            )
        for early in _early_retries(run.storage or [], attempt.started, attempt.ended):
            fail(
                where,
                f"the download program waits the Retry-After storage answered before asking "
                f"again for {key}",
                early,
                _excerpt("  storage requests", _storage_lines(run.storage or [])),
                key="download program: honours Retry-After",
            )
        if attempt.outcome == "refused":
            fail(
                where,
                f"the download program exits 0 only with {key}'s files, verified, in its "
                "destination",
                f"it exited 0, and what it left did not verify (0x{codes.HASH_MISMATCH:08X}): "
                "a wrong, missing or extra file",
                smsts,
                key="download program: exit 0 means done",
            )
        if attempt.outcome == "fell back" and (attempt.package_id, attempt.version) in (
            delivered_builtin
        ):
            fail(
                where,
                f"the download program delivers {key} (the scenario's sources can: the built-in "
                "download did)",
                f"the program {ended}, and the built-in download it fell back to delivered {key}",
                smsts,
                key="download program: delivers",
            )


#: The share of a Retry-After a retry may come early by: the server's clock and ours are not one.
_RETRY_AFTER_SLACK = 0.9


def _early_retries(storage: list[ProxiedRequest], start: float, end: float) -> list[str]:
    """Requests made between ``start`` and ``end`` (a program's run, real time) sooner after an
    answer with ``Retry-After`` to the same blob than it asked; one line per such request."""
    from .._client.retry import parse_retry_after

    during = [r for r in storage if start <= r.started <= end]
    early = []
    for index, asked in enumerate(during):
        wait = parse_retry_after(asked.retry_after) if asked.retry_after else None
        if not wait:
            continue
        again = next((r for r in during[index + 1 :] if r.path == asked.path), None)
        if again is not None and again.started - asked.started < wait * _RETRY_AFTER_SLACK:
            early.append(
                f"{asked.path}: answered {asked.status} with Retry-After: {asked.retry_after}, "
                f"asked again {again.started - asked.started:.2f}s later"
            )
    return early


def _check_faults_fired(
    scenario: Scenario,
    run: ScenarioRun,
    fail: Any,  # noqa: ANN401
    timeline: str,
) -> None:
    """A scripted entry that never happened fails the scenario at its line.

    A fault that never fires tests nothing, and the scenario still passes on the happy path it
    meant to disturb: the suite would prove less than it says (``responses``'
    ``assert_all_requests_are_fired``). ``optional: true`` opts an entry out.
    """
    events = {event.where: event for event in scenario.timeline}
    storage = run.storage or []
    for where, why in run.unfired:
        event = events.get(where)
        if event is None or event.optional:
            continue
        context = [timeline]
        if event.kind == "storage" and storage:
            context.append(_excerpt("  storage requests", _storage_lines(storage)))
        elif event.kind == "gateway":
            context.append(_excerpt("  gateway requests", [r.summary() for r in run.requests]))
        fault = event.kind in ("gateway", "storage")
        fail(
            where,
            f"this {event.kind} {'fault fires' if fault else 'entry happens'} in the run: "
            f"{event.describe()} (or optional: true on the entry, if the run may end without it)",
            f"never {'fired' if fault else 'happened'}: {why}",
            *context,
        )


def _check_throughput(scenario: Scenario, run: ScenarioRun, fail: Any) -> None:  # noqa: ANN401
    spec = scenario.benchmark
    if spec is None:
        return
    for error in run.benchmark_errors:
        fail(
            "benchmark.rounds",
            f"{spec.rounds} round(s), each downloading the packages again",
            error,
            "  (the first round passed; a later one runs on a fresh cache, without the timeline)",
        )
    transfers = [
        f"{t.package_id}.{t.version}: "
        + (
            "from the cache"
            if t.from_cache
            else f"{t.bytes} bytes from storage in {t.seconds:.3f}s"
        )
        for t in run.result.transfers
    ]
    for package_id, wanted in (scenario.expect.get("throughput") or {}).items():
        if wanted is None:
            continue
        figure = run.throughput.get(package_id)
        expected = (
            f"a ratio {_bounds(wanted, lambda r: f'{r:g}')} ({package_id}'s verified download "
            f"rate / the {spec.baseline} baseline's on the same bytes)"
        )
        if figure is None:
            fail(
                f"expect.throughput.{package_id}",
                expected,
                f"not measured: {package_id} was not read from storage in this run",
                _excerpt("  transfers", transfers),
            )
        elif not wanted.holds(figure.ratio):
            fail(
                f"expect.throughput.{package_id}",
                expected,
                f"{figure.ratio:.3f} ({figure.describe()})",
                _excerpt("  rounds", figure.round_lines()),
            )


def _source_line(path: Path, line: int) -> str | None:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    return lines[line - 1] if 0 < line <= len(lines) else None
