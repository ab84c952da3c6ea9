"""docs/reliability.md stays true: the map from reliability.md's test battery to this repo's tests.

The table is parsed as text and every reference in it is checked against the files themselves,
by AST for tests (no pytest collection, no subprocess): a renamed or deleted test, a scenario
that moved, a row that went missing, or an issue-4 row (1-20, 38-42) that is no longer covered
fails here. The parser is checked on small tables of its own too, so a parser that saw nothing
cannot pass.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
BATTERY = "tests/test_reliability_battery.py"

#: The battery's rows as reliability.md section (ii) names them.
NAMES = {
    1: "int_single_byte_flip",
    2: "int_wrong_version_blob",
    3: "int_truncated_blob_with_consistent_headers",
    4: "int_storage_md5_stale",
    5: "int_missing_storage_md5",
    6: "int_blob_overwritten_mid_download",
    7: "int_range_ignored_200",
    8: "int_content_range_lies",
    9: "res_reset_at_50pct",
    10: "res_truncate_fin_repeatedly",
    11: "res_kill9_then_restart",
    12: "res_kill9_during_finalize",
    13: "res_stall_no_progress",
    14: "res_server_drops_range_support_midway",
    15: "retry_5xx_transient",
    16: "retry_fatal_not_retried",
    17: "retry_408_and_429_retry_after",
    18: "retry_budget_exhausted",
    19: "retry_backoff_jitter_bounds",
    20: "retry_connect_refused_then_up",
    21: "sas_expires_mid_download",
    22: "sas_not_yet_valid_clock_skew",
    23: "sas_tampered_fields",
    24: "sas_ip_restriction_not_emulated",
    25: "sas_https_only",
    26: "sas_scope_and_privilege",
    27: "sas_public_container_guard",
    28: "sas_never_logged_or_persisted",
    29: "cmg_plain_http_rejected",
    30: "cmg_tls_floor",
    31: "cmg_server_cert_validation_by_client",
    32: "cmg_mtls_matrix",
    33: "cmg_token_matrix",
    34: "cmg_url_filter_and_length",
    35: "cmg_input_fuzz",
    36: "cmg_content_authorization",
    37: "cmg_no_credentials_in_content_or_policy",
    38: "disk_precheck_too_large",
    39: "disk_enospc_mid_write",
    40: "disk_evict_non_active_only",
    41: "conc_same_content_twice",
    42: "conc_many_clients_smoke",
}
#: Issue 4's "done when": these rows must be covered.
REQUIRED = frozenset(range(1, 21)) | frozenset(range(38, 43))
STATUSES = ("covered", "partly", "not modelled")

_ROW = re.compile(r"^\|\s*(\d+)\s*\|")
_REF = re.compile(r"`([^`]+)`")
_PARAMS = re.compile(r"\[[^\]]*\]$")


@dataclass(frozen=True)
class Row:
    line: int
    number: int
    name: str
    status: str
    refs: tuple[str, ...]
    asserts: str


def parse(text: str) -> tuple[list[Row], list[str]]:
    """The table's rows, and the lines that look like rows but cannot be read."""
    rows: list[Row] = []
    problems: list[str] = []
    for index, line in enumerate(text.splitlines(), start=1):
        match = _ROW.match(line)
        if match is None:
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) != 5:
            problems.append(f"line {index}: {len(cells)} cells, expected 5")
            continue
        number, name, status, covered_by, asserts = cells
        rows.append(Row(index, int(number), name, status, tuple(_REF.findall(covered_by)), asserts))
    return rows, problems


@dataclass(frozen=True)
class _Test:
    xfail: bool


def _is_xfail(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "xfail"


@functools.cache
def functions_in(path: Path) -> dict[str, _Test]:
    """Test functions of a file by name (``Class::method`` for methods), read by AST."""
    found: dict[str, _Test] = {}
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def add(prefix: str, node: ast.FunctionDef | ast.AsyncFunctionDef, inherited: bool) -> None:
        xfail = inherited or any(_is_xfail(d) for d in node.decorator_list)
        found[prefix + node.name] = _Test(xfail)

    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            add("", node, False)
        elif isinstance(node, ast.ClassDef):
            marked = any(_is_xfail(d) for d in node.decorator_list)
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    add(f"{node.name}::", item, marked)
    return found


def resolve(ref: str, root: Path) -> tuple[str | None, bool]:
    """(a problem or None, whether the reference is a test expected to fail)."""
    if ref.startswith("scenarios/"):
        if not ref.endswith(".cmg.yaml"):
            return f"{ref}: a scenario reference names a .cmg.yaml file", False
        return (None if (root / ref).is_file() else f"{ref}: no such scenario file"), False
    if not ref.startswith("tests/") or "::" not in ref:
        return f"{ref}: expected tests/<file>.py::<test> or scenarios/<path>.cmg.yaml", False
    file, _, name = ref.partition("::")
    path = root / file
    if not path.is_file():
        return f"{ref}: no such file {file}", False
    test = functions_in(path).get(_PARAMS.sub("", name))
    if test is None:
        return f"{ref}: no function {name} in {file}", False
    return None, test.xfail


def problems_of(text: str, root: Path) -> list[str]:
    """Everything wrong with a map document: rows, names, statuses, references, coverage."""
    rows, problems = parse(text)
    numbers = [row.number for row in rows]
    if numbers != sorted(NAMES):
        problems.append(f"rows {numbers} are not 1..{max(NAMES)} in order, each once")
    for row in rows:
        where = f"row {row.number} (line {row.line})"
        if NAMES.get(row.number) != row.name:
            problems.append(
                f"{where}: named {row.name!r}, reliability.md says {NAMES.get(row.number)!r}"
            )
        if row.status not in STATUSES:
            problems.append(f"{where}: status {row.status!r} is not one of {STATUSES}")
        if row.status != "not modelled" and not row.refs:
            problems.append(f"{where}: {row.status} but names no test")
        if row.status == "partly" and "Not " not in row.asserts:
            problems.append(f"{where}: partly, but does not say what is not tested or modelled")
        if not row.asserts:
            problems.append(f"{where}: says nothing about what the tests assert")
        passing = 0
        for ref in row.refs:
            problem, xfail = resolve(ref, root)
            if problem is not None:
                problems.append(f"{where}: {problem}")
            elif not xfail:
                passing += 1
        if row.number in REQUIRED:
            if row.status != "covered":
                problems.append(f"{where}: issue 4 needs it covered, it is {row.status}")
            elif passing == 0:
                problems.append(f"{where}: covered only by tests expected to fail")
    return problems


# --- the document ---------------------------------------------------------------------------


def test_the_map_is_complete_and_every_reference_exists() -> None:
    assert problems_of(DOC.read_text(encoding="utf-8"), ROOT) == []


def test_the_map_has_all_42_rows_and_issue_4_rows_are_covered() -> None:
    rows, unreadable = parse(DOC.read_text(encoding="utf-8"))
    assert unreadable == []
    assert [row.number for row in rows] == list(range(1, 43))
    assert {row.number for row in rows if row.status == "covered"} >= REQUIRED
    assert sum(len(row.refs) for row in rows) >= len(rows)


def test_every_battery_test_is_on_the_map() -> None:
    # A test written to fill a gap and then left off the map would be a gap again.
    rows, _ = parse(DOC.read_text(encoding="utf-8"))
    named = {
        _PARAMS.sub("", ref.partition("::")[2])
        for row in rows
        for ref in row.refs
        if ref.startswith(BATTERY + "::")
    }
    battery = {name for name in functions_in(ROOT / BATTERY) if name.startswith("test_")}
    assert battery and battery <= named, sorted(battery - named)


# --- the checker itself, on tables of its own -----------------------------------------------


def _doc(cells: dict[int, str]) -> str:
    lines = [
        "| # | Test | Status | Covered by | What the covering tests assert |",
        "|---|---|---|---|---|",
    ]
    for number, name in NAMES.items():
        default = f"covered | `{BATTERY}::test_row01_a_byte_flipped_at_7_mib_is_fatal_with_no_retry_storm` | ok"
        lines.append(f"| {number} | {name} | {cells.get(number, default)} |")
    return "\n".join(lines) + "\n"


def test_the_checker_accepts_a_well_formed_table() -> None:
    assert problems_of(_doc({}), ROOT) == []


def test_the_checker_finds_what_is_wrong() -> None:
    text = _doc(
        {
            2: "covered | `tests/test_reliability_battery.py::test_no_such_test` | x",
            3: "covered | `tests/test_no_such_file.py::test_x` | x",
            4: "covered | `scenarios/integrity/no-such.cmg.yaml` | x",
            5: "partly | `scenarios/integrity/flipped-byte-is-a-hash-mismatch.cmg.yaml` | x",
            6: "covered | `tests/test_sas_and_inputs.py::test_sas_restricted_to_another_ip_is_refused_by_storage` | x",
            21: "not covered |  | x",
            22: "partly |  | Not tested: y",
        }
    ).replace("| 7 | int_range_ignored_200 |", "| 7 | something_else |")
    found = "\n".join(problems_of(text, ROOT))
    for expected in (
        "row 2 (line 4): tests/test_reliability_battery.py::test_no_such_test: no function",
        "row 3 (line 5): tests/test_no_such_file.py::test_x: no such file",
        "row 4 (line 6): scenarios/integrity/no-such.cmg.yaml: no such scenario file",
        "row 5 (line 7): issue 4 needs it covered, it is partly",
        "row 5 (line 7): partly, but does not say what is not tested or modelled",
        "row 6 (line 8): covered only by tests expected to fail",
        "row 7 (line 9): named 'something_else'",
        "row 21 (line 23): status 'not covered' is not one of",
        "row 22 (line 24): partly but names no test",
    ):
        assert expected in found, found


def test_the_checker_wants_every_row_once() -> None:
    lines = _doc({}).splitlines()
    duplicated = "\n".join([*lines[:5], lines[4], *lines[5:]])
    assert any("not 1..42 in order" in p for p in problems_of(duplicated, ROOT))
    assert any("cells, expected 5" in p for p in problems_of(_doc({9: "covered | x"}), ROOT))


def test_parametrised_and_class_references_resolve(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.parametrize('n', [1])\ndef test_p(n): pass\n\n"
        "class TestC:\n    def test_m(self): pass\n\n"
        "@pytest.mark.xfail(strict=True, reason='r')\ndef test_f(): pass\n",
        encoding="utf-8",
    )
    assert resolve("tests/test_x.py::test_p[1]", tmp_path) == (None, False)
    assert resolve("tests/test_x.py::TestC::test_m", tmp_path) == (None, False)
    assert resolve("tests/test_x.py::test_f", tmp_path) == (None, True)
    assert resolve("tests/test_x.py::test_m", tmp_path)[0] is not None
    assert resolve("test_x.py::test_p", tmp_path)[0] is not None


def test_every_test_named_for_issue_10_exists() -> None:
    # The issue-10 table names tests by path; a rename must not leave the map pointing nowhere.
    text = DOC.read_text(encoding="utf-8")
    section = text.split("## Broken and hostile clients", 1)[1].split("\n## ", 1)[0]
    refs = [ref for ref in _REF.findall(section) if ref.startswith("tests/") and "::" in ref]
    assert len(refs) >= 15
    problems = [f"{ref}: {problem}" for ref in refs if (problem := resolve(ref, ROOT)[0])]
    assert problems == []
