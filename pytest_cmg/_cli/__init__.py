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
from pathlib import Path
from typing import TYPE_CHECKING

from .._storage.azurite import BACKENDS

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


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
    from .._bench.command import add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        from .serve import serve

        return serve(args)
    if args.command == "client":
        from .client import client

        return client(args)
    if args.command == "bench":
        from .._bench.command import run_bench

        return run_bench(args)
    return 2  # argparse rejects unknown commands before this
