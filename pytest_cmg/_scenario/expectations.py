"""Checking a scenario's expectations (``expect``) against what its run did (:class:`ScenarioRun`).

Each failure is an :class:`ExpectationNotMet` at the expectation's file:line, with what was
expected, what happened, and the log lines, requests or figures that show it.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .._errors import ExpectationFailed
from .._protocol import codes
from .._protocol.paths import Endpoint
from .model import GatewayFaultEntry, StorageFaultEntry
from .spec import show_seconds

if TYPE_CHECKING:
    from pathlib import Path

    from .._client.cache import ClientCache
    from .._client.sequence import TaskSequenceResult
    from .._gateway.requestlog import LoggedRequest
    from .._net.proxy import ProxiedRequest
    from .._protocol.manifest import ContentManifest
    from .benchmark import Throughput
    from .model import Expectations, Scenario
    from .spec import Bounds

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
    if outcome != expect.outcome:
        why = f"failure 0x{result.exit_code:08X}"
        if result.failed_step:
            why += f" at step {result.failed_step!r}"
        if result.error:
            why += f": {result.error}"
        fail(
            "expect.outcome",
            expect.outcome,
            why if outcome == "failure" else outcome,
            smsts,
            requests,
            gateway_log,
            timeline,
        )
    if expect.exit_code is not None and int(expect.exit_code, 16) != result.exit_code:
        fail("expect.exit_code", expect.exit_code, f"0x{result.exit_code:08X}", smsts, timeline)

    keys, bad = _verified_entries(run)
    if bad:
        fail("expect", "every cache entry matches its manifest", "; ".join(bad))
    if expect.cache is not None and sorted(expect.cache) != sorted(keys):
        fail(
            "expect.cache",
            ", ".join(sorted(expect.cache)) or "(empty)",
            ", ".join(sorted(keys)) or "(empty)",
            smsts,
        )
    wanted_ts = expect.ts_cache
    if wanted_ts is not None and sorted(wanted_ts) != sorted(result.ts_cache):
        fail(
            "expect.ts_cache",
            ", ".join(sorted(wanted_ts)) or "(empty)",
            ", ".join(sorted(result.ts_cache)) or "(empty)",
            smsts,
        )
    for name, value in (expect.variables or {}).items():
        # Empty and unset are one state in the product (setting "" deletes a variable).
        held = result.variables.get(name) or ""
        if held != value:
            fail(
                f"expect.variables.{name}",
                f"{name}={value!r}" if value else "not set",
                f"{name}={held!r}" if held else "not set",
                _excerpt(
                    "  smsts.log lines setting it",
                    [line for line in run.smsts if f" variable {name}=" in line],
                ),
            )
    leftovers = run.cache.staging_leftovers()
    if leftovers:
        fail(
            "expect",
            "no unverified download left in the cache",
            ", ".join(p.name for p in leftovers),
        )

    if expect.downloaded is not None:
        read = sorted({t.package_id for t in result.transfers if t.bytes > 0})
        if sorted(expect.downloaded) != read:
            fail(
                "expect.downloaded",
                ", ".join(sorted(expect.downloaded)) or "(none)",
                ", ".join(read) or "(none)",
                requests,
            )

    for endpoint in Endpoint.ALL:
        wanted = expect.requests.get(endpoint)
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

    for key, patterns, lines, title in (
        ("log", expect.log, run.smsts, "smsts.log"),
        ("gateway_log", expect.gateway_log, run.gateway_log, "gateway log"),
    ):
        for index, pattern in enumerate(patterns or ()):
            if any(re.search(pattern, line) for line in lines):
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
    for key, patterns, lines, title in (
        ("absent_log", expect.absent_log, run.smsts, "smsts.log"),
        ("absent_gateway_log", expect.absent_gateway_log, run.gateway_log, "gateway log"),
    ):
        for index, pattern in enumerate(patterns or ()):
            found = [line for line in lines if re.search(pattern, line)]
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

    if expect.egress_bytes is not None and not expect.egress_bytes.holds(run.egress_bytes):
        egress_lines = [line for line in run.gateway_log if "gress" in line]
        fail(
            "expect.egress_bytes",
            f"{_bounds(expect.egress_bytes, _size)} of egress",
            _size(run.egress_bytes)
            + (" (measured)" if scenario.cmg.measure_egress else " (manifest sizes)"),
            _excerpt("  egress lines in the gateway log", egress_lines) if egress_lines else "",
        )
    if expect.retries is not None and not expect.retries.holds(len(run.waits)):
        retry_lines = [line for line in run.smsts if _RETRY_LINE.search(line)]
        fail(
            "expect.retries",
            f"{_bounds(expect.retries)} retries",
            f"{len(run.waits)} (waits: {', '.join(f'{w:g}s' for w in run.waits) or 'none'})",
            _excerpt("  retry lines in smsts.log", retry_lines),
        )
    if expect.restarts is not None and not expect.restarts.holds(run.result.reboots):
        fail(
            "expect.restarts",
            f"{_bounds(expect.restarts)} restart(s) of the computer",
            f"{run.result.reboots}",
            _excerpt("  boots", run.boots) if run.boots else "  (every boot ran in-process)",
        )
    if expect.elapsed is not None and not expect.elapsed.holds(run.elapsed):
        fail(
            "expect.elapsed",
            f"{_bounds(expect.elapsed, show_seconds)} of virtual time",
            f"{show_seconds(run.elapsed)} (retry waits {show_seconds(sum(run.waits))})",
            timeline,
        )
    _check_throughput(scenario, run, fail)
    # In the order of the file, as a reader goes through it.
    return sorted(failures, key=lambda f: (str(f.path) != str(scenario.path), str(f.path), f.line))


def _check_storage(expect: Expectations, run: ScenarioRun, fail: Any) -> None:  # noqa: ANN401
    wants_bytes = expect.storage_bytes or {}
    if (wants_bytes or expect.storage_requests is not None) and run.storage is None:
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
    wanted_requests = expect.storage_requests
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
        if isinstance(event, StorageFaultEntry) and storage:
            context.append(_excerpt("  storage requests", _storage_lines(storage)))
        elif isinstance(event, GatewayFaultEntry):
            context.append(_excerpt("  gateway requests", [r.summary() for r in run.requests]))
        fault = isinstance(event, GatewayFaultEntry | StorageFaultEntry)
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
    for package_id, wanted in (scenario.expect.throughput or {}).items():
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
