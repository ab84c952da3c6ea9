"""The zoo in conformance mode: each member as ``--cmg-download-program`` over scenario files.

    python tests/acp_zoo/conformance.py [--scenarios PATH ...] [--members NAME,...] [--json OUT]

Runs, for each member, a nested ``pytest <scenarios> --cmg-download-program "<python> <member>
--backoff 0.05 --cache <folder>" --cmg-conformance-report <report>`` and prints which scenario
items failed it (a member is *killed* when at least one did). tests/test_acp_zoo.py uses
:func:`run_member` with the scenarios the kill table names; this script, over the whole
``scenarios/`` folder, is how that table was found.

With ``cache=True`` a member gets a ``--cache`` folder that lives for the whole pass, as an
ACP's cache lives on a machine across task sequences: a cache keyed wrongly is then met by the
next scenario that uses the same PackageID with other content.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

import zoo  # noqa: E402  (a sibling file, not a package)

#: Options every member (and the reference) runs with: short waits between tries.
OPTIONS = ("--backoff", "0.05")


def write_member(name: str, folder: Path) -> Path:
    """The member's ACP as a file (the reference's source with its bug), in ``folder``."""
    source = zoo.REFERENCE.read_text(encoding="utf-8")
    if name != "reference":
        source = zoo.mutate(source, zoo.member(name))
    path = folder / f"acp-{name}.py"
    path.write_text(source, encoding="utf-8")
    return path


def run_member(
    name: str,
    scenarios: list[str],
    folder: Path,
    *,
    workers: int = 0,
    cache: bool = False,
    timeout: float = 900,
) -> dict:
    """Run member ``name`` over ``scenarios``; the conformance report, plus ``returncode`` and
    ``output`` (the tail of pytest's output)."""
    folder.mkdir(parents=True, exist_ok=True)
    acp = write_member(name, folder)
    argv = [sys.executable, str(acp), *OPTIONS]
    if cache:
        # One folder for the whole pass. Only over scenarios without storage faults: a package
        # served from this cache makes no storage request, so a scripted fault would not fire.
        (folder / "cache").mkdir(exist_ok=True)
        argv += ["--cache", str(folder / "cache")]
    program = shlex.join(argv)
    report = folder / f"report-{name}.json"
    report.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "pytest",
        *scenarios,
        "-q",
        "-p",
        "no:cacheprovider",
        "--cmg-download-program",
        program,
        "--cmg-conformance-report",
        str(report),
    ]
    if workers:
        argv += ["-n", str(workers)]
    else:
        argv += ["-p", "no:xdist"]
    completed = subprocess.run(
        argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    data = json.loads(report.read_text(encoding="utf-8")) if report.exists() else {"items": []}
    data["returncode"] = completed.returncode
    data["output"] = (completed.stdout + completed.stderr)[-4000:]
    return data


def failures(data: dict) -> list[tuple[str, str]]:
    """``(nodeid, the first failed rule or the error)`` of each failed item."""
    found = []
    for item in data["items"]:
        if item["status"] != "failed":
            continue
        first = (item.get("failures") or [{}])[0]
        found.append((item["nodeid"], first.get("key") or str(item.get("error"))[:120]))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="*", default=["scenarios"])
    parser.add_argument("--members", default="", help="comma-separated (default: all)")
    parser.add_argument("--json", type=Path, help="write {member: [[nodeid, rule], ...]} here")
    parser.add_argument("--workers", type=int, default=2)
    options = parser.parse_args()
    names = [m for m in options.members.split(",") if m] or [m.name for m in zoo.MEMBERS]
    matrix: dict[str, list[tuple[str, str]]] = {}
    with tempfile.TemporaryDirectory(prefix="acp-zoo-") as tmp:
        for name in names:
            data = run_member(name, options.scenarios, Path(tmp) / name, workers=options.workers)
            matrix[name] = failures(data)
            verdict = f"killed by {len(matrix[name])}" if matrix[name] else "SURVIVED"
            print(f"{name}: {verdict} (pytest exit {data['returncode']})", flush=True)
            for nodeid, rule in matrix[name]:
                print(f"    {nodeid}: {rule}", flush=True)
    killed = sum(1 for found in matrix.values() if found)
    print(f"kill rate: {killed}/{len(matrix)}")
    if options.json:
        options.json.write_text(json.dumps(matrix, indent=2) + "\n", encoding="utf-8")
    return 0 if killed == len(matrix) else 1


if __name__ == "__main__":
    sys.exit(main())
