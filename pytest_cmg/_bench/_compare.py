"""``--compare``: is this run more than a margin worse than a baseline run or the targets?

Only figures measured in one run are compared (ratios of medians, and the core's peak memory),
never absolute MB/s across runs: the pre-project measurements found this kind of machine too
noisy for that. A ratio breaches when it is more than ``margin`` (a fraction) below the baseline's; the peak
memory when it is more than ``margin`` above. Figures missing on either side are listed as
skipped, not failed (aria2c may be unavailable on one machine, a run may have no
``--download-program``); so are a program's ratios when the baseline measured another program.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._errors import InvalidValueError
from ._report import PEAK_METRIC, PROGRAM_RATIO, TARGETS, metric_values

__all__ = ["TARGETS_BASELINE", "Check", "Comparison", "compare", "load_baseline"]

#: The ``--compare`` value that means "the built-in targets" rather than a file.
TARGETS_BASELINE = "targets"


@dataclass(frozen=True)
class Check:
    workload: str
    metric: str
    baseline: float
    current: float
    limit: float
    higher_is_better: bool

    @property
    def breached(self) -> bool:
        if self.higher_is_better:
            return self.current < self.limit
        return self.current > self.limit

    def describe(self) -> str:
        relation = "below" if self.higher_is_better else "above"
        return (
            f"{self.workload} {self.metric} = {self.current:.2f}, {relation} the limit "
            f"{self.limit:.2f} (baseline {self.baseline:.2f})"
        )


@dataclass
class Comparison:
    against: str
    margin: float
    checks: list[Check] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def breaches(self) -> list[Check]:
        return [c for c in self.checks if c.breached]

    def for_workload(self, workload: str) -> list[Check]:
        return [c for c in self.breaches if c.workload == workload]

    def render(self) -> str:
        head = f"compare against {self.against} (margin {self.margin:.0%}): "
        if self.breaches:
            head += f"{len(self.breaches)} of {len(self.checks)} figures breached"
        else:
            head += f"{len(self.checks)} figures within the margin"
        lines = [head]
        lines += [f"  BREACHED {c.describe()}" for c in self.breaches]
        lines += [f"  skipped {s}" for s in self.skipped]
        return "\n".join(lines)


def load_baseline(spec: str) -> dict[str, Any] | None:
    """The baseline report for ``--compare spec``; None means the built-in targets.

    ``ValueError`` when the file cannot be read or holds no ratios (a usage error).
    """
    if spec == TARGETS_BASELINE:
        return None
    try:
        data = json.loads(Path(spec).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        msg = f"cannot read the baseline {spec}: {exc}"
        raise InvalidValueError(msg) from exc
    if not isinstance(data, dict) or not isinstance(data.get("ratios"), dict):
        msg = f"{spec} is not a pytest-cmg bench report (it has no 'ratios' section)"
        raise InvalidValueError(msg)
    return data


def _baseline_values(baseline: dict[str, Any] | None) -> dict[tuple[str, str], float]:
    if baseline is None:
        return {(t.workload, t.metric): t.value for t in TARGETS}
    return metric_values(baseline)


def compare(
    report: dict[str, Any],
    baseline: dict[str, Any] | None,
    margin: float,
    *,
    against: str = "",
) -> Comparison:
    """Compare ``report`` with ``baseline`` (None: the targets) within ``margin``."""
    current = metric_values(report)
    base = _baseline_values(baseline)
    ran = set(report.get("bench", {}).get("workloads", {}))
    program = report.get("bench", {}).get("download_program")
    base_program = (baseline or {}).get("bench", {}).get("download_program")
    result = Comparison(against or ("the targets" if baseline is None else "the baseline"), margin)
    for key in sorted(base):
        workload, metric = key
        if workload not in ran:
            continue  # this run did not measure the workload at all
        if key not in current:
            result.skipped.append(f"{workload} {metric}: not measured in this run")
            continue
        if metric.startswith(PROGRAM_RATIO) and program != base_program:
            result.skipped.append(
                f"{workload} {metric}: the baseline measured another download program "
                f"({base_program!r}, this run {program!r})"
            )
            continue
        higher = metric != PEAK_METRIC
        limit = base[key] * (1 - margin) if higher else base[key] * (1 + margin)
        result.checks.append(Check(workload, metric, base[key], current[key], limit, higher))
    for key in sorted(set(current) - set(base)):
        if baseline is not None:
            result.skipped.append(f"{key[0]} {key[1]}: not in the baseline")
    return result
