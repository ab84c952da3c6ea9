"""``python -m pytest_cmg``: the harness outside pytest.

``serve SCENARIO.yaml`` starts Azurite and the fake CMG with the scenario's world and prints one
JSON line on stdout (the contract documented in README.md, "Standalone server"), then serves until
SIGINT or SIGTERM. Clients written in any language connect with what that line gives them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import PytestCmgError, ScenarioError
from ._storage.azurite import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import FrameType

__all__ = ["main"]

#: Bumped when a field of the JSON line changes meaning or disappears (additions keep it).
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
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

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    # Installed before anything starts, so a signal during start-up still tears down cleanly.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    harness = Harness(args.azurite, connection_string=args.connection_string)
    try:
        world = build_world(scenario, harness)
        client_id = args.client_id or CLIENT_ID
        token_connection = world.connection(client_id, "token")
        cert_connection = world.connection(client_id, "certificate")
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
