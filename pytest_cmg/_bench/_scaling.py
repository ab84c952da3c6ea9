"""``bench --scaling``: how the core's cost grows, and how the fake CMG's request path scales.

Three tables (``--sweep workers,sizes,gateway``; all three by default), each measured in one run
on one in-memory Azurite, so every ratio compares figures taken under the same load:

* **workers**: the core (``DownloadCore(workers=N)``) and the verified ceiling
  (``raw-verified`` on ``N`` connections) on m1 and big, N in 1, 2, 4, 8, 16;
* **sizes**: the same two cases at the default workers on files of 16 KiB, 256 KiB, 1 MiB,
  16 MiB and 256 MiB, each point ``SIZE_POINT_BYTES`` (128 MiB) in as many files as that takes,
  at most ``SIZE_POINT_MAX_FILES`` (so 16 KiB moves 64 MiB) and at least one (so 256 MiB moves
  256 MiB);
* **gateway**: content-location requests followed by a manifest GET, through a real
  :class:`~pytest_cmg._gateway.server.FakeCMG` over HTTPS on loopback (in a process of its own,
  :mod:`._gatewayproc`) with token authentication, from 1, 10 and 50 concurrent clients. Each
  client is a thread with its own :class:`~pytest_cmg._client.cmg.CMGClient` (its own
  ``requests`` session), built by :func:`~pytest_cmg._client.factory.connection_for` as every
  client of this project is: the protocol path users get, not a hand-made request.

Rounds: every point of a table runs once per round, the points (and the two cases within a
point) in an order shuffled with the round number as seed, so all points see the same machine
state. Every loop is bounded: by ``rounds`` and the file counts, a gateway round by
``gateway_seconds`` and ``gateway_pairs``, the whole sweep by ``max_seconds``.

A point that measured nothing (no round, a round of no time, a gateway round in which no
request pair completed, a client that failed) raises :class:`ScalingError` naming the point:
a zero is never reported as a figure.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import select
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from ._cases import CASES, RAW_VERIFIED, CaseContext, Sample, server_cpu_seconds
from ._runner import Bench, BenchConfig, BenchError, fresh_folder, verify_output
from ._workloads import (
    FULL,
    KIB,
    MIB,
    QUICK,
    VERSION,
    Dataset,
    Workload,
    delete,
    package_id,
    parse_names,
    upload,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

    from .._client.cmg import CMGClient
    from .._storage.azurite import BlobEndpoint

__all__ = [
    "CORE_CASES",
    "FILE_SIZES",
    "GATEWAY_CLIENTS",
    "SIZE_POINT_BYTES",
    "SIZE_POINT_MAX_FILES",
    "SWEEPS",
    "WORKER_COUNTS",
    "ScalingConfig",
    "ScalingError",
    "parse_sweeps",
    "quick_config",
    "render_scaling",
    "run_scaling",
    "size_workload",
]

SWEEPS = ("workers", "sizes", "gateway")
WORKER_COUNTS = (1, 2, 4, 8, 16)
FILE_SIZES = (16 * KIB, 256 * KIB, MIB, 16 * MIB, 256 * MIB)
#: Bytes each point of the sizes table moves: enough for the rounds to last a second or more
#: at this machine's rates, few enough for 5 points x 2 cases x 3 rounds to take minutes.
SIZE_POINT_BYTES = 128 * MIB
#: 16 KiB files are capped here (64 MiB): 8,192 uploads and file creations per run would
#: measure the file system's inode allocation more than the download.
SIZE_POINT_MAX_FILES = 4096
GATEWAY_CLIENTS = (1, 10, 50)
#: The two cases of the core tables: the core and the verified ceiling it is judged by.
CORE_CASES = ("core", RAW_VERIFIED)
#: The package the gateway table locates: its manifest lists this many files (a mid-sized
#: package; the manifest's size is what the GET moves).
GATEWAY_PACKAGE = Workload("gw", 100, 16 * KIB)
#: Seconds a client may wait at the start line for the others (all are started first).
_START_TIMEOUT = 60.0
#: Seconds the gateway process may take to print its line.
_GATEWAY_START_TIMEOUT = 60.0
_MB = 1e6


class ScalingError(BenchError):
    """A point of ``bench --scaling`` could not be measured: it is reported, never as 0."""


def size_workload(
    size: int, target: int = SIZE_POINT_BYTES, max_files: int = SIZE_POINT_MAX_FILES
) -> Workload:
    """The sizes table's workload for files of ``size`` bytes: ``target`` bytes in whole files,
    at least one file and at most ``max_files``."""
    files = max(1, min(max_files, target // size))
    return Workload(f"s{_size_label(size)}", files, size)


def _size_label(size: int) -> str:
    return f"{size // MIB}m" if size % MIB == 0 else f"{size // KIB}k"


@dataclass(frozen=True)
class ScalingConfig:
    sweeps: tuple[str, ...] = SWEEPS
    rounds: int = 3
    worker_counts: tuple[int, ...] = WORKER_COUNTS
    #: The workloads of the workers table (m1 and big).
    worker_workloads: tuple[Workload, ...] = (FULL["m1"], FULL["big"])
    #: The workloads of the sizes table (:func:`size_workload` of each of ``FILE_SIZES``).
    size_workloads: tuple[Workload, ...] = tuple(size_workload(s) for s in FILE_SIZES)
    #: The core's workers in the sizes table.
    default_workers: int = 8
    gateway_clients: tuple[int, ...] = GATEWAY_CLIENTS
    #: A gateway round ends after this many seconds ...
    gateway_seconds: float = 5.0
    #: ... or once this many location+manifest pairs are done, whichever comes first.
    gateway_pairs: int = 20_000
    #: The whole sweep's bound: past it, the next run is not started and the sweep fails.
    max_seconds: float = 3600.0
    quick: bool = False
    workdir: Path | None = None
    log: Callable[[str], None] | None = field(default=None, compare=False)


def quick_config(**overrides: Any) -> ScalingConfig:  # noqa: ANN401 - ScalingConfig's fields
    """``--scaling --quick``: the same tables at a size that runs in well under a minute."""
    settings: dict[str, Any] = {
        "rounds": 1,
        "worker_counts": (1, 2, 8),
        "worker_workloads": (QUICK["m1"], QUICK["big"]),
        "size_workloads": tuple(
            size_workload(s, 8 * MIB, 256) for s in (16 * KIB, 256 * KIB, MIB, 16 * MIB)
        ),
        "gateway_clients": (1, 4),
        "gateway_seconds": 1.0,
        "quick": True,
    }
    settings.update(overrides)
    return ScalingConfig(**settings)


def parse_sweeps(text: str) -> tuple[str, ...]:
    """``"workers,gateway"`` -> ``("workers", "gateway")``; ``ValueError`` naming the unknown."""
    return parse_names(text, SWEEPS, "sweep")


# --- summaries: a point with no measurement is an error, not a zero ----------------------------


def _case_summary(
    point: str, case: str, workload: Workload, samples: Sequence[Sample]
) -> dict[str, Any]:
    if not samples:
        msg = f"scaling point {point}: case {case} has no measured round; nothing to report"
        raise ScalingError(msg)
    bad = [s.seconds for s in samples if not s.seconds > 0 or not math.isfinite(s.seconds)]
    if bad:
        msg = (
            f"scaling point {point}: case {case} has a round of {bad[0]!r} s; a download of "
            f"{workload.describe()} cannot take no time, so the clock or the case is broken"
        )
        raise ScalingError(msg)
    rates = [workload.total / _MB / s.seconds for s in samples]
    return {
        "mb_per_s": round(statistics.median(rates), 2),
        "min": round(min(rates), 2),
        "max": round(max(rates), 2),
        "files_per_s": round(statistics.median(workload.files / s.seconds for s in samples), 1),
        "cpu_percent": round(statistics.median(100 * s.cpu_seconds / s.seconds for s in samples)),
        "rounds": len(samples),
        "seconds": [round(s.seconds, 4) for s in samples],
    }


def _core_row(
    table: str, workload: Workload, workers: int, samples: dict[str, list[Sample]]
) -> dict[str, Any]:
    point = f"{table}: {workload.describe()} at workers={workers}"
    cases = {
        case: _case_summary(point, case, workload, samples.get(case, [])) for case in CORE_CASES
    }
    return {
        "workload": workload.name,
        "files": workload.files,
        "file_size": workload.file_size,
        "bytes": workload.total,
        "workers": workers,
        "cases": cases,
        "core/raw-verified": round(cases["core"]["mb_per_s"] / cases[RAW_VERIFIED]["mb_per_s"], 3),
    }


@dataclass
class _GatewayRound:
    pairs: int
    seconds: float
    location_ms: list[float]
    manifest_ms: list[float]
    client_cpu: float
    gateway_cpu: float | None


def _percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile (p99 of 100 values is the 99th smallest)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def _gateway_row(clients: int, rounds: Sequence[_GatewayRound]) -> dict[str, Any]:
    point = f"gateway: {clients} concurrent client(s)"
    if not rounds:
        msg = f"scaling point {point} has no measured round; nothing to report"
        raise ScalingError(msg)
    for number, measured in enumerate(rounds, 1):
        if measured.pairs < 1 or not measured.seconds > 0:
            msg = (
                f"scaling point {point}, round {number}: {measured.pairs} location+manifest "
                f"pair(s) in {measured.seconds:.3f} s; a round that completes none measured "
                "nothing (raise gateway_seconds, or look for the gateway's failure)"
            )
            raise ScalingError(msg)
    location = [ms for r in rounds for ms in r.location_ms]
    manifest = [ms for r in rounds for ms in r.manifest_ms]
    pair = [a + b for r in rounds for a, b in zip(r.location_ms, r.manifest_ms, strict=True)]
    pairs_per_s = statistics.median(r.pairs / r.seconds for r in rounds)
    gateway_cpu = [100 * r.gateway_cpu / r.seconds for r in rounds if r.gateway_cpu is not None]
    return {
        "clients": clients,
        "rounds": len(rounds),
        "pairs": sum(r.pairs for r in rounds),
        "pairs_per_s": round(pairs_per_s, 1),
        # Each pair is two requests: the location request (CCM_POST) and the manifest GET.
        "requests_per_s": round(2 * pairs_per_s, 1),
        "pairs_per_s_min": round(min(r.pairs / r.seconds for r in rounds), 1),
        "pairs_per_s_max": round(max(r.pairs / r.seconds for r in rounds), 1),
        "location_ms": {
            "p50": round(_percentile(location, 0.5), 2),
            "p99": round(_percentile(location, 0.99), 2),
        },
        "manifest_ms": {
            "p50": round(_percentile(manifest, 0.5), 2),
            "p99": round(_percentile(manifest, 0.99), 2),
        },
        "pair_ms": {
            "p50": round(_percentile(pair, 0.5), 2),
            "p99": round(_percentile(pair, 0.99), 2),
        },
        "client_cpu_percent": round(
            statistics.median(100 * r.client_cpu / r.seconds for r in rounds)
        ),
        "gateway_cpu_percent": round(statistics.median(gateway_cpu)) if gateway_cpu else None,
    }


# --- the gateway in its own process ------------------------------------------------------------


@dataclass(frozen=True)
class _RemoteGateway:
    """What :func:`connection_for` needs of a gateway, for one running in another process.

    Token authentication only: the gateway process issued a CCM token per client ID up front.
    """

    url: str
    ca_pem: Path
    site_code: str
    role_id: str
    tokens: dict[str, str]
    pid: int

    def issue_token(self, client_id: str) -> str:
        try:
            return self.tokens[client_id]
        except KeyError:
            msg = (
                f"the scaling gateway issued no token for {client_id!r}: pass it among the "
                "client_ids of the gateway process's job"
            )
            raise ScalingError(msg) from None

    def issue_client_certificate(self, client_id: str) -> NoReturn:
        msg = f"the scaling gateway serves token clients only, not a certificate for {client_id!r}"
        raise ScalingError(msg)

    def issue_aad_token(self, client_id: str) -> NoReturn:
        msg = f"the scaling gateway serves token clients only, not Azure AD for {client_id!r}"
        raise ScalingError(msg)


class _GatewayProcess:
    """``python -m pytest_cmg._bench._gatewayproc`` as a child, stopped by closing its stdin."""

    def __init__(
        self, endpoint: BlobEndpoint, container: str, client_ids: Sequence[str], workdir: Path
    ) -> None:
        self.job = {
            "endpoint": {
                "url": endpoint.url,
                "account_name": endpoint.account_name,
                "account_key": endpoint.account_key,
                "backend": endpoint.backend,
            },
            "container": container,
            "client_ids": list(client_ids),
            "workdir": str(workdir),
        }
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> _RemoteGateway:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pytest_cmg._bench._gatewayproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(self.job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], _GATEWAY_START_TIMEOUT)
        line = self.proc.stdout.readline() if ready else ""
        try:
            data = json.loads(line)
        except ValueError:
            data = {"error": f"no start line within {_GATEWAY_START_TIMEOUT:g} s: {line[:200]!r}"}
        if "error" in data:
            self.stop()
            msg = (
                f"the scaling gateway process (pid {self.proc.pid}) did not start: {data['error']}"
            )
            raise ScalingError(msg)
        return _RemoteGateway(
            data["url"],
            Path(data["ca_pem"]),
            data["site_code"],
            data["role_id"],
            data["tokens"],
            data["pid"],
        )

    def stop(self) -> str:
        """Close its stdin and wait (bounded) for it; return what it reported on the way out."""
        proc, self.proc = self.proc, None
        if proc is None:
            return ""
        try:
            # communicate() closes its stdin, which is what tells the gateway process to stop.
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()  # our own child, by its handle
            out, err = proc.communicate(timeout=30)
        if proc.returncode != 0:
            return f"exited {proc.returncode}: {(out + err).strip()[-500:]}"
        return ""


# --- the sweep ---------------------------------------------------------------------------------


class _Scaling:
    def __init__(self, config: ScalingConfig, bench: Bench) -> None:
        self.config = config
        self.bench = bench
        self.deadline = time.monotonic() + config.max_seconds
        self.loadavg: dict[str, list[float]] = {}

    def say(self, line: str) -> None:
        if self.config.log is not None:
            self.config.log(line)

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            msg = (
                f"bench --scaling ran past its bound of {self.config.max_seconds:g} s before "
                f"{what}; ask for fewer --rounds or fewer sweeps (--sweep)"
            )
            raise ScalingError(msg)

    def note_load(self, label: str) -> None:
        self.loadavg[label] = [round(x, 2) for x in os.getloadavg()]

    # --- core tables -------------------------------------------------------------------------

    def upload(self, workloads: Sequence[Workload], table: str) -> dict[str, Dataset]:
        datasets: dict[str, Dataset] = {}
        for workload in workloads:
            self.check_deadline(f"uploading {workload.describe()}")
            container = f"scale-{os.getpid()}-{table}-{workload.name}"
            self.say(f"{table}: uploading {workload.describe()}")
            try:
                dataset = upload(self.bench.endpoint, workload, container)
            except Exception as exc:
                msg = f"{table}: upload of {workload.describe()} to Azurite failed: {exc}"
                raise ScalingError(msg) from exc
            # The bytes are kept for the hashlib case only, which no table runs.
            datasets[workload.name] = replace(dataset, data=b"")
        return datasets

    def core_table(
        self, table: str, points: Sequence[tuple[Workload, int]]
    ) -> list[dict[str, Any]]:
        self.note_load(table)
        workloads = list({w.name: w for w, _ in points}.values())
        datasets = self.upload(workloads, table)
        samples: dict[tuple[str, int], dict[str, list[Sample]]] = {
            (w.name, n): {case: [] for case in CORE_CASES} for w, n in points
        }
        done = self.bench.workdir / "done"
        try:
            for round_no in range(1, self.config.rounds + 1):
                order = list(points)
                random.Random(round_no).shuffle(order)
                for workload, workers in order:
                    cases = list(CORE_CASES)
                    random.Random(f"{round_no}-{workload.name}-{workers}").shuffle(cases)
                    for case in cases:
                        label = (
                            f"{table} round {round_no}/{self.config.rounds} "
                            f"{workload.describe()} workers={workers} {case}"
                        )
                        self.check_deadline(label)
                        sample = self.run_case(datasets[workload.name], case, workers, label, done)
                        samples[(workload.name, workers)][case].append(sample)
        finally:
            for dataset in datasets.values():
                with contextlib.suppress(Exception):
                    delete(self.bench.endpoint, dataset.container)
            shutil.rmtree(done, ignore_errors=True)
        return [_core_row(table, w, n, samples[(w.name, n)]) for w, n in points]

    def run_case(self, dataset: Dataset, case: str, workers: int, label: str, done: Path) -> Sample:
        dest = fresh_folder(self.bench.workdir / "out" / case)
        ctx = CaseContext(dataset, dest, workers, self.bench.server_pid)
        try:
            sample = CASES[case].run(ctx)
            verify_output(dest, dataset)
        except Exception as exc:
            msg = f"{label}: {type(exc).__name__}: {exc}"
            raise ScalingError(msg) from exc
        finally:
            if dataset.workload.many and dest.exists():
                # Deleted at the table's end, as the bench does (_runner's docstring: ext4
                # charges the next file creations for recently deleted inodes).
                done.mkdir(parents=True, exist_ok=True)
                dest.rename(done / f"{len(list(done.iterdir()))}")
            else:
                shutil.rmtree(dest, ignore_errors=True)
        rate = dataset.workload.total / _MB / sample.seconds if sample.seconds > 0 else 0.0
        self.say(f"{label}: {sample.seconds:.3f} s, {rate:.1f} MB/s")
        return sample

    # --- gateway table -----------------------------------------------------------------------

    def gateway_table(self) -> list[dict[str, Any]]:
        self.note_load("gateway")
        clients = self.config.gateway_clients
        client_ids = [f"GUID:pytest-cmg-scale-{i:03d}" for i in range(max(clients))]
        datasets = self.upload([GATEWAY_PACKAGE], "gateway")
        dataset = datasets[GATEWAY_PACKAGE.name]
        process = _GatewayProcess(
            self.bench.endpoint, dataset.container, client_ids, self.bench.workdir / "gateway"
        )
        rounds: dict[int, list[_GatewayRound]] = {n: [] for n in clients}
        try:
            remote = process.start()
            self.say(
                f"gateway: fake CMG at {remote.url} (pid {remote.pid}), {len(client_ids)} token(s)"
            )
            for round_no in range(1, self.config.rounds + 1):
                order = list(clients)
                random.Random(round_no).shuffle(order)
                for count in order:
                    label = f"gateway round {round_no}/{self.config.rounds} {count} client(s)"
                    self.check_deadline(label)
                    measured = self.gateway_round(remote, client_ids[:count], label)
                    rounds[count].append(measured)
                    self.say(
                        f"{label}: {measured.pairs} pairs in {measured.seconds:.2f} s, "
                        f"{measured.pairs / measured.seconds if measured.seconds else 0:.0f} pairs/s"
                    )
        finally:
            exit_note = process.stop()
            with contextlib.suppress(Exception):
                delete(self.bench.endpoint, dataset.container)
        if exit_note:
            msg = f"the scaling gateway process {exit_note}"
            raise ScalingError(msg)
        return [_gateway_row(n, rounds[n]) for n in clients]

    def gateway_round(
        self, remote: _RemoteGateway, client_ids: Sequence[str], label: str
    ) -> _GatewayRound:
        from .._client.cmg import CMGClient
        from .._client.factory import connection_for
        from .._client.log import SmstsLog

        package = package_id(GATEWAY_PACKAGE)
        count = len(client_ids)
        per_client = max(1, self.config.gateway_pairs // count)
        stop_at: list[float] = []

        def go() -> None:
            # Run once, by the last thread to reach the line: the round's clock starts here,
            # after every client's warm-up, however long the fifty handshakes took.
            stop_at.append(time.perf_counter() + self.config.gateway_seconds)

        start = threading.Barrier(count + 1, action=go, timeout=_START_TIMEOUT)
        failures: list[str] = []
        latencies: list[list[tuple[float, float]]] = [[] for _ in client_ids]
        logs = self.bench.workdir / "gateway" / "clients"
        logs.mkdir(parents=True, exist_ok=True)

        def pair(client: CMGClient) -> tuple[float, float]:
            began = time.perf_counter()
            reply = client.locate(package, VERSION)
            located = time.perf_counter()
            record = next((r for r in reply.records if r.access_token is not None), None)
            if record is None:
                msg = f"the location reply for {package} offered no cloud record"
                raise ScalingError(msg)
            manifest = client.manifest(record)
            ended = time.perf_counter()
            if len(manifest.files) != GATEWAY_PACKAGE.files:
                listed, expected = len(manifest.files), GATEWAY_PACKAGE.files
                msg = f"the manifest of {package} lists {listed} files, not {expected}"
                raise ScalingError(msg)
            return (located - began) * 1e3, (ended - located) * 1e3

        def client_thread(index: int) -> None:
            client_id = client_ids[index]
            client: CMGClient | None = None
            try:
                log = SmstsLog(logs / f"{index:03d}.log")
                client = CMGClient(connection_for(remote, client_id), log)
                pair(client)  # untimed: the TLS handshake and the session's first connection
            except Exception as exc:  # collected, raised by the caller
                failures.append(f"client {client_id} (warm-up): {type(exc).__name__}: {exc}")
                with contextlib.suppress(threading.BrokenBarrierError):
                    start.abort()
                if client is not None:
                    client.close()
                return
            try:
                start.wait()
                mine = latencies[index]
                deadline = stop_at[0]
                while len(mine) < per_client and time.perf_counter() < deadline:
                    mine.append(pair(client))
            except threading.BrokenBarrierError:
                pass  # another client failed its warm-up: reported from there
            except Exception as exc:  # collected, raised by the caller
                failures.append(f"client {client_id}: {type(exc).__name__}: {exc}")
            finally:
                client.close()

        threads = [
            threading.Thread(target=client_thread, args=(i,), name=f"scale-client-{i}", daemon=True)
            for i in range(count)
        ]
        for thread in threads:
            thread.start()
        gateway_before = server_cpu_seconds(remote.pid)
        try:
            start.wait()
            cpu_before = time.process_time()
            gateway_before = server_cpu_seconds(remote.pid)
            began = time.perf_counter()
        except threading.BrokenBarrierError:
            began = cpu_before = time.perf_counter()
        for thread in threads:
            thread.join(timeout=self.config.gateway_seconds + 60)
        ended = time.perf_counter()
        cpu = time.process_time() - cpu_before
        gateway_after = server_cpu_seconds(remote.pid)
        if any(t.is_alive() for t in threads):
            failures.append(
                f"{sum(t.is_alive() for t in threads)} client(s) still running after the round's bound"
            )
        if failures:
            msg = f"{label}: {len(failures)} failure(s): {'; '.join(failures[:3])}"
            raise ScalingError(msg)
        pairs = [p for mine in latencies for p in mine]
        return _GatewayRound(
            len(pairs),
            ended - began,
            [p[0] for p in pairs],
            [p[1] for p in pairs],
            cpu,
            None
            if gateway_before is None or gateway_after is None
            else gateway_after - gateway_before,
        )


def run_scaling(config: ScalingConfig) -> dict[str, Any]:
    """Measure the tables ``config.sweeps`` names on a fresh Azurite; return the report."""
    from ._report import commit_info, machine_info

    started = time.monotonic()
    tables: dict[str, list[dict[str, Any]]] = {}
    bench_config = BenchConfig(
        workloads=(),
        rounds=config.rounds,
        aria2="never",
        memory=False,
        workdir=config.workdir,
        log=config.log,
    )
    load_start = [round(x, 2) for x in os.getloadavg()]
    with Bench(bench_config) as bench:
        scaling = _Scaling(config, bench)
        if "workers" in config.sweeps:
            points = [(w, n) for w in config.worker_workloads for n in config.worker_counts]
            tables["workers"] = scaling.core_table("workers", points)
        if "sizes" in config.sweeps:
            points = [(w, config.default_workers) for w in config.size_workloads]
            tables["sizes"] = scaling.core_table("sizes", points)
        if "gateway" in config.sweeps:
            tables["gateway"] = scaling.gateway_table()
        loadavg_during = scaling.loadavg
    for sweep in config.sweeps:
        if not tables.get(sweep):
            msg = f"bench --scaling: the {sweep} table has no point; nothing was measured"
            raise ScalingError(msg)
    from importlib import metadata

    try:
        version = metadata.version("pytest-cmg")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "machine_info": machine_info(),
        "commit_info": commit_info(),
        "datetime": datetime.now(UTC).isoformat(),
        "version": f"pytest-cmg {version}",
        "scaling": {
            "sweeps": list(config.sweeps),
            "rounds": config.rounds,
            "quick": config.quick,
            "default_workers": config.default_workers,
            "gateway_seconds": config.gateway_seconds,
            "gateway_pairs": config.gateway_pairs,
            "gateway_package": {
                "files": GATEWAY_PACKAGE.files,
                "file_size": GATEWAY_PACKAGE.file_size,
            },
            "elapsed_s": round(time.monotonic() - started, 1),
            "loadavg": {
                "start": load_start,
                **{f"{name} start": value for name, value in loadavg_during.items()},
                "end": [round(x, 2) for x in os.getloadavg()],
            },
            "tables": tables,
        },
    }


# --- rendering -----------------------------------------------------------------------------


def _size_text(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n // KIB} KiB"


def _core_lines(rows: Sequence[dict[str, Any]], first: str) -> list[str]:
    lines = [
        f"  {first:<22} {'core MB/s':>10} {'files/s':>9} {'rv MB/s':>9} {'files/s':>9} "
        f"{'core/rv':>8} {'core CPU%':>10} {'rv CPU%':>8}"
    ]
    for row in rows:
        core, rv = row["cases"]["core"], row["cases"][RAW_VERIFIED]
        if first == "workers":
            key = f"{row['workload']} x{row['workers']}"
        else:
            key = f"{row['files']} x {_size_text(row['file_size'])}"
        lines.append(
            f"  {key:<22} {core['mb_per_s']:>10.1f} {core['files_per_s']:>9.0f} "
            f"{rv['mb_per_s']:>9.1f} {rv['files_per_s']:>9.0f} {row['core/raw-verified']:>8.2f} "
            f"{core['cpu_percent']:>10} {rv['cpu_percent']:>8}"
        )
    return lines


def render_scaling(report: dict[str, Any]) -> str:
    """The three tables as text (rv: raw-verified; medians over the rounds)."""
    scaling = report["scaling"]
    tables = scaling["tables"]
    load = scaling["loadavg"]
    lines = [
        f"pytest-cmg bench --scaling: {scaling['rounds']} round(s), {os.cpu_count()} CPUs, "
        f"commit {report.get('commit_info', {}).get('id', '?')[:7]}, {scaling['elapsed_s']} s",
        "MB/s in 10^6 bytes, medians over rounds; rv = raw-verified, same run, same concurrency",
        "load average (1, 5, 15 min): "
        + "; ".join(f"{name} {' '.join(str(x) for x in value)}" for name, value in load.items()),
    ]
    if "workers" in tables:
        lines += ["", "core against workers (workload x workers)"]
        lines += _core_lines(tables["workers"], "workers")
    if "sizes" in tables:
        lines += [
            "",
            f"core against file size at workers={scaling['default_workers']} (files x size)",
        ]
        lines += _core_lines(tables["sizes"], "files x size")
    if "gateway" in tables:
        package = scaling["gateway_package"]
        lines += [
            "",
            "fake CMG: content location + manifest GET per client, HTTPS, token auth "
            f"(manifest of {package['files']} files; latencies in ms)",
            f"  {'clients':>7} {'pairs/s':>8} {'req/s':>8} {'loc p50':>8} {'loc p99':>8} "
            f"{'man p50':>8} {'man p99':>8} {'pair p50':>9} {'pair p99':>9} {'clientCPU%':>10} {'gwCPU%':>7}",
        ]
        for row in tables["gateway"]:
            gw = row["gateway_cpu_percent"]
            lines.append(
                f"  {row['clients']:>7} {row['pairs_per_s']:>8.0f} {row['requests_per_s']:>8.0f} "
                f"{row['location_ms']['p50']:>8.1f} {row['location_ms']['p99']:>8.1f} "
                f"{row['manifest_ms']['p50']:>8.1f} {row['manifest_ms']['p99']:>8.1f} "
                f"{row['pair_ms']['p50']:>9.1f} {row['pair_ms']['p99']:>9.1f} "
                f"{row['client_cpu_percent']:>10} {'-' if gw is None else gw:>7}"
            )
    return "\n".join(lines)
