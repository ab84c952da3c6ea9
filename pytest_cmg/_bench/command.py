"""``python -m pytest_cmg bench``: run the benchmark, print the table, write JSON/PNG, compare.

Exit codes: 0 measured (and within the margin of ``--compare``), 1 a compared figure breached
the margin, 2 bad usage (unknown workload, unreadable baseline, no matplotlib for ``--chart``, a
``--download-program`` that cannot be run), 3 the benchmark itself failed (its work folder could
not be made, Azurite did not start, a case failed or wrote wrong bytes, the download program
exited non-zero or delivered wrong files).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .._errors import InvalidValueError
from ._aria2 import ARIA2_MODES
from ._program import check_program
from ._runner import BenchError
from ._scaling import SWEEPS, parse_sweeps
from ._workloads import FULL, parse_workloads

if TYPE_CHECKING:
    from collections.abc import Callable

    from ._compare import Comparison

T = TypeVar("T")

__all__ = [
    "EXIT_BREACHED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_USAGE",
    "add_bench_parser",
    "check_margin",
    "check_rounds",
    "check_workers",
    "run_bench",
    "run_scaling_command",
]

EXIT_OK, EXIT_BREACHED, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3
DEFAULT_MARGIN = 0.15
DEFAULT_ROUNDS = 5


def check_margin(text: str) -> float:
    """``--margin``: a fraction in [0, 1); ``ValueError`` otherwise."""
    try:
        margin = float(text)
    except ValueError:
        margin = -1.0
    if not 0 <= margin < 1:
        msg = f"the margin must be a fraction between 0 and 1 (0.15 = 15%), not {text!r}"
        raise InvalidValueError(msg)
    return margin


def _count(text: str, what: str) -> int:
    """A whole number >= 1; ``ValueError`` naming ``what`` otherwise."""
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        msg = f"the number of {what} must be a whole number >= 1, not {text!r}"
        raise InvalidValueError(msg)
    return count


def check_rounds(text: str) -> int:
    """``--rounds``: a whole number >= 1; ``ValueError`` otherwise."""
    return _count(text, "rounds")


def check_workers(text: str) -> int:
    """``--workers``: a whole number >= 1; ``ValueError`` otherwise."""
    return _count(text, "workers")


def _argtype(check: Callable[[str], T]) -> Callable[[str], T]:
    """argparse reports ArgumentTypeError's message as is (a ValueError's would be lost)."""

    def convert(text: str) -> T:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_bench_parser(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add the ``bench`` sub-command to the CLI's sub-parsers."""
    bench = commands.add_parser(
        "bench",
        help="benchmark the download core against the SDK, aria2c and the ceilings",
        description=(
            "Start an in-memory Azurite, upload each workload once, run every case once per "
            "round in a shuffled order, and print median/min/max MB/s, CPU% and the core's "
            "ratios beside their targets. With --download-program, an alternate content "
            "provider is measured beside them. Exit codes: 0 ok, 1 --compare breached, 2 usage, "
            "3 the benchmark failed."
        ),
    )
    bench.add_argument(
        "--workloads",
        type=_argtype(parse_workloads),
        default=tuple(FULL),
        metavar="LIST",
        help=f"comma-separated, among {', '.join(FULL)} (default: all)",
    )
    bench.add_argument(
        "--rounds",
        type=_argtype(check_rounds),
        default=None,
        help=f"rounds per case (default {DEFAULT_ROUNDS}, 1 with --quick)",
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="small workloads (32 MiB, 16 x 1 MiB, 200 x 16 KiB) and 1 round: seconds, not minutes",
    )
    bench.add_argument(
        "--json", type=Path, metavar="PATH", help="write the pytest-benchmark-style JSON"
    )
    bench.add_argument(
        "--chart", type=Path, metavar="PATH", help="write a PNG chart (needs matplotlib)"
    )
    bench.add_argument(
        "--compare",
        metavar="BASELINE.json|targets",
        help="exit 1 when a ratio is more than --margin below the baseline's (or the targets')",
    )
    bench.add_argument(
        "--margin",
        type=_argtype(check_margin),
        default=DEFAULT_MARGIN,
        help=f"allowed shortfall for --compare, a fraction (default {DEFAULT_MARGIN})",
    )
    bench.add_argument(
        "--workers",
        type=_argtype(check_workers),
        default=8,
        help="DownloadCore(workers=N), also the raw ceiling's connections for many files (default 8)",
    )
    bench.add_argument(
        "--aria2",
        choices=ARIA2_MODES,
        default="auto",
        help="auto: fetch aria2 from Debian packages into the cache if missing (default); "
        "cached: use it only if already there; never: skip the aria2c case",
    )
    bench.add_argument(
        "--download-program",
        type=_argtype(check_program),
        metavar="CMD",
        help="also measure this alternate content provider (case 'program'), run as the task "
        "sequence runs SMSTSDownloadProgram: CMD <ini> <PackageID> <destination>, the INI "
        "pointing at a fake CMG (HTTPS, 127.0.0.1) serving each workload from the same Azurite; "
        "timed from its start to its exit 0, then every file checked (size, SHA-256, nothing "
        "extra). Reports its MB/s and program/core, program/hashlib, program/raw; a run that "
        "exits non-zero or delivers wrong files exits 3",
    )
    bench.add_argument(
        "--no-memory",
        action="store_true",
        help="skip the core's peak-memory measurement on the big blob",
    )
    bench.add_argument(
        "--workdir", type=Path, help="where outputs are written (default: a temp folder)"
    )
    bench.add_argument(
        "--load",
        type=Path,
        metavar="RUN.json",
        help="measure nothing: print, chart and compare a saved run",
    )
    bench.add_argument(
        "--scaling",
        action="store_true",
        help="measure how cost grows instead: the core and raw-verified against workers "
        "(1, 2, 4, 8, 16 on m1 and big) and file size (16 KiB to 256 MiB at --workers), and the "
        "fake CMG's location+manifest requests/s and p50/p99 latency with 1, 10 and 50 "
        "concurrent clients; default 3 rounds (1 with --quick, which shrinks every point)",
    )
    bench.add_argument(
        "--sweep",
        type=_argtype(parse_sweeps),
        default=None,
        metavar="LIST",
        help=f"with --scaling: which tables, comma-separated among {', '.join(SWEEPS)} "
        "(default all; implies --scaling)",
    )
    bench.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    return bench


def _progress(line: str) -> None:
    """A progress line on stderr, at once (``--quiet`` passes none)."""
    print(line, file=sys.stderr, flush=True)


def _write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        print(f"JSON written to {args.json}", file=sys.stderr)
    if args.chart is not None:
        from ._chart import write_chart

        write_chart(report, args.chart)
        print(f"chart written to {args.chart}", file=sys.stderr)


#: Options that mean nothing to ``--scaling`` (it has no cases to compare, chart or load).
_NOT_WITH_SCALING = (
    ("compare", "--compare"),
    ("chart", "--chart"),
    ("load", "--load"),
    ("download_program", "--download-program"),
)


def run_bench(args: argparse.Namespace) -> int:
    from ._compare import compare, load_baseline
    from ._report import render_table

    if args.scaling or args.sweep is not None:
        return run_scaling_command(args)
    baseline: dict[str, Any] | None = None
    if args.compare:
        try:
            baseline = load_baseline(args.compare)
        except ValueError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return EXIT_USAGE
    if args.chart is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                'bench: --chart needs matplotlib: pip install "pytest-cmg[bench]"', file=sys.stderr
            )
            return EXIT_USAGE

    if args.load is not None:
        try:
            report = json.loads(args.load.read_text(encoding="utf-8"))
            if not isinstance(report, dict) or "benchmarks" not in report:
                msg = "no 'benchmarks' section"
                raise InvalidValueError(msg)
        except (OSError, ValueError) as exc:
            print(f"bench: cannot load {args.load}: {exc}", file=sys.stderr)
            return EXIT_USAGE
    else:
        report_or_code = _measure(args)
        if isinstance(report_or_code, int):
            return report_or_code
        report = report_or_code

    print(render_table(report))
    try:
        _write_outputs(report, args)
    except (OSError, RuntimeError) as exc:
        print(f"bench: cannot write the results: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not args.compare:
        return EXIT_OK
    comparison: Comparison = compare(report, baseline, args.margin, against=args.compare)
    print()
    print(comparison.render())
    return EXIT_BREACHED if comparison.breaches else EXIT_OK


def _measure(args: argparse.Namespace) -> dict[str, Any] | int:
    from ._runner import Bench, BenchConfig, BenchError

    rounds = args.rounds if args.rounds is not None else (1 if args.quick else DEFAULT_ROUNDS)
    config = BenchConfig(
        workloads=tuple(args.workloads),
        rounds=rounds,
        quick=args.quick,
        workers=args.workers,
        aria2=args.aria2,
        memory=not args.no_memory,
        workdir=args.workdir,
        log=None if args.quiet else _progress,
        download_program=args.download_program,
    )
    try:
        with Bench(config) as bench:
            bench.run()
            return bench.report()
    except BenchError as exc:
        print(f"bench: the benchmark failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


def run_scaling_command(args: argparse.Namespace) -> int:
    """``bench --scaling``: measure, print the three tables, write ``--json``."""
    from ._scaling import ScalingConfig, quick_config, render_scaling, run_scaling

    given = [option for name, option in _NOT_WITH_SCALING if getattr(args, name, None)]
    if given:
        print(
            f"bench: {', '.join(given)} cannot be used with --scaling, which measures its own "
            "tables (no cases to compare, chart or load); run them without --scaling",
            file=sys.stderr,
        )
        return EXIT_USAGE

    settings: dict[str, Any] = {
        "sweeps": args.sweep if args.sweep is not None else SWEEPS,
        "default_workers": args.workers,
        "workdir": args.workdir,
        "log": None if args.quiet else _progress,
    }
    if args.rounds is not None:
        settings["rounds"] = args.rounds
    config = quick_config(**settings) if args.quick else ScalingConfig(**settings)
    try:
        report = run_scaling(config)
    except BenchError as exc:
        print(f"bench: the scaling benchmark failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(render_scaling(report))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        except OSError as exc:
            print(f"bench: cannot write the results to {args.json}: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"JSON written to {args.json}", file=sys.stderr)
    return EXIT_OK
