"""``python -m pytest_cmg client``: this project's own client against a served gateway."""

from __future__ import annotations

import errno
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from .._client.cache import ClientCache
    from .._client.engine import (
        CMGConnection,
        TaskSequence,
        TaskSequenceResult,
    )
    from .._client.log import SmstsLog
    from .._protocol.settings import ClientSettings, DeploymentSettings

from .common import CONTRACT_VERSION, one_line, read_scenario

__all__ = ["client"]


class _ProgressBar:
    """A one-line bar on stderr, redrawn at most every 0.2 s; only when stderr is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.label = ""
        self.total = self.done = 0
        self.files = self.files_done = 0
        self._drawn = 0.0
        self._lock = threading.Lock()

    def job(self, package_id: str, version: int, files: int, total: int) -> None:
        with self._lock:
            self.label = f"{package_id}.{version}"
            self.total, self.done, self.files, self.files_done = total, 0, files, 0
        self._draw(force=True)

    def advance(self, new_bytes: int, files_done: int) -> None:
        with self._lock:
            self.done += new_bytes
            self.files_done += files_done
        self._draw(force=files_done > 0)

    def _draw(self, *, force: bool) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with self._lock:
            if not force and now - self._drawn < 0.2:
                return
            self._drawn = now
            share = self.done / self.total if self.total else 1.0
            filled = int(share * 30)
            line = (
                f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {share:4.0%} "
                f"{self.done / 2**20:7.1f}/{self.total / 2**20:.1f} MiB "
                f"{self.files_done}/{self.files} files"
            )
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.label:
            sys.stderr.write("\n")


def _connection_problem(error: Exception) -> str:
    """Why a connection file cannot be used, in words (never an exception's repr)."""
    if isinstance(error, KeyError):
        return (
            f"its JSON line has no {error.args[0]!r} field (give the line serve printed; "
            f"contract version {CONTRACT_VERSION})"
        )
    if isinstance(error, json.JSONDecodeError):
        return f"its first line is not JSON ({error.msg} at character {error.pos})"
    if isinstance(error, OSError):
        return f"it cannot be read ({error.strerror or error})"
    if isinstance(error, TypeError):
        return f"a field of its JSON line has the wrong type ({error})"
    return str(error)


def client(args: argparse.Namespace) -> int:
    from .._client.engine import CMGConnection, Step, TaskSequence
    from .._client.factory import build_engine
    from .._client.log import SmstsLog
    from .._protocol.settings import CURRENT_SITE_VERSION, DeploymentSettings

    try:
        text = sys.stdin.readline() if args.connection == "-" else Path(args.connection).read_text()
        lines = text.strip().splitlines()
        if not lines:
            msg = "it holds no line (is serve still starting? its JSON line comes when it is ready)"
            raise ValueError(msg)
        contract = json.loads(lines[0])
        if not isinstance(contract, dict):
            msg = "its first line is JSON but not an object (give serve's JSON line)"
            raise ValueError(msg)
        connection = CMGConnection(
            cmg_url=contract["cmg_url"],
            ca_cert=Path(contract["ca_cert"]),
            site_code=contract["site_code"],
            mp_role_id=contract["mp_role_id"],
            client_id=contract["client_id"],
            token=contract["token"] if args.auth == "token" else None,
            client_cert=Path(contract["client_cert"]) if args.auth == "certificate" else None,
            client_key=Path(contract["client_key"]) if args.auth == "certificate" else None,
            aad_token=contract["aad_token"] if args.auth == "azure_ad" else None,
        )
        storage_ca = contract.get("storage_ca_cert")
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(
            f"cannot use connection {args.connection!r}: {_connection_problem(error)}",
            file=sys.stderr,
        )
        return 2

    launch, deployment, site_version, settings = "software_center", DeploymentSettings(), None, None
    if args.task_sequence is not None:
        scenario = read_scenario(args.task_sequence, "client", args.case)
        if scenario is None:
            return 2
        sequence = scenario.task_sequence
        launch, deployment = scenario.launch, scenario.deployment
        site_version, settings = scenario.cmg.site_version, scenario.client
    else:
        known = {p["id"]: p["version"] for p in contract.get("packages", [])}
        steps, versions = [], {}
        for spec in args.package:
            package_id, _, version = spec.partition(":")
            if version and not version.isdigit():
                print(f"--package {spec!r}: the version must be a number", file=sys.stderr)
                return 2
            versions[package_id] = int(version) if version else int(known.get(package_id, 1))
            steps.append(Step(f"Download {package_id}", "download_package_content", package_id))
        sequence = TaskSequence("CLIENT01", "Download package content", tuple(steps), versions)

    # The client's own paths, before anything is fetched: a path that cannot be what its option
    # asks for (a file given as --cache, a folder that cannot be made, no right to write) is
    # bad usage, told in the summary like any other end of a run.
    cache = _log_path_problem(args.log) or _open_cache(args.cache)
    if isinstance(cache, _LocalProblem):
        print(f"pytest-cmg client: {cache.message}", file=sys.stderr)
        _print_summary(_summary(args, "error", cache.hresult, cache.message))
        return 2 if cache.usage else 1

    if sequence.restarts:
        return _client_boots(
            args,
            connection,
            sequence,
            launch,
            deployment,
            settings,
            cache,
            (Path(storage_ca) if storage_ca else None),
            site_version or CURRENT_SITE_VERSION,
        )

    bar = _ProgressBar(enabled=sys.stderr.isatty() and not args.no_progress)
    log = SmstsLog(args.log)
    engine = build_engine(
        connection,
        Path(args.log).parent,
        log=log,
        cache=cache,
        settings=settings,
        deployment=deployment,
        storage_ca_file=Path(storage_ca) if storage_ca else None,
        site_version=site_version or CURRENT_SITE_VERSION,
        on_progress=bar.advance,
        fsync=args.fsync,
    )
    engine.on_job = bar.job
    try:
        try:
            result = engine.run(sequence, launch)
        finally:
            engine.close()
            bar.close()
    except OSError as error:
        # Past the engine, which reports a full disk under a download as the product does
        # (0x87D01201): the cache's own files (locks, index, staging), or an I/O error.
        filename = os.fsdecode(error.filename) if error.filename is not None else None
        if filename is None or _under(Path(filename), args.cache):
            problem = _LocalProblem.of(error, "--cache", args.cache, "the client cache")
        else:
            problem = _LocalProblem.of(error, "", Path(filename), "a file of the client")
        print(f"pytest-cmg client: {problem.message}", file=sys.stderr)
        _print_summary(_summary(args, "error", problem.hresult, problem.message, log=log))
        return 1
    if log.write_error is not None:
        print(f"pytest-cmg client: warning: {_log_lost(args.log, log)}", file=sys.stderr)
    outcome = "success" if result.succeeded else "failure"
    error_text = str(result.error) if result.error else None
    summary = _summary(args, outcome, result.exit_code, error_text, result, log)
    summary["client_paths"] = result.paths
    if not _print_summary(summary):
        return 1
    return 0 if result.succeeded else 1


def _client_boots(
    args: argparse.Namespace,
    connection: CMGConnection,
    sequence: TaskSequence,
    launch: str,
    deployment: DeploymentSettings,
    settings: ClientSettings | None,
    cache: ClientCache,
    storage_ca: Path | None,
    site_version: int,
) -> int:
    """A task sequence that restarts the computer: each boot a new process, as in a scenario
    (docs/emulation.md, "Restarts"). Time is the wall clock; a restart takes none of it."""
    import time

    from .._client.boot import BootError, BootHost, BootSpec

    spec = BootSpec(
        connection=connection,
        folder=Path(args.log).parent,
        sequence=sequence,
        launch=launch,
        cache_mb=cache.capacity // 2**20,
        settings=settings,
        deployment=deployment,
        site_version=site_version,
        storage_ca_file=storage_ca,
        cache_root=cache.root,
        log_path=Path(args.log),
        fsync=args.fsync,
    )
    started = time.monotonic()
    host = BootHost(
        clock=lambda: time.monotonic() - started,
        sleep=time.sleep,
        pass_time=lambda seconds: None,
        restart_takes=0.0,
    )
    try:
        result = host.run(spec)
    except BootError as error:
        print(f"pytest-cmg client: {error}", file=sys.stderr)
        _print_summary(_summary(args, "error", _E_FAIL, str(error).splitlines()[0]))
        return 1
    for line in host.boots:
        print(f"pytest-cmg client: {line}", file=sys.stderr)
    outcome = "success" if result.succeeded else "failure"
    error_text = str(result.error) if result.error else None
    summary = _summary(args, outcome, result.exit_code, error_text, result)
    summary["client_paths"] = result.paths
    if not _print_summary(summary):
        return 1
    return 0 if result.succeeded else 1


#: HRESULT_FROM_WIN32 of the Windows error a client meets where Linux gives each errno: what
#: the product would report for the same trouble with its cache or log.
_HRESULTS = {
    errno.ENOSPC: 0x80070070,  # ERROR_DISK_FULL
    errno.EDQUOT: 0x80070070,
    errno.ENOENT: 0x80070003,  # ERROR_PATH_NOT_FOUND
    errno.ENOTDIR: 0x80070003,
    errno.EEXIST: 0x80070003,  # a file where a folder is needed: what is under it is not found
    errno.EACCES: 0x80070005,  # ERROR_ACCESS_DENIED
    errno.EPERM: 0x80070005,
    errno.EISDIR: 0x80070005,  # Windows denies opening a folder as a file
    errno.EROFS: 0x80070013,  # ERROR_WRITE_PROTECT
    errno.EIO: 0x8007045D,  # ERROR_IO_DEVICE
    errno.ENAMETOOLONG: 0x800700CE,  # ERROR_FILENAME_EXCED_RANGE
}
#: E_FAIL, for an errno with no closer Windows error.
_E_FAIL = 0x80004005
#: Errors that say the path given is wrong for its use (bad usage, exit 2); the others (a full
#: disk, an I/O error) are the machine's trouble, and fail the run (exit 1).
_PATH_ERRNOS = frozenset(
    {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EEXIST,
        errno.EISDIR,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
        errno.ENAMETOOLONG,
        errno.ELOOP,
    }
)
_FIXES = {
    errno.ENOSPC: "free space on that disk or choose a folder on another one",
    errno.EDQUOT: "free space within this user's quota or choose a folder on another disk",
    errno.ENOENT: "create the folder or choose an existing one",
    errno.ENOTDIR: "a file stands where a folder is needed: choose another path or move the file",
    errno.EEXIST: "a file stands where a folder is needed: choose another path or move the file",
    errno.EISDIR: "it is a folder: name a file",
    errno.EACCES: "choose a folder this user may write to, or change its permissions",
    errno.EPERM: "choose a folder this user may write to, or change its permissions",
    errno.EROFS: "the file system is read-only: choose a folder on a writable one",
    errno.EIO: "the device reported an I/O error: check the disk, or choose a folder on another",
    errno.ENAMETOOLONG: "choose a shorter path",
}


@dataclass(frozen=True)
class _LocalProblem:
    """A path of the client's own that cannot be used: the HRESULT and a message naming the
    path, the rule and the fix; ``usage`` says the path given is wrong (exit 2)."""

    hresult: int
    message: str
    usage: bool

    @classmethod
    def of(cls, error: OSError, option: str, path: Path, what: str) -> _LocalProblem:
        """From ``error`` met at ``path`` (given as ``option``, if an option gave it)."""
        number = error.errno or 0
        hresult = _HRESULTS.get(number, _E_FAIL)
        name = errno.errorcode.get(number, "no errno")
        head = f"{what} ({option} {path})" if option else f"{what} ({path})"
        filename = os.fsdecode(error.filename) if error.filename is not None else None
        at = f" {filename}:" if filename is not None and filename != str(path) else ""
        fix = _FIXES.get(number, "choose another path")
        message = f"{head}:{at} {error.strerror or error} ({name}, 0x{hresult:08X}); {fix}"
        return cls(hresult, one_line(message), number in _PATH_ERRNOS)


def _open_cache(root: Path) -> ClientCache | _LocalProblem:
    """The client cache at ``root`` (made if missing), or why it cannot be there."""
    from .._client.cache import ClientCache

    try:
        if root.exists() and not root.is_dir():
            raise FileExistsError(errno.EEXIST, "it is a file, not a folder", str(root))
        return ClientCache(root)
    except OSError as error:
        return _LocalProblem.of(error, "--cache", root, "the client cache")


def _log_path_problem(path: Path) -> _LocalProblem | None:
    """Whether smsts.log can be opened at ``path``: a wrong path is bad usage; a disk that is
    full or failing is not, the run then goes on without the log (SmstsLog)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as error:
        problem = _LocalProblem.of(error, "--log", path, "smsts.log")
        return problem if problem.usage else None
    return None


def _log_lost(path: Path, log: SmstsLog) -> str:
    error = log.write_error
    assert error is not None
    problem = _LocalProblem.of(error, "--log", path, "smsts.log")
    return (
        f"{problem.message}; {log.lines_lost} log line(s) were lost: the run went on without "
        "the log, as the product's smsts.log writer does"
    )


def _under(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _summary(
    args: argparse.Namespace,
    outcome: str,
    exit_code: int,
    error: str | None,
    result: TaskSequenceResult | None = None,
    log: SmstsLog | None = None,
) -> dict[str, Any]:
    """The client's JSON summary. ``outcome`` is "success", "failure" (the task sequence failed,
    as the product's would) or "error" (the client could not use its cache or log paths).
    ``log_error`` is null, or says the log could not be written and the run went on without it.
    """
    return {
        "outcome": outcome,
        "exit_code": f"0x{exit_code:08X}",
        "error": error,
        "failed_step": result.failed_step if result else None,
        "steps_run": result.steps_run if result else [],
        "packages": [
            {
                "id": t.package_id,
                "version": t.version,
                "files": t.files,
                "bytes": t.bytes,
                "seconds": round(t.seconds, 3),
                "from_cache": t.from_cache,
            }
            for t in (result.transfers if result else [])
        ],
        "cache": str(args.cache.resolve()),
        "log": str(args.log.resolve()),
        "log_error": _log_lost(args.log, log) if log and log.write_error else None,
    }


def _print_summary(summary: dict[str, Any]) -> bool:
    """Print the summary on stdout; False (told on stderr) when stdout cannot take it."""
    try:
        print(json.dumps(summary), flush=True)
    except OSError as error:
        print(
            f"pytest-cmg client: cannot write the JSON summary to stdout: {error}", file=sys.stderr
        )
        return False
    return True
