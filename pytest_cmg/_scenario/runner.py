"""Running a scenario: build its world on the harness (:mod:`.world`) and run the client; its
expectations are checked against the :class:`.ScenarioRun` by :mod:`.expectations`.

Storage is reached through a :class:`~pytest_cmg._net.proxy.FaultProxy` (when it is
plain HTTP, as Azurite is): it injects the scenario's storage faults and counts the bytes served
per package, which is what ``expect.storage_bytes`` proves on-demand behaviour with. A benchmark
scenario (``benchmark``) is the exception: its client reaches storage directly, since the proxy
would be the bottleneck it measures, and each package's rate is timed against a baseline after
the run (:mod:`.benchmark`). The engine runs on the scenario's virtual time (:mod:`.timeline`),
and the gateway's token authority on the site clock derived from it, for the length of the run.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .._client.acp import ALLOW_TOKEN_AUTH, DOWNLOAD_PROGRAM, TOKEN_AUTH_FOR_ACP_SINCE
from .._client.boot import BootHost
from .._client.cache import ClientCache
from .._client.log import SmstsLog
from .._client.retry import VirtualTime
from .._errors import ExpectationFailed, ScenarioError, ScenarioProblem
from .benchmark import BenchmarkRound, collect_rounds, hashlib_seconds, raw_seconds
from .expectations import ScenarioRun
from .model import RestartMidDownload, StorageFaultEntry
from .timeline import Body, Timeline, bodies_in_flight
from .world import CLIENT_ID, World, build_world, seed_cache

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .._client.boot import BootSpec
    from .._client.engine import StepEvent, TaskSequenceEngine
    from .._client.sequence import TaskSequenceResult
    from .._harness import Harness
    from .._protocol.manifest import ContentManifest, ManifestFile
    from .model import Scenario


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
    time = VirtualTime(datetime.now(UTC), seed=scenario.seed)
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
        # A mid-download restart is armed as stalls: the power of the boot is cut at the first
        # one where its journal records every byte storage has sent of the file, so the next
        # boot fetches exactly the rest (docs/emulation.md, "Restarts"). Bytes flow on to the
        # next stall until then; at the last one the power is cut whatever the journal says.
        # Another downloader keeps its own state, or none: its power is cut at after_bytes.
        if host is not None and timeline is not None and proxy is not None:
            due = timeline.cut_due(proxy.log)
            if due is not None and (
                download_program is not None
                or (
                    # The journal is waited for at the last stall too, aligned or not: a file
                    # that ends before the next buffer end has one stall only, and cutting
                    # there before its last full buffer is journaled would lose that buffer,
                    # so what the next boot fetches again would depend on the machine's load.
                    (due.body.aligned or due.last)
                    and _journal_reaches(workdir, due.body, due.body.journaled)
                )
                or due.last
            ):
                timeline.cut(due.event)
                cut_power()
        watch.stalled(seconds)

    def cut_power() -> None:
        # Bodies may be on their way when the power goes (a cut at a time, or other files next
        # to the one a mid-download cut holds): on virtual time the boot had all the time those
        # bytes took to arrive, so what it received in full receive buffers is journaled first,
        # whatever the machine's load. Another downloader keeps its own state, or none.
        if host is None:
            return
        if proxy is not None and download_program is None:
            for body in bodies_in_flight(proxy.log):
                _journal_reaches(workdir, body, body.journaled, at_least=True)
        host.power_cut()

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
        sizes = {
            f"{m.package_id}.{m.version}/{f.relpath}": f.size
            for m in world.manifests.values()
            for f in m.files
        }
        timeline = Timeline(scenario.timeline, gateway, proxy, time, file_sizes=sizes)
        workers = 1
        if scenario.restarts:
            # Every boot a process of its own: nothing in memory survives a restart.
            host = BootHost(
                clock=time.clock,
                sleep=time.sleep,
                pass_time=time.pass_time,
                on_step=timeline.on_step,
                restart_takes=scenario.restart_takes,
            )
            timeline.power_cut = cut_power
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
            log = SmstsLog(workdir / "smsts.log", time.site_clock().now)
            engine = _engine(scenario, world, workdir, log, time, timeline.on_step)
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
    time = VirtualTime(datetime.now(UTC), seed=scenario.seed)
    log = SmstsLog(folder / "smsts.log", time.site_clock().now)
    engine = _engine(scenario, world, folder, log, time)
    try:
        return engine.run(scenario.task_sequence, scenario.launch)
    finally:
        engine.close()


#: Checkpoint spacing of a restarting scenario's download core: a power cut loses at most this
#: much of a file (the core's default, 8 MiB a second at most, would lose all of a small one).
RESTART_JOURNAL_BYTES = 256 * 1024
#: Wall-clock bound on waiting, at a stall armed for a mid-download power cut, for the boot to
#: hash what storage sent and journal it (a few ms unloaded; a loaded machine takes longer).
_JOURNAL_WAIT = 5.0
#: How often the journal is read meanwhile.
_JOURNAL_POLL = 0.005


def _cache_mb(scenario: Scenario) -> int:
    return max(1, scenario.cache_size // 2**20)


def _boot_spec(scenario: Scenario, world: World, folder: Path, time: VirtualTime) -> BootSpec:
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


def _journal_reaches(folder: Path, body: Body, offset: int, *, at_least: bool = False) -> bool:
    """Whether a download journal under ``folder`` records exactly ``offset`` bytes (with
    ``at_least``, ``offset`` or more) of the file ``body`` is for, waiting at most
    :data:`_JOURNAL_WAIT` for its checkpoint (nothing to record at offset 0).

    The file is told by its package, version and path, as the request names it: a ``restart``
    entry's ``file`` is a part of a blob name (``PS100013.1/`` names every file of that
    package), which a journal's package-relative ``relpath`` need not contain.
    """
    import json
    import time as wall

    if offset == 0:
        return True
    deadline = wall.monotonic() + _JOURNAL_WAIT
    while True:
        for path in folder.rglob("*.part.journal"):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue  # replaced while read: the next look sees the new record
            package, version, relpath = (record.get(k) for k in ("package_id", "version", "relpath"))
            done = record.get("offset")
            if (
                isinstance(package, str)
                and isinstance(version, int)
                and isinstance(relpath, str)
                and isinstance(done, int)
                and body.is_blob(package, version, relpath)
                and (done >= offset if at_least else done == offset)
            ):
                return True
        if wall.monotonic() >= deadline:
            return False
        wall.sleep(_JOURNAL_POLL)


def _engine(
    scenario: Scenario,
    world: World,
    folder: Path,
    log: SmstsLog,
    time: VirtualTime,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TaskSequenceEngine:
    """The scenario's client: its cache under ``folder``, retries on ``time``'s virtual clock,
    ``on_step`` its step hook (the timeline's)."""
    from .._client.factory import build_engine

    engine = build_engine(
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
        on_step=on_step,
    )
    # The client reads its own token's times on the site's clock, as a boot process does.
    engine.client.clock = time.site_clock().now
    return engine


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
        if isinstance(event, StorageFaultEntry | RestartMidDownload):
            path, line = scenario.location(event.where)
            rule = (
                f"{event.where}: storage faults need plain-http storage behind the fault proxy, "
                f"and storage is {url.split(':', 1)[0]} ({url})"
            )
            hint = "run this scenario without HTTPS storage (--cmg-storage-https)"
            raise ScenarioError([ScenarioProblem(path, line, rule, hint)])
