"""The reference ACP (examples/acp) against the whole scenario suite, in conformance mode.

Issue 11's bar: the reference passes every applicable scenario, and at most a quarter of the
suite is not applicable to it. This runs the real thing (a nested pytest over scenarios/ with
``--cmg-download-program``) and reads its conformance report, so CI proves it on every run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACP = ROOT / "examples" / "acp" / "acp.py"


@pytest.mark.slow
def test_the_reference_acp_passes_every_applicable_scenario(tmp_path: Path) -> None:
    report = tmp_path / "conformance.json"
    program = f"{sys.executable} {ACP} --backoff 0.05"
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "scenarios",
            "-q",
            "-n",
            "2",
            "-p",
            "no:cacheprovider",
            "--cmg-download-program",
            program,
            "--cmg-conformance-report",
            str(report),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert report.exists(), completed.stdout[-3000:] + completed.stderr[-3000:]
    data = json.loads(report.read_text(encoding="utf-8"))
    counts = data["counts"]
    failed = [
        (item["nodeid"], item.get("failures") or item.get("error"))
        for item in data["items"]
        if item["status"] == "failed"
    ]
    print(f"\nreference ACP conformance: {counts}")
    assert failed == []
    assert counts["passed"] > 0
    total = sum(counts.values())
    assert counts["not_applicable"] <= total / 4, counts
    assert completed.returncode == 0, completed.stdout[-3000:]
    # The report names the program (its first word resolved to a real path).
    assert data["download_program"].endswith(f"{ACP} --backoff 0.05")
