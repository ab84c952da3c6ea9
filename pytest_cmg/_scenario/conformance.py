"""Conformance mode: the scenario suite run against another downloader, item by item.

``--cmg-download-program CMD`` runs every scenario with ``CMD`` as the task sequence's alternate
content provider (:func:`.runner.with_download_program`); a scenario whose ``requires`` names
something else is skipped as not applicable, with the reason its declaration gives.
``--cmg-conformance-report PATH`` writes one record per scenario item, built from the test
reports (their ``user_properties``, set in :mod:`.items`), so it works under xdist, where the
items run in workers and only the reports reach the controller.
"""

from __future__ import annotations

import json
import shlex
from typing import TYPE_CHECKING, Any

import pytest

from .items import CONFORMANCE_FAILED, CONFORMANCE_ITEM

if TYPE_CHECKING:
    from pathlib import Path

    from _pytest.terminal import TerminalReporter

__all__ = [
    "REPORT_VERSION",
    "STATUSES",
    "Conformance",
    "check_download_program",
    "check_report_path",
]

#: The report's ``format`` (raised when a field changes meaning or goes away).
REPORT_VERSION = 1
#: An item's status in the report, in the order the summary counts them. ``skipped`` is an item
#: skipped for another reason than its ``requires`` (its own skip or skipif marker).
STATUSES = ("passed", "failed", "not_applicable", "skipped")


def check_download_program(program: str, here: Path) -> str:
    """``program`` as the engine will run it, or :class:`pytest.UsageError` saying why not.

    A relative path (``./acp.sh``) is made absolute against ``here`` (where pytest was started,
    or the rootdir for the ini value), since the engine starts the program from whatever folder
    the run (or an xdist worker) is in.
    """
    from .._client.acp import ProgramProvider, locate_program

    try:
        ProgramProvider(program)
    except ValueError as error:
        msg = f"--cmg-download-program: {error}"
        raise pytest.UsageError(msg) from None
    argv = shlex.split(program)
    try:
        located = locate_program(argv[0], here)
    except ValueError as error:
        msg = f"--cmg-download-program={program!r}: {error}"
        raise pytest.UsageError(msg) from None
    if located == argv[0]:
        return program  # a name on PATH: the engine finds it as the check did
    return shlex.join([located, *argv[1:]])


def check_report_path(value: str, here: Path) -> Path:
    """Where the report goes, or :class:`pytest.UsageError` when it cannot be written there."""
    path = here / value
    if not value.strip() or path.is_dir():
        msg = (
            f"--cmg-conformance-report={value!r} is not a file path; name the JSON file to "
            "write, e.g. --cmg-conformance-report=conformance.json"
        )
        raise pytest.UsageError(msg)
    if not path.parent.is_dir():
        msg = (
            f"--cmg-conformance-report={value!r}: the folder {path.parent} does not exist; "
            "create it first or write the report elsewhere"
        )
        raise pytest.UsageError(msg)
    return path


class Conformance:
    """The records of one run, gathered from the reports as they arrive."""

    def __init__(self, program: str | None, report: Path | None) -> None:
        self.program = program
        self.report = report
        self.records: dict[str, dict[str, Any]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.add(report)

    def add(self, report: pytest.TestReport) -> None:
        """Fold one phase's report (setup, call, teardown) into its item's record."""
        props = dict(getattr(report, "user_properties", None) or [])
        item = props.get(CONFORMANCE_ITEM)
        if not isinstance(item, dict):
            return  # not a scenario item
        record = self.records.setdefault(
            report.nodeid,
            {
                "nodeid": report.nodeid,
                "scenario": item.get("scenario"),
                "file": item.get("file"),
                "line": item.get("line"),
                "status": "passed",
            },
        )
        if item.get("not_judged"):
            record["not_judged"] = item["not_judged"]
        if record["status"] == "failed":
            return  # a failure stays the item's verdict, whatever a later phase says
        if report.failed:
            record["status"] = "failed"
            failures = props.get(CONFORMANCE_FAILED)
            if failures:
                record["failures"] = failures
            else:
                # Not an expectation: the run itself broke (or a setup or teardown did).
                crash = getattr(report.longrepr, "reprcrash", None)
                message = getattr(crash, "message", None) or str(report.longrepr)
                record["error"] = f"{report.when}: {message}"
        elif report.skipped and report.when == "setup":
            reason = _skip_reason(report)
            if item.get("not_applicable"):
                record["status"] = "not_applicable"
                record["reason"] = item["not_applicable"]
            else:
                record["status"] = "skipped"
                record["reason"] = reason
        elif report.skipped and report.when == "call":
            record["status"] = "skipped"
            record["reason"] = _skip_reason(report)

    def counts(self) -> dict[str, int]:
        found = dict.fromkeys(STATUSES, 0)
        for record in self.records.values():
            found[record["status"]] += 1
        return found

    def document(self) -> dict[str, Any]:
        return {
            "format": REPORT_VERSION,
            "download_program": self.program,
            "counts": self.counts(),
            "items": [self.records[nodeid] for nodeid in sorted(self.records)],
        }

    def write(self) -> None:
        if self.report is not None:
            text = json.dumps(self.document(), indent=2, ensure_ascii=False)
            self.report.write_text(text + "\n", encoding="utf-8")

    def terminal_summary(self, reporter: TerminalReporter) -> None:
        counts = self.counts()
        reporter.write_sep("=", "pytest-cmg conformance")
        who = f"--cmg-download-program {self.program}" if self.program else "the built-in client"
        reporter.write_line(f"downloader: {who}")
        shown = ", ".join(f"{counts[s]} {s.replace('_', ' ')}" for s in STATUSES if counts[s])
        reporter.write_line(
            f"conformance: {shown or 'no scenario items'} (of {sum(counts.values())} scenario "
            "item(s))"
        )
        for record in sorted(self.records.values(), key=lambda r: r["nodeid"]):
            if record["status"] == "failed":
                first = (record.get("failures") or [{}])[0]
                where = f"{first.get('file')}:{first.get('line')} {first.get('key')}"
                reporter.write_line(
                    f"  FAILED {record['nodeid']}: "
                    + (where if first else str(record.get("error")))
                )
        if self.report is not None:
            reporter.write_line(f"report: {self.report}")


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)
