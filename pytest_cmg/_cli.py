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
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import PytestCmgError, ScenarioError
from ._storage.azurite import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

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
        default=Path("ccmcache"),
        help="client cache folder (default ./ccmcache)",
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


def _serve(args: argparse.Namespace) -> int:
    from ._harness import Harness
    from ._scenario.model import load_scenario
    from ._scenario.runner import CLIENT_ID, build_world

    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as error:
        print(error, file=sys.stderr)
        return 2
    except OSError as error:
        print(f"cannot read scenario {args.scenario}: {error}", file=sys.stderr)
        return 2
    if args.azurite == "external" and not args.connection_string:
        print("--azurite=external needs --connection-string", file=sys.stderr)
        return 2
    if args.storage_https and args.azurite != "process":
        print("--storage-https needs --azurite=process", file=sys.stderr)
        return 2

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before anything starts, so a signal during start-up still tears down cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    harness = Harness(
        args.azurite, connection_string=args.connection_string, storage_https=args.storage_https
    )
    try:
        world = build_world(scenario, harness)
        client_id = args.client_id or CLIENT_ID
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
        print(json.dumps(line), flush=True)
        stop.wait()
        gateway.check()
        world.dp.delete()
    except PytestCmgError as error:
        print(f"pytest-cmg serve: {error}", file=sys.stderr)
        return 1
    finally:
        harness.stop()
    return 0


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


def _client(args: argparse.Namespace) -> int:
    from ._client.cache import ClientCache
    from ._client.download import DownloadCore
    from ._client.engine import CMGClient, CMGConnection, Step, TaskSequence, TaskSequenceEngine
    from ._client.log import SmstsLog
    from ._protocol.settings import CURRENT_SITE_VERSION, DeploymentSettings

    try:
        text = sys.stdin.readline() if args.connection == "-" else Path(args.connection).read_text()
        contract = json.loads(text.strip().splitlines()[0])
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
    except (OSError, ValueError, KeyError, IndexError) as error:
        print(f"cannot use connection {args.connection!r}: {error!r}", file=sys.stderr)
        return 2

    launch, deployment, site_version, settings = "software_center", DeploymentSettings(), None, None
    if args.task_sequence is not None:
        from ._scenario.model import load_scenario

        try:
            scenario = load_scenario(args.task_sequence)
        except (ScenarioError, OSError) as error:
            print(error, file=sys.stderr)
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

    bar = _ProgressBar(enabled=sys.stderr.isatty() and not args.no_progress)
    log = SmstsLog(args.log)
    core = DownloadCore(
        on_event=lambda line: log.info("DataTransferService", line),
        on_progress=bar.advance,
        ca_file=storage_ca,
        fsync=args.fsync,
    )
    engine = TaskSequenceEngine(
        CMGClient(connection, log, settings),
        ClientCache(args.cache),
        log,
        deployment,
        core,
        site_version=site_version or CURRENT_SITE_VERSION,
    )
    engine.on_job = bar.job
    try:
        result = engine.run(sequence, launch)
    finally:
        engine.close()
        bar.close()
    summary = {
        "outcome": "success" if result.succeeded else "failure",
        "exit_code": f"0x{result.exit_code:08X}",
        "error": str(result.error) if result.error else None,
        "failed_step": result.failed_step,
        "steps_run": result.steps_run,
        "packages": [
            {
                "id": t.package_id,
                "version": t.version,
                "files": t.files,
                "bytes": t.bytes,
                "seconds": round(t.seconds, 3),
                "from_cache": t.from_cache,
            }
            for t in result.transfers
        ],
        "cache": str(args.cache.resolve()),
        "log": str(args.log.resolve()),
    }
    print(json.dumps(summary), flush=True)
    return 0 if result.succeeded else 1
