"""``python -m pytest_cmg``: the harness outside pytest.

``serve SCENARIO.yaml`` starts Azurite and the fake CMG with the scenario's world and prints one
JSON line on stdout (the contract documented in README.md, "Standalone server"), then serves until
SIGINT or SIGTERM. Clients written in any language connect with what that line gives them.

``client CONNECTION`` is this project's own client against such a gateway: it reads the JSON
line, downloads packages or runs a scenario's task sequence, shows a progress bar on a terminal,
and ends with a JSON summary on stdout and an exit code (0 success, 1 failure, 2 bad usage).

``bench`` benchmarks the download core against the SDK, aria2c and the machine's ceilings on a
fresh in-memory Azurite (``pytest_cmg._bench``; docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import PytestCmgError, ScenarioError
from ._storage.azurite import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from types import FrameType

    from ._client.cache import ClientCache
    from ._client.engine import (
        CMGConnection,
        TaskSequence,
        TaskSequenceResult,
    )
    from ._client.log import SmstsLog
    from ._harness import Harness
    from ._protocol.settings import ClientSettings, DeploymentSettings
    from ._scenario.model import Scenario
    from ._scenario.world import World

__all__ = ["main"]

#: Bumped when a field of the JSON line changes meaning or disappears (additions keep it:
#: ``aad_token``, ``tenant_id`` and ``storage_ca_cert`` were added under version 1).
CONTRACT_VERSION = 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pytest_cmg", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser(
        "serve",
        help="run Azurite and the fake CMG with a scenario's world until interrupted",
        description=(
            "Start a blob service and the HTTPS fake CMG, distribute the scenario's packages, "
            "print one JSON line describing how to connect, and serve until SIGINT or SIGTERM."
        ),
    )
    serve.add_argument("scenario", type=Path, help="a scenario file (*.cmg.yaml)")
    serve.add_argument("--azurite", choices=BACKENDS, default="process", help="blob backend")
    serve.add_argument("--connection-string", default=None, help="for --azurite=external")
    serve.add_argument(
        "--client-id", default=None, help="SMSID of the client (default: the scenario's)"
    )
    serve.add_argument(
        "--storage-https",
        action="store_true",
        help="serve storage over HTTPS with a test CA (process backend); the JSON line then "
        "names the CA in storage_ca_cert and SAS URLs carry spr=https",
    )
    serve.add_argument(
        "--case",
        metavar="ID",
        default=None,
        help="the case of a parametrised scenario file to serve (its item ID, as pytest shows "
        "it in brackets)",
    )
    client = commands.add_parser(
        "client",
        help="download packages or run a task sequence against a served gateway",
        description=(
            "Connect with the JSON line printed by 'serve' (a file, or - for stdin), download "
            "the given packages or run a scenario's task sequence, and print a JSON summary."
        ),
    )
    client.add_argument("connection", help="file holding serve's JSON line, or - for stdin")
    what = client.add_mutually_exclusive_group(required=True)
    what.add_argument(
        "--package",
        action="append",
        metavar="ID[:VERSION]",
        help="a package to download (repeatable; version from the JSON line by default)",
    )
    what.add_argument(
        "--task-sequence",
        type=Path,
        metavar="SCENARIO.yaml",
        help="run this scenario file's task sequence and deployment",
    )
    client.add_argument(
        "--auth",
        choices=("token", "certificate", "azure_ad"),
        default="token",
        help="token (the JSON line's token), certificate (client_cert/client_key) or azure_ad "
        "(aad_token, exchanged at CCM_STS for a CCM token)",
    )
    client.add_argument(
        "--cache",
        type=Path,
        # The client's C:\Windows\ccmcache with the working folder as C: (winpath), as the
        # scenario runner lays out a client's work folder.
        default=Path("Windows") / "ccmcache",
        help="client cache folder (default ./Windows/ccmcache, which the client names "
        "C:\\Windows\\ccmcache: the folder holding Windows/ is its C:)",
    )
    client.add_argument(
        "--case",
        metavar="ID",
        default=None,
        help="with --task-sequence: the case of a parametrised scenario file to run",
    )
    client.add_argument("--log", type=Path, default=Path("smsts.log"), help="smsts.log path")
    client.add_argument("--no-progress", action="store_true", help="never draw a progress bar")
    client.add_argument(
        "--fsync",
        action="store_true",
        help="make resume checkpoints and finished files survive a power cut, not only the "
        "process dying (fdatasync; slower)",
    )
    from ._bench._main import add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "client":
        return _client(args)
    if args.command == "bench":
        from ._bench._main import run_bench

        return run_bench(args)
    return 2  # argparse rejects unknown commands before this


class _Stop(BaseException):
    """Raised in the main thread by serve's SIGINT/SIGTERM handler to leave start-up or serving.

    Control flow that never leaves ``_serve`` (so it is not one of _errors.py's user-facing
    errors). A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the
    way (the storage SDK's, the scenario runner's) takes it for a failure and carries on.
    """


class _StopSignal:
    """serve's SIGINT/SIGTERM handler.

    The first signal cancels distribution (:attr:`cancel`: the upload threads stop between files)
    and, while the main thread is inside :meth:`interruptible`, raises :class:`_Stop` there:
    Azurite's start, content generation and a wait on an upload are all left at once, which
    setting a flag could not do (the old handler did only that, and serve went on distributing
    100,000 files for 90 s). Elsewhere (printing the JSON line, tearing down) it is only
    recorded. Later signals are ignored: teardown is under way and takes under 5 s, and cutting
    it short would leave Azurite to the kernel's parent-death signal.

    The handler touches no lock but the cancel event's, which nothing ever waits on (see
    ``Harness.cancel``): a handler that set an event the main thread waits on could deadlock
    when the signal lands while that thread holds the event's lock.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        #: Called on the first signal, once there is something to cancel (``Harness.cancel``).
        self.cancel: Callable[[], None] | None = None
        self._armed = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        if self.cancel is not None:
            self.cancel()
        if self._armed:
            raise _Stop

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "no signal"

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block a signal leaves at once (by :class:`_Stop`); one already received raises."""
        if self.signum is not None:
            raise _Stop
        self._armed = True
        try:
            yield
        finally:
            self._armed = False


def _serve(args: argparse.Namespace) -> int:
    """Exit codes: 0 stopped by SIGINT/SIGTERM after the JSON line was printed (the server ran
    as asked); 128 + the signal's number (130 SIGINT, 143 SIGTERM) stopped before it, during
    start-up or distribution (no server ever ran: a supervisor waiting for the line learns why
    none came, and shells read it as "ended by that signal"); 1 start-up failed, or the gateway
    met an error while serving; 2 bad usage or an unusable scenario file.
    """
    stopper = _StopSignal()
    # First of all, so that a signal at any moment of start-up tears down what was started.
    previous = {sig: signal.signal(sig, stopper) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return _serve_until_stopped(args, stopper)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _serve_until_stopped(args: argparse.Namespace, stopper: _StopSignal) -> int:
    from ._harness import Harness
    from ._scenario.world import CLIENT_ID, build_world

    if args.azurite == "external" and not args.connection_string:
        print("--azurite=external needs --connection-string", file=sys.stderr)
        return 2
    if args.storage_https and args.azurite != "process":
        print("--storage-https needs --azurite=process", file=sys.stderr)
        return 2
    harness = Harness(
        args.azurite, connection_string=args.connection_string, storage_https=args.storage_https
    )
    stopper.cancel = harness.cancel
    world: World | None = None
    served = False
    try:
        try:
            with stopper.interruptible():
                scenario = _read_scenario(args.scenario, "serve", args.case)
                if scenario is None:
                    return 2
                world = build_world(scenario, harness)
                line = _contract_line(scenario, world, harness, args.client_id or CLIENT_ID)
            # Not interruptible: a client must never read half a line. A signal meanwhile is
            # recorded, and the next block raises at once.
            print(json.dumps(line), flush=True)
            served = True
            with stopper.interruptible():
                while True:
                    time.sleep(3600)
        except _Stop:
            pass
        if not served:
            code = 128 + (stopper.signum or 0)
            print(
                f"pytest-cmg serve: stopped by {stopper.name} during start-up, before the JSON "
                f"line: nothing was served, and what had started (Azurite, the gateway) is stopped "
                f"(exit {code})",
                file=sys.stderr,
            )
            if world is not None:
                world.dp.delete()
            return code
        assert world is not None
        world.gateway.check()
        world.dp.delete()
    except PytestCmgError as error:
        print(f"pytest-cmg serve: {error}", file=sys.stderr)
        return 1
    finally:
        harness.stop()
    return 0


def _contract_line(
    scenario: Scenario, world: World, harness: Harness, client_id: str
) -> dict[str, Any]:
    """serve's JSON line (README, "Standalone server"; CONTRACT_VERSION)."""
    token_connection = world.connection(client_id, "token")
    cert_connection = world.connection(client_id, "certificate")
    aad_connection = world.connection(client_id, "azure_ad")
    gateway = world.gateway
    line: dict[str, Any] = {
        "contract": CONTRACT_VERSION,
        "scenario": scenario.name,
        "cmg_url": gateway.url,
        "cmg_hostname": gateway.hostname,
        "ca_cert": str(gateway.ca_pem),
        "site_code": gateway.site_code,
        "mp_role_id": gateway.role_id,
        "client_id": client_id,
        "token": token_connection.token,
        "client_cert": str(cert_connection.client_cert),
        "client_key": str(cert_connection.client_key),
        "aad_token": aad_connection.aad_token,
        "tenant_id": gateway.tenant.tenant_id,
        "blob_endpoint": world.dp.endpoint.url,
        "container": world.dp.container,
        "azurite_pid": harness.backend_pid,
        "packages": [
            {
                "id": package.id,
                "version": package.version,
                "hash": world.manifests[package.id].hash,
                "files": len(world.manifests[package.id].files),
                "size": world.manifests[package.id].total_size,
            }
            for package in scenario.packages
            if package.id in world.manifests
        ],
    }
    if world.storage_ca_cert is not None:
        line["storage_ca_cert"] = str(world.storage_ca_cert)
    return line


#: Longest message shown for an unexpected error while loading a scenario (one line; the
#: exception's text could quote a whole file).
_MAX_MESSAGE = 300


def _read_scenario(path: Path, command: str, case: str | None = None) -> Scenario | None:
    """The file's scenario (its case ``case``), or None after telling on stderr why the user's
    file cannot be used.

    The CLI's safety net: the loader reports every broken rule as a ScenarioError (printed as
    is: its problems, one a line), but whatever else escapes it while reading the user's file
    (undecodable bytes, an unreadable path, a YAML error, a structure too deep or too big) is
    also the file's fault, not a crash: one line naming the file and the rule, never a
    traceback. Both are exit 2 (bad usage) for the caller.
    """
    from ._scenario.load import load_scenarios

    try:
        return _pick_case(path, load_scenarios(path), case)
    except ScenarioError as error:
        print(error, file=sys.stderr)
    except Exception as error:
        # Any exception: see the docstring (the user's file, not a crash).
        print(f"pytest-cmg {command}: {_unreadable_scenario(path, error)}", file=sys.stderr)
    return None


def _pick_case(path: Path, scenarios: list[Scenario], case: str | None) -> Scenario:
    """The scenario of case ``case`` (None: the file's only one); a ScenarioError at the line
    of the file's cases otherwise, naming the IDs there are."""
    from ._errors import ScenarioProblem

    ids = [s.case_id for s in scenarios if s.case_id is not None]
    if case is None and not ids:
        return scenarios[0]
    chosen = [s for s in scenarios if case is not None and s.case_id == case]
    if chosen:
        return chosen[0]
    first = scenarios[0]
    listed = ", ".join(ids)
    if case is None:
        rule = f"this file is parametrised into {len(ids)} cases ({listed})"
        hint = "choose one with --case ID"
    elif not ids:
        rule = f"--case {case!r}: this file has no cases (no matrix, no cases list)"
        hint = "leave --case out"
    else:
        rule = f"--case {case!r}: no case has that ID; its cases are {listed}"
        hint = "give one of them, as pytest shows it in brackets"
    raise ScenarioError([ScenarioProblem(path, first.line(first.item_where), rule, hint)])


def _unreadable_scenario(path: Path, error: Exception) -> str:
    """One line: which file, which rule it breaks, and the fix."""
    import yaml

    where = f"scenario {path}"
    if isinstance(error, UnicodeDecodeError):
        byte = error.object[error.start : error.start + 1].hex()
        return (
            f"{where} (or a file it includes) is not UTF-8 text: byte 0x{byte} at offset "
            f"{error.start} cannot be decoded; scenario files must be UTF-8: save it as UTF-8"
        )
    if isinstance(error, OSError):
        named = (
            f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        )
        fixes = {
            errno.ENOENT: "check the path",
            errno.EISDIR: "name a *.cmg.yaml file, not a folder",
            errno.EACCES: "make it readable by this user",
        }
        fix = fixes.get(error.errno or 0, "name a readable scenario file")
        return f"cannot read {where}{named}: {error.strerror or error}; {fix}"
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        return f"{where}{at} is not valid YAML ({_one_line(str(problem))}); fix the YAML syntax"
    if isinstance(error, RecursionError):
        return (
            f"{where} nests too deeply to be read; a scenario needs only a few levels: flatten it"
        )
    if isinstance(error, MemoryError):
        return f"{where} is too large to be read into memory; scenario files are small: split it"
    return _one_line(
        f"{where} could not be loaded ({type(error).__name__}: {error}); the loader should "
        "have named the broken rule: please report this with the file"
    )


def _one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= _MAX_MESSAGE else flat[: _MAX_MESSAGE - 3] + "..."


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


def _client(args: argparse.Namespace) -> int:
    from ._client.engine import CMGConnection, Step, TaskSequence
    from ._client.factory import build_engine
    from ._client.log import SmstsLog
    from ._protocol.settings import CURRENT_SITE_VERSION, DeploymentSettings

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
        scenario = _read_scenario(args.task_sequence, "client", args.case)
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

    from ._client.boot import BootError, BootHost, BootSpec

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
        return cls(hresult, _one_line(message), number in _PATH_ERRNOS)


def _open_cache(root: Path) -> ClientCache | _LocalProblem:
    """The client cache at ``root`` (made if missing), or why it cannot be there."""
    from ._client.cache import ClientCache

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
