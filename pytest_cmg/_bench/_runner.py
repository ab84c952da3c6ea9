"""One benchmark run: an in-memory Azurite, each workload uploaded once, cases in shuffled rounds.

Per round every case of a workload runs once, in an order shuffled with the round number as seed
(the pre-project measurements' method), so all cases see the same machine state; each run writes
into a fresh folder, verified after it (sizes and SHA-256), neither step timed.

Outputs of many-file workloads are deleted only after the workload's last round, not between
runs. On this machine kind's ext4 (no journal), creating a file right after thousands were deleted
costs ~0.5-0.7 ms of kernel CPU per file (``find_inode_bit`` skips recently deleted inodes,
reading an inode-table block for each), against ~0.03 ms otherwise; deleting 2,000 files between
runs made every writing case pay that for the previous run's clean-up, which no download does
(measured: core / raw GET loop on 2,000 x 16 KiB fell from 1.08 to 0.63). Single big files are
deleted at once: one inode costs nothing, and keeping 256 MiB files would leave their dirty pages
to be written back during later runs.

The core's peak memory on the big blob is measured once more, untimed, in a child process
(:mod:`._memprobe`).

With a ``--download-program``, a fake CMG is started beside Azurite for the whole run and serves
each workload's container while the workload runs (:mod:`._program`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import BenchError, NotRunningError
from .._util.service import Service
from ._aria2 import Aria2, resolve_aria2
from ._cases import CASES, PROGRAM, CaseContext
from ._report import CaseResult, MemoryProbe, WorkloadResult, build_report
from ._workloads import FULL, QUICK, Dataset, delete, upload

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Self

    from .._storage.azurite import AzuriteProcess, BlobEndpoint
    from ._program import ProgramGateway

__all__ = ["Bench", "BenchConfig", "BenchError", "fresh_folder", "verify_output"]

_MEMPROBE_TIMEOUT = 600.0
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class BenchConfig:
    workloads: tuple[str, ...] = ("big", "m1", "k16")
    rounds: int = 5
    quick: bool = False
    #: The core's ``workers``, and the raw ceiling's connections on many-file workloads.
    workers: int = 8
    #: One of ``_aria2.ARIA2_MODES``.
    aria2: str = "auto"
    memory: bool = True
    workdir: Path | None = None
    log: Callable[[str], None] | None = field(default=None, compare=False)
    #: ``--download-program``: a command line (``_program.check_program``'s), or None.
    download_program: str | None = None


def verify_output(dest: Path, dataset: Dataset) -> None:
    """``dest`` holds exactly the workload's files, each of its size and SHA-256; else BenchError."""
    expected = {f.relpath: f for f in dataset.manifest.files}
    found = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    if found != set(expected):
        extra, missing = sorted(found - set(expected)), sorted(set(expected) - found)
        msg = f"output files differ: missing {missing[:5]}, unexpected {extra[:5]}"
        raise BenchError(msg)
    for relpath, item in expected.items():
        path = dest / relpath
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
                digest.update(chunk)
        if path.stat().st_size != item.size or digest.hexdigest() != item.sha256:
            msg = f"{relpath}: wrong size or SHA-256 after download"
            raise BenchError(msg)


def fresh_folder(folder: Path) -> Path:
    """``folder``, emptied (created if missing)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


class Bench(Service):
    """Start with :meth:`start` (or ``with``), then :meth:`run_workload` per workload."""

    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.sizes = QUICK if config.quick else FULL
        self.aria2: Aria2 | None = None
        self.aria2_reason = ""
        self.results: list[WorkloadResult] = []
        self._azurite: AzuriteProcess | None = None
        self._endpoint: BlobEndpoint | None = None
        self._workdir: Path | None = None
        self._own_workdir = False
        self._program: ProgramGateway | None = None
        self._loadavg: list[float] = []
        self._started = 0.0

    def _say(self, line: str) -> None:
        if self.config.log is not None:
            self.config.log(line)

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Self:
        if self._endpoint is not None:
            return self
        from .._errors import PytestCmgError
        from .._storage.azurite import AzuriteProcess

        self._loadavg = list(os.getloadavg())
        self._started = time.monotonic()
        found = resolve_aria2(self.config.aria2)
        if isinstance(found, Aria2):
            self.aria2 = found
            self._say(f"aria2c {found.version} from {found.source}")
        else:
            self.aria2_reason = found
            self._say(f"aria2c {found}")
        try:
            if self.config.workdir is None:
                self._workdir = Path(tempfile.mkdtemp(prefix="pytest-cmg-bench-"))
                self._own_workdir = True
            else:
                self.config.workdir.mkdir(parents=True, exist_ok=True)
                self._workdir = self.config.workdir
        except OSError as exc:
            where = self.config.workdir or tempfile.gettempdir()
            msg = (
                f"the benchmark's work folder cannot be made in {where} ({exc}): every case "
                "writes its output there; pass a writable folder (--workdir)"
            )
            raise BenchError(msg) from exc
        azurite = AzuriteProcess()
        try:
            self._endpoint = azurite.start()
        except PytestCmgError as exc:
            msg = f"Azurite could not start: {exc}"
            raise BenchError(msg) from exc
        self._azurite = azurite
        self._say(f"Azurite in memory at {self._endpoint.url} (pid {azurite.pid})")
        if self.config.download_program is not None:
            try:
                self._start_program(self.config.download_program, self._endpoint, self._workdir)
            except BaseException:
                self.stop()  # ``with`` calls no __exit__ when __enter__ raises: Azurite is ours
                raise
        return self

    def _start_program(self, program: str, endpoint: BlobEndpoint, workdir: Path) -> None:
        from .._errors import PytestCmgError
        from ._program import ProgramGateway

        gateway = ProgramGateway(program, endpoint, workdir / "program")
        try:
            gateway.start()
        except (PytestCmgError, OSError, ValueError) as exc:
            gateway.stop()
            msg = f"the fake CMG for --download-program could not start: {exc}"
            raise BenchError(msg) from exc
        self._program = gateway
        self._say(f"fake CMG at {gateway.url} for the download program {program!r}")

    def stop(self) -> None:
        if self._program is not None:
            self._program.stop()
            self._program = None
        if self._azurite is not None:
            self._azurite.stop()
            self._azurite = None
        self._endpoint = None
        if self._own_workdir and self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    @property
    def endpoint(self) -> BlobEndpoint:
        """The running Azurite's endpoint (``bench --scaling`` uploads its own workloads to it)."""
        if self._endpoint is None:
            msg = "the benchmark's Azurite is not running: call start() (or use `with`) first"
            raise NotRunningError(msg)
        return self._endpoint

    @property
    def server_pid(self) -> int | None:
        """Azurite's pid, whose CPU each sample measures; None when not running."""
        return self._azurite.pid if self._azurite is not None else None

    @property
    def workdir(self) -> Path:
        """Where outputs are written while the benchmark runs."""
        if self._workdir is None:
            msg = "the benchmark has no work folder until start() (or `with`) is called"
            raise NotRunningError(msg)
        return self._workdir

    # --- measuring ----------------------------------------------------------------------

    def run(self) -> list[WorkloadResult]:
        for name in self.config.workloads:
            self.run_workload(name)
        return self.results

    def _case_names(self, many: bool) -> list[str]:
        names = []
        for name, case in CASES.items():
            if case.only_single and many:
                continue
            if name == "aria2c" and self.aria2 is None:
                continue
            if name == PROGRAM and self._program is None:
                continue
            names.append(name)
        return names

    def run_workload(self, name: str) -> WorkloadResult:
        """Upload the workload, run every case ``rounds`` times, delete the blobs."""
        self.start()
        assert self._endpoint is not None and self._workdir is not None
        workload = self.sizes[name]
        result = WorkloadResult(workload)
        if not workload.many and self.aria2 is None:
            result.unavailable["aria2c"] = self.aria2_reason
        container = f"bench-{os.getpid()}-{name}"
        self._say(f"{name}: uploading {workload.describe()}")
        try:
            dataset = upload(self._endpoint, workload, container)
        except Exception as exc:
            msg = f"{name}: upload to Azurite failed: {exc}"
            raise BenchError(msg) from exc
        try:
            names = self._case_names(workload.many)
            for case_name in names:
                description = CASES[case_name].description
                if case_name == PROGRAM:
                    description = f"{description}: {self.config.download_program}"
                result.cases[case_name] = CaseResult(case_name, description)
            if self._program is not None:
                self._program.serve(dataset)
            server_pid = self._azurite.pid if self._azurite else None
            for round_no in range(1, self.config.rounds + 1):
                order = list(names)
                random.Random(round_no).shuffle(order)
                for case_name in order:
                    if case_name not in result.cases:
                        continue  # dropped earlier in this run (aria2c failed)
                    self._run_case(result, case_name, dataset, server_pid, round_no)
            if self.config.memory and not workload.many and "core" in names:
                result.memory = self._memory_probe(dataset)
        finally:
            if self._program is not None:
                self._program.release()
            with contextlib.suppress(Exception):
                delete(self._endpoint, container)
            shutil.rmtree(self._workdir / "done", ignore_errors=True)
        self.results.append(result)
        return result

    def _run_case(
        self,
        result: WorkloadResult,
        case_name: str,
        dataset: Dataset,
        server_pid: int | None,
        round_no: int,
    ) -> None:
        assert self._workdir is not None
        case = CASES[case_name]
        dest = fresh_folder(self._workdir / "out" / case_name)
        ctx = CaseContext(dataset, dest, self.config.workers, server_pid, self.aria2, self._program)
        label = f"{dataset.workload.name} round {round_no}/{self.config.rounds} {case_name}"
        try:
            sample = case.run(ctx)
            if case.writes:
                verify_output(dest, dataset)
        except Exception as exc:
            if case_name == "aria2c":
                # An external tool that breaks is reported, not allowed to sink the run.
                del result.cases[case_name]
                result.unavailable[case_name] = f"not available: failed in round {round_no}: {exc}"
                self._say(f"{label}: {result.unavailable[case_name]}")
                return
            msg = f"{label}: {type(exc).__name__}: {exc}"
            raise BenchError(msg) from exc
        finally:
            if dataset.workload.many and dest.exists():
                # Kept until the workload ends (module docstring): a rename costs no inodes.
                done = self._workdir / "done"
                done.mkdir(exist_ok=True)
                dest.rename(done / f"{case_name}-{round_no}")
            else:
                shutil.rmtree(dest, ignore_errors=True)
        result.cases[case_name].samples.append(sample)
        rate = dataset.workload.total / 1e6 / sample.seconds
        self._say(f"{label}: {sample.seconds:.3f} s, {rate:.1f} MB/s")

    def _memory_probe(self, dataset: Dataset) -> MemoryProbe | None:
        assert self._workdir is not None
        dest = fresh_folder(self._workdir / "out" / "memprobe")
        job = {
            "manifest": dataset.manifest.to_xml(),
            "dest": str(dest),
            "workers": self.config.workers,
        }
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pytest_cmg._bench._memprobe"],
                input=json.dumps(job),
                capture_output=True,
                text=True,
                timeout=_MEMPROBE_TIMEOUT,
                check=False,
            )
            if proc.returncode != 0:
                msg = f"memory probe exited {proc.returncode}: {proc.stderr.strip()[-500:]}"
                raise BenchError(msg)
            verify_output(dest, dataset)
            data = json.loads(proc.stdout.strip().splitlines()[-1])
        except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
            msg = f"memory probe failed: {exc}"
            raise BenchError(msg) from exc
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if math.isnan(float(data["peak_mib"])):
            self._say(f"{dataset.workload.name}: no peak memory figure (no /proc/self/status)")
            return None
        probe = MemoryProbe(
            float(data["peak_mib"]),
            float(data["baseline_mib"]),
            float(data["seconds"]),
            "VmHWM of a child process running DownloadCore alone",
        )
        self._say(f"{dataset.workload.name}: core peak memory {probe.peak_mib:.1f} MiB")
        return probe

    # --- reporting ----------------------------------------------------------------------

    def report(self, results: list[WorkloadResult] | None = None) -> dict[str, Any]:
        from importlib import metadata

        from .._storage.azurite import AZURITE_VERSION

        try:
            version = metadata.version("pytest-cmg")
        except metadata.PackageNotFoundError:
            version = "unknown"
        settings: dict[str, Any] = {
            "version": f"pytest-cmg {version}",
            "rounds": self.config.rounds,
            "quick": self.config.quick,
            "workers": self.config.workers,
            "azurite": AZURITE_VERSION,
            "persistence": "in-memory",
            "aria2c": (
                {"version": self.aria2.version, "source": self.aria2.source}
                if self.aria2
                else {"reason": self.aria2_reason}
            ),
            "download_program": self.config.download_program,
            "elapsed_s": round(time.monotonic() - self._started, 1),
            "loadavg": {
                "start": [round(x, 2) for x in self._loadavg],
                "end": [round(x, 2) for x in os.getloadavg()],
            },
        }
        return build_report(self.results if results is None else results, settings)
