"""The cases measured on each workload, each timed the way the pre-project measurements timed it.

Python clients are timed from the creation of their client or session to the last byte or hash
(imports and interpreter start-up excluded); aria2c and a ``--download-program`` on the wall
clock, process start included. CPU is the client's: ``process_time`` for in-process cases, the
child's rusage for aria2c and the program. Outputs are verified after the case returns, outside
the timed window (by the runner; the program's by ``_program.py``, as the engine reads an ACP's).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import BenchError
from .._util.service import Service
from ._rawget import get_all, get_all_verified

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    from ._aria2 import Aria2
    from ._program import ProgramGateway
    from ._workloads import Dataset

__all__ = [
    "CASES",
    "PROGRAM",
    "RAW_VERIFIED",
    "Case",
    "CaseContext",
    "Meter",
    "Sample",
    "server_cpu_seconds",
]

_CHUNK = 1 << 20
#: The pre-project measurements' SDK figures: download_blob(max_concurrency=8), and 8 threads for
#: many files.
SDK_CONCURRENCY = 8
_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The case of ``--download-program``, measured only when a program is given.
PROGRAM = "program"
#: The verified ceiling (``_rawget.get_all_verified``).
RAW_VERIFIED = "raw-verified"


def server_cpu_seconds(pid: int | None) -> float | None:
    """user+sys seconds of a process so far (Linux /proc), None when unknown."""
    if pid is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    except OSError:
        return None
    # The command name may hold spaces and parentheses: split after its closing one.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


@dataclass(frozen=True)
class Sample:
    """One timed run of one case."""

    seconds: float
    cpu_seconds: float
    server_cpu_seconds: float | None


class Meter(Service):
    """Wall clock, this process's CPU and the server's CPU over a ``with`` block."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.sample: Sample | None = None
        self._wall = self._cpu = 0.0
        self._server: float | None = None
        #: Set by a case whose work happens in a child process (its wait4 rusage).
        self.child_cpu: float | None = None

    def start(self) -> None:
        """Read the clocks: the block's run is measured from here."""
        self._server = server_cpu_seconds(self.server_pid)
        self._cpu = time.process_time()
        self._wall = time.perf_counter()

    def stop(self) -> None:
        """Read the clocks again and keep the difference as :attr:`sample`."""
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        server_now = server_cpu_seconds(self.server_pid)
        server = None if server_now is None or self._server is None else server_now - self._server
        if self.child_cpu is not None:
            cpu = self.child_cpu
        self.sample = Sample(wall, cpu, server)


@dataclass(frozen=True)
class CaseContext:
    dataset: Dataset
    #: An empty folder for the case's output (the runner deletes and verifies it).
    dest: Path
    workers: int
    server_pid: int | None
    aria2: Aria2 | None = None
    #: The gateway and program of ``--download-program``, when one was given.
    program: ProgramGateway | None = None


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    run: Callable[[CaseContext], Sample]
    #: Whether the case leaves files in ``dest`` that the runner must verify.
    writes: bool = True
    only_single: bool = False


def _measured(meter: Meter) -> Sample:
    assert meter.sample is not None
    return meter.sample


# --- the download core -----------------------------------------------------------------------


def run_core(ctx: CaseContext, *, fsync: bool = False) -> Sample:
    from .._client.download import DownloadCore

    meter = Meter(ctx.server_pid)
    core: DownloadCore | None = None
    try:
        with meter:
            core = DownloadCore(workers=ctx.workers, fsync=fsync)
            core.download(ctx.dataset.manifest, ctx.dest)
    finally:
        if core is not None:
            core.close()
    return _measured(meter)


# --- azure-storage-blob ----------------------------------------------------------------------


class _HashingWriter:
    """A write-only stream that hashes what the SDK writes on its way to the file."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        return self.out.write(data)


def run_sdk(ctx: CaseContext) -> Sample:
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobClient

    files = ctx.dataset.manifest.files
    meter = Meter(ctx.server_pid)
    if not ctx.dataset.workload.many:
        item = files[0]
        with meter:
            transport = RequestsTransport(use_env_settings=False)
            with (
                BlobClient.from_blob_url(item.url, transport=transport) as client,
                (ctx.dest / item.relpath).open("wb") as out,
            ):
                client.download_blob(max_concurrency=SDK_CONCURRENCY).readinto(out)
        return _measured(meter)

    mismatches: list[str] = []
    with meter:
        # One transport (one connection pool) for all blobs, as one client process would have.
        transport = RequestsTransport(use_env_settings=False)
        transport.open()

        def fetch(index: int) -> None:
            item = files[index]
            client = BlobClient.from_blob_url(item.url, transport=transport)
            with (ctx.dest / item.relpath).open("wb") as out:
                writer = _HashingWriter(out)
                client.download_blob().readinto(writer)  # type: ignore[arg-type]
            if writer.digest.hexdigest() != item.sha256:
                mismatches.append(item.relpath)

        with ThreadPoolExecutor(max_workers=SDK_CONCURRENCY) as pool:
            list(pool.map(fetch, range(len(files))))
        transport.close()
    if mismatches:
        msg = f"sdk: SHA-256 mismatch for {', '.join(mismatches[:5])}"
        raise BenchError(msg)
    return _measured(meter)


# --- aria2c ----------------------------------------------------------------------------------


def run_aria2(ctx: CaseContext) -> Sample:
    assert ctx.aria2 is not None
    item = ctx.dataset.manifest.files[0]
    argv = ctx.aria2.command(ctx.dest, item.relpath, item.url)
    env = ctx.aria2.env()
    meter = Meter(ctx.server_pid)
    with meter:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        # wait4 reaps this very child and gives its own rusage (RUSAGE_CHILDREN would add
        # every other child this process ever waited for, Azurite's npm included).
        _, status, usage = os.wait4(proc.pid, 0)
        meter.child_cpu = usage.ru_utime + usage.ru_stime
    proc.returncode = os.waitstatus_to_exitcode(status)
    output = proc.stdout.read().decode("utf-8", "replace") if proc.stdout else ""
    if proc.stdout:
        proc.stdout.close()
    if proc.returncode != 0:
        msg = f"aria2c exited {proc.returncode}: {output.strip()[-300:]}"
        raise BenchError(msg)
    return _measured(meter)


# --- the raw ceiling: plain keep-alive GETs, bytes discarded -----------------------------------


def run_raw(ctx: CaseContext) -> Sample:
    files = ctx.dataset.manifest.files
    meter = Meter(ctx.server_pid)
    # One connection for the big blob; the core's concurrency for many files.
    with meter:
        received = get_all([f.url for f in files], workers=ctx.workers)
    if received != ctx.dataset.workload.total:
        msg = f"raw: received {received} bytes, expected {ctx.dataset.workload.total}"
        raise BenchError(msg)
    return _measured(meter)


# --- the verified ceiling: the same GETs, every byte hashed and written -------------------------


def run_raw_verified(ctx: CaseContext) -> Sample:
    files = ctx.dataset.manifest.files
    paths = [ctx.dest / f.relpath for f in files]
    # Folders before the clock, as the core makes each once per download (none for the flat
    # bench workloads): the timed loop is the GETs, the hash and the writes.
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    meter = Meter(ctx.server_pid)
    with meter:
        received = get_all_verified(
            [f.url for f in files],
            [str(p) for p in paths],
            [f.sha256.lower() for f in files],
            workers=ctx.workers,
        )
    if received != ctx.dataset.workload.total:
        msg = f"raw-verified: received {received} bytes, expected {ctx.dataset.workload.total}"
        raise BenchError(msg)
    return _measured(meter)


# --- the hashing ceiling -------------------------------------------------------------------


def run_hashlib(ctx: CaseContext) -> Sample:
    view = memoryview(ctx.dataset.data)
    meter = Meter(None)
    with meter:
        digest = hashlib.sha256()
        for offset in range(0, len(view), _CHUNK):
            digest.update(view[offset : offset + _CHUNK])
        digest.hexdigest()
    return _measured(meter)


# --- a download program (--download-program) ------------------------------------------------


def run_program(ctx: CaseContext) -> Sample:
    assert ctx.program is not None
    return ctx.program.run(ctx)


CASES: dict[str, Case] = {
    "core": Case(
        "core", "DownloadCore into a fresh folder: SHA-256 verified, files written", run_core
    ),
    # What power-cut durability costs, beside the default (which survives the process dying).
    "core-fsync": Case(
        "core-fsync",
        "DownloadCore(fsync=True): the same, with checkpoints and the file fdatasync'd",
        lambda ctx: run_core(ctx, fsync=True),
        only_single=True,
    ),
    "sdk": Case(
        "sdk",
        "azure-storage-blob download_blob(max_concurrency=8).readinto(file), no hash (big); "
        "8 threads of download_blob().readinto(file) with SHA-256 while writing (many files)",
        run_sdk,
    ),
    "aria2c": Case(
        "aria2c",
        "aria2c -x8 -s8 -k1M to a file, no checksum, wall clock",
        run_aria2,
        only_single=True,
    ),
    "raw": Case(
        "raw",
        "http.client keep-alive GETs, bytes discarded (1 connection for the big blob, the "
        "core's concurrency for many files)",
        run_raw,
        writes=False,
    ),
    # What a verified download costs on this stack and machine: the ceiling the targets use.
    RAW_VERIFIED: Case(
        RAW_VERIFIED,
        "the raw case's GET loop, every chunk also fed to SHA-256 and written to its file "
        "(readinto, update, write), digest compared per file; same connections as raw",
        run_raw_verified,
    ),
    "hashlib": Case(
        "hashlib",
        "hashlib.sha256 over the same bytes from memory, 1 MiB updates, one core",
        run_hashlib,
        writes=False,
    ),
    PROGRAM: Case(
        PROGRAM,
        "the --download-program run as the task sequence runs SMSTSDownloadProgram: INI, "
        "manifest through the fake CMG, SAS downloads; wall clock from its start to its exit",
        run_program,
        # Checked by the case itself, as the engine reads what an ACP delivered (read_folder).
        writes=False,
    ),
}
