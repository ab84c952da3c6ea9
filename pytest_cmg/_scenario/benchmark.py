"""Benchmark scenarios: the download chain's rate as a ratio against a baseline in the same process.

A scenario with a ``benchmark`` key runs the whole chain (content location, manifest, SAS URLs,
the engine, the download core, the cache) with the client connected to storage directly. Each
package read from storage is timed by the engine (:class:`~pytest_cmg._client.engine.
PackageTransfer`: its bytes over the seconds spent downloading, verifying and committing it);
right after the run, in the same process, a baseline is timed on the same bytes, and the figure
judged is the ratio of the two rates. An absolute MB/s means nothing on a shared two-core machine
from one run to the next; a ratio to a baseline measured under the same load does (the project
rule: a timing is measured in a benchmark that reports a ratio, never in a timed unit test).

Baselines:

* ``hashlib``: one ``hashlib.sha256`` over as many bytes from memory, in 1 MiB updates, on one
  core: the ceiling of a client that hashes everything it reads.
* ``raw``: plain keep-alive ``http.client`` GETs of the package's blobs straight from storage,
  bodies read into a buffer and discarded, on as many connections as the download core uses:
  storage's own ceiling, which also pays the per-request cost (the fair baseline for many small
  files, where that cost dominates and hashing does not).

The figures travel as ``item.user_properties`` (``throughput[<package>].<figure>``), so they reach
``--junitxml`` and, through xdist, the controller, where :func:`terminal_summary` prints them.
This module imports nothing heavy: the plugin's terminal summary imports it in every session.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._bench.baselines import get_all
from .._errors import BenchError

if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from pathlib import Path

    from _pytest.terminal import TerminalReporter

    from .spec import Bounds

__all__ = [
    "PROPERTY",
    "BenchmarkRound",
    "Throughput",
    "hashlib_seconds",
    "raw_seconds",
    "report_lines",
    "terminal_summary",
    "throughput_properties",
]

_CHUNK = 1 << 20
#: The hashlib baseline cycles through a buffer of at most this many bytes: SHA-256 is bound by
#: the CPU, not by memory, so a 256 MiB package needs no 256 MiB buffer to be timed fairly.
_HASH_BUFFER = 64 << 20
#: user_properties names: ``throughput[PS100012].ratio``.
PROPERTY = "throughput[{package}].{figure}"
_MB = 1e6


@dataclass(frozen=True)
class BenchmarkRound:
    """One round of one package: the chain's seconds and the baseline's, on the same bytes."""

    seconds: float
    baseline_seconds: float

    @property
    def ratio(self) -> float:
        """The chain's rate over the baseline's (same bytes, so the inverse ratio of seconds)."""
        return self.baseline_seconds / self.seconds if self.seconds > 0 else float("inf")


@dataclass(frozen=True)
class Throughput:
    """A package's measured figures over every round of a benchmark scenario."""

    package_id: str
    baseline: str
    files: int
    bytes: int
    rounds: tuple[BenchmarkRound, ...]
    #: The 1-minute load average when the last baseline was timed: why a figure may be low.
    load_average: float | None = None

    @property
    def ratio(self) -> float:
        """The judged figure: the median of the rounds' ratios."""
        return statistics.median(r.ratio for r in self.rounds)

    @property
    def seconds(self) -> float:
        return statistics.median(r.seconds for r in self.rounds)

    @property
    def baseline_seconds(self) -> float:
        return statistics.median(r.baseline_seconds for r in self.rounds)

    @property
    def mb_per_s(self) -> float:
        """The chain's median rate, in 10^6 bytes per second."""
        return self.bytes / self.seconds / _MB if self.seconds > 0 else float("inf")

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds if self.seconds > 0 else float("inf")

    @property
    def baseline_mb_per_s(self) -> float:
        seconds = self.baseline_seconds
        return self.bytes / seconds / _MB if seconds > 0 else float("inf")

    def describe(self) -> str:
        """One line: ``PS100012: 4 files, 268.4 MB: 61.2 MB/s, ... = 0.41 x hashlib``."""
        return (
            f"{self.package_id}: {self.files} file(s), {self.bytes / _MB:.1f} MB: chain "
            f"{self.mb_per_s:.1f} MB/s ({self.files_per_s:.0f} files/s), {self.baseline} "
            f"{self.baseline_mb_per_s:.1f} MB/s, ratio {self.ratio:.3f}"
        )

    def round_lines(self) -> list[str]:
        lines = [
            f"round {n}: chain {r.seconds:.3f}s, {self.baseline} {r.baseline_seconds:.3f}s, "
            f"ratio {r.ratio:.3f}"
            for n, r in enumerate(self.rounds, 1)
        ]
        if self.load_average is not None:
            lines.append(
                f"1-minute load average {self.load_average:.2f} on {os.cpu_count()} CPU(s)"
            )
        return lines


def collect_rounds(
    package_id: str, baseline: str, files: int, size: int, rounds: Sequence[BenchmarkRound]
) -> Throughput:
    """A :class:`Throughput` with the load average of now (just after its last baseline)."""
    try:
        load: float | None = os.getloadavg()[0]
    except OSError:
        load = None
    return Throughput(package_id, baseline, files, size, tuple(rounds), load)


# --- baselines -------------------------------------------------------------------------------


def hashlib_seconds(total: int) -> float:
    """Seconds one core takes to SHA-256 ``total`` bytes from memory, in 1 MiB updates."""
    buffer = memoryview(os.urandom(max(1, min(total, _HASH_BUFFER))))
    digest = hashlib.sha256()
    left, offset = total, 0
    started = time.perf_counter()
    while left > 0:
        size = min(_CHUNK, left, len(buffer) - offset)
        digest.update(buffer[offset : offset + size])
        left -= size
        offset = (offset + size) % len(buffer)
    digest.hexdigest()
    return time.perf_counter() - started


def raw_seconds(urls: Sequence[str], total: int, *, workers: int, ca_file: Path | None) -> float:
    """Seconds plain keep-alive GETs take to read every URL, on up to ``workers`` connections.

    Bodies are read into a 1 MiB buffer and discarded. The byte count must come to ``total``
    (the package's size), or the baseline did not read what the chain read.
    """
    started = time.perf_counter()
    received = get_all(urls, workers=workers, ca_file=ca_file, label="raw baseline")
    seconds = time.perf_counter() - started
    if received != total:
        msg = f"raw baseline read {received} bytes, the package has {total}"
        raise BenchError(msg)
    return seconds


# --- reporting -------------------------------------------------------------------------------


def throughput_properties(
    figures: Iterable[Throughput], floors: dict[str, Bounds] | None = None
) -> list[tuple[str, object]]:
    """``user_properties`` entries of the figures (and the bounds the file asks for)."""
    out: list[tuple[str, object]] = []
    for figure in figures:
        values: dict[str, object] = {
            "ratio": figure.ratio,
            "baseline": figure.baseline,
            "mb_per_s": round(figure.mb_per_s, 2),
            "files_per_s": round(figure.files_per_s, 1),
            "baseline_mb_per_s": round(figure.baseline_mb_per_s, 2),
            "files": figure.files,
            "bytes": figure.bytes,
            "rounds": len(figure.rounds),
            "round_ratios": " ".join(f"{r.ratio:.4f}" for r in figure.rounds),
        }
        if figure.load_average is not None:
            values["load_average"] = round(figure.load_average, 2)
        bounds = (floors or {}).get(figure.package_id)
        if bounds is not None and bounds.at_least is not None:
            values["at_least"] = bounds.at_least
        if bounds is not None and bounds.at_most is not None:
            values["at_most"] = bounds.at_most
        out += [
            (PROPERTY.format(package=figure.package_id, figure=k), v) for k, v in values.items()
        ]
    return out


def report_lines(figures: Iterable[Throughput], floors: dict[str, Bounds] | None = None) -> str:
    """The item's report section: each package's figures, its bound, and every round."""
    parts = []
    for figure in figures:
        bounds = (floors or {}).get(figure.package_id)
        judged = f" (expected {bounds.describe()})" if bounds is not None else " (not judged)"
        rounds = "\n".join(f"  {line}" for line in figure.round_lines())
        parts.append(f"{figure.describe()}{judged}\n{rounds}")
    return "\n".join(parts)


def _parse(properties: Iterable[tuple[str, object]]) -> dict[str, dict[str, object]]:
    """``{package: {figure: value}}`` back from ``throughput[...]`` user_properties."""
    found: dict[str, dict[str, object]] = {}
    for name, value in properties:
        if not name.startswith("throughput[") or "]." not in name:
            continue
        package, _, figure = name.removeprefix("throughput[").partition("].")
        found.setdefault(package, {})[figure] = value
    return found


def terminal_summary(reporter: TerminalReporter) -> None:
    """The "pytest-cmg scenario throughput" section: every benchmark item's figures, pass or fail.

    Read from the reports (their ``user_properties``), so it works under xdist, where the items
    ran in workers and only the reports reach the controller.
    """
    rows: list[tuple[str, str, dict[str, object]]] = []
    for reports in reporter.stats.values():
        for report in reports:
            properties: Any = getattr(report, "user_properties", None)
            if getattr(report, "when", None) != "call" or not properties:
                continue
            for package, figures in _parse(properties).items():
                rows.append((str(report.nodeid), package, {**figures, "_outcome": report.outcome}))
    if not rows:
        return
    reporter.write_sep("=", "pytest-cmg scenario throughput")
    reporter.write_line(
        "ratio: the chain's rate (download, hash, cache) over its baseline's on the same bytes,"
    )
    reporter.write_line("timed in the same process after each round; median of the rounds")
    header = (
        f"  {'package':9} {'files':>6} {'MB':>8} {'MB/s':>8} {'files/s':>8} {'baseline':>8} "
        f"{'base MB/s':>9} {'ratio':>7}  expected"
    )
    reporter.write_line(header)
    last = ""
    for nodeid, package, f in sorted(rows):
        if nodeid != last:
            outcome = str(f["_outcome"])
            reporter.write_line(nodeid + ("" if outcome == "passed" else f" ({outcome.upper()})"))
            last = nodeid
        reporter.write_line(
            f"  {package:9} {f.get('files', '')!s:>6} {_num(f.get('bytes'), _MB):>8} "
            f"{_num(f.get('mb_per_s')):>8} {_num(f.get('files_per_s'), digits=0):>8} "
            f"{f.get('baseline', '')!s:>8} {_num(f.get('baseline_mb_per_s')):>9} "
            f"{_num(f.get('ratio'), digits=3):>7}  {_verdict(f)}"
        )


def _verdict(figures: dict[str, object]) -> str:
    """``>= 0.3 met``, ``>= 0.3 NOT MET`` or ``not judged``, from the figures' own bounds."""
    try:
        ratio = float(str(figures["ratio"]))
    except (KeyError, ValueError):
        return "not measured"
    low, high = figures.get("at_least"), figures.get("at_most")
    if low is None and high is None:
        return "not judged"
    parts, met = [], True
    if low is not None:
        parts.append(f">= {low}")
        met = met and ratio >= float(str(low))
    if high is not None:
        parts.append(f"<= {high}")
        met = met and ratio <= float(str(high))
    return f"{' and '.join(parts)} {'met' if met else 'NOT MET'}"


def _num(value: object, scale: float = 1.0, *, digits: int = 1) -> str:
    try:
        return f"{float(str(value)) / scale:.{digits}f}"
    except ValueError:
        return ""
