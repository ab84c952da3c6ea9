"""Benchmark scenarios: the ``benchmark`` key, ``expect.throughput`` and the figures' reporting.

Unit tests judge the ratio logic on given seconds (no timing is asserted anywhere); validation
tests check what a benchmark refuses, at its line; one pytester session runs two tiny benchmark
scenarios end to end for the terminal summary and the --junitxml properties.
"""

from __future__ import annotations

import http.server
import textwrap
import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import ClassVar

import pytest

# Imported before any inner session, as in test_plugin.py: pytester's in-process runs drop
# modules first imported inside them, and cryptography's bindings reject re-imported classes.
import pytest_cmg._gateway.server
import pytest_cmg._net.proxy
import pytest_cmg._storage.clouddp  # noqa: F401
from pytest_cmg._client.cache import ClientCache
from pytest_cmg._client.engine import PackageTransfer, TaskSequenceResult
from pytest_cmg._errors import ScenarioError
from pytest_cmg._scenario.benchmark import (
    BenchmarkRound,
    Throughput,
    hashlib_seconds,
    raw_seconds,
    report_lines,
    terminal_summary,
    throughput_properties,
)
from pytest_cmg._scenario.expectations import ScenarioRun, check_expectations
from pytest_cmg._scenario.items import ScenarioFailed
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.model import BenchmarkSpec
from pytest_cmg._scenario.spec import Bounds
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

BENCHMARK = """\
scenario: a benchmark
seed: 3
packages:
  - id: PS100012
    type: os_upgrade
    files: 2
    size: 1MiB
  - id: PS100013
    type: driver
    files: 3
    size: 48KiB
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
benchmark: {baseline: hashlib, rounds: 3}
expect:
  outcome: success
  throughput:
    PS100012: {at_least: 0.5}
"""


def write(tmp_path: Path, text: str, name: str = "b.cmg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def problems(tmp_path: Path, text: str) -> list[tuple[int, str, str]]:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return [(p.line, p.rule, p.hint) for p in info.value.problems]


# --- the figures ------------------------------------------------------------------------------


def figure(*rounds: tuple[float, float], package: str = "PS100012") -> Throughput:
    return Throughput(
        package, "hashlib", 4, 100_000_000, tuple(BenchmarkRound(c, b) for c, b in rounds), 1.5
    )


def test_a_round_ratio_is_the_chain_rate_over_the_baseline_rate_on_the_same_bytes() -> None:
    # Same bytes on both sides: 2 s for the chain against 0.5 s of hashing is a quarter.
    assert BenchmarkRound(seconds=2.0, baseline_seconds=0.5).ratio == 0.25
    assert BenchmarkRound(seconds=0.5, baseline_seconds=1.0).ratio == 2.0


def test_the_judged_ratio_is_the_median_of_the_rounds() -> None:
    # One disturbed round (the 10 s one) does not move the figure judged.
    measured = figure((2.0, 1.0), (10.0, 1.0), (2.5, 1.0))
    assert measured.ratio == 0.4
    assert measured.seconds == 2.5
    assert measured.mb_per_s == pytest.approx(40.0)
    assert measured.files_per_s == pytest.approx(1.6)
    assert measured.baseline_mb_per_s == pytest.approx(100.0)
    assert "ratio 0.400" in measured.describe()
    assert [line.split(",")[-1] for line in measured.round_lines()[:3]] == [
        " ratio 0.500",
        " ratio 0.100",
        " ratio 0.400",
    ]


def test_the_figures_become_user_properties_with_their_bounds() -> None:
    props = dict(throughput_properties([figure((2.0, 1.0))], {"PS100012": Bounds(0.3, None)}))
    assert props["throughput[PS100012].ratio"] == 0.5
    assert props["throughput[PS100012].baseline"] == "hashlib"
    assert props["throughput[PS100012].mb_per_s"] == 50.0
    assert props["throughput[PS100012].files_per_s"] == 2.0
    assert props["throughput[PS100012].at_least"] == 0.3
    assert "throughput[PS100012].at_most" not in props
    assert "(expected at least 0.3)" in report_lines(
        [figure((2.0, 1.0))], {"PS100012": Bounds(0.3)}
    )


class _Report:
    def __init__(self, nodeid: str, outcome: str, properties: list[tuple[str, object]]) -> None:
        self.nodeid, self.outcome, self.when, self.user_properties = (
            nodeid,
            outcome,
            "call",
            properties,
        )


class _Reporter:
    def __init__(self, stats: dict[str, list[object]]) -> None:
        self.stats = stats
        self.lines: list[str] = []

    def write_sep(self, sep: str, title: str) -> None:
        self.lines.append(f"== {title} ==")

    def write_line(self, line: str) -> None:
        self.lines.append(line)


def test_the_terminal_summary_shows_every_benchmark_item_met_or_not() -> None:
    fast = throughput_properties([figure((1.0, 1.0))], {"PS100012": Bounds(0.3)})
    slow = throughput_properties([figure((10.0, 1.0))], {"PS100012": Bounds(0.3)})
    reporter = _Reporter(
        {
            "passed": [_Report("a.cmg.yaml::fast", "passed", fast)],
            "failed": [_Report("b.cmg.yaml::slow", "failed", slow)],
            "": [_Report("c.cmg.yaml::plain", "passed", [])],
        }
    )
    terminal_summary(reporter)  # type: ignore[arg-type]
    text = "\n".join(reporter.lines)
    assert "== pytest-cmg scenario throughput ==" in text
    assert "a.cmg.yaml::fast\n" in text
    assert "b.cmg.yaml::slow (FAILED)" in text
    assert "plain" not in text
    rows = [line for line in reporter.lines if line.lstrip().startswith("PS100012")]
    assert rows[0].endswith(">= 0.3 met") and " 1.000 " in rows[0]
    assert rows[1].endswith(">= 0.3 NOT MET") and " 0.100 " in rows[1]


def test_no_summary_without_benchmark_items() -> None:
    reporter = _Reporter({"passed": [_Report("a.cmg.yaml::plain", "passed", [("x", 1)])]})
    terminal_summary(reporter)  # type: ignore[arg-type]
    assert reporter.lines == []


# --- expect.throughput judged at its line ---------------------------------------------------


def run_with(
    tmp_path: Path, transfers: list[PackageTransfer], figures: list[Throughput]
) -> ScenarioRun:
    return ScenarioRun(
        result=TaskSequenceResult(0, ["Upgrade the operating system"], transfers),
        smsts=[],
        gateway_log=[],
        requests=[],
        cache=ClientCache(tmp_path / "ccmcache", size_mb=1),
        manifests={},
        blob_endpoint="http://127.0.0.1:1/devstoreaccount1",
        cmg_url="https://127.0.0.1:2",
        workdir=tmp_path,
        throughput={f.package_id: f for f in figures},
    )


def test_a_ratio_below_its_floor_fails_at_its_yaml_line(tmp_path: Path) -> None:
    path = write(tmp_path, BENCHMARK)
    scenario = load_scenario(path)
    assert scenario.benchmark == BenchmarkSpec(baseline="hashlib", rounds=3)
    transfer = PackageTransfer("PS100012", 1, 2, 1 << 20, 4.0, from_cache=False)
    slow = figure((4.0, 1.0), (5.0, 1.0), (3.0, 1.0))  # ratios 0.25, 0.2, 0.333: median 0.25

    failures = check_expectations(scenario, run_with(tmp_path, [transfer], [slow]))

    line = line_of(path, "PS100012: {at_least: 0.5}")
    assert [(f.line, f.expectation) for f in failures] == [(line, "expect.throughput.PS100012")]
    text = ScenarioFailed(failures, tmp_path, scenario).render(tmp_path)
    assert f"b.cmg.yaml:{line}: expectation expect.throughput.PS100012 failed" in text
    assert f"  {line:>4} |     PS100012: {{at_least: 0.5}}" in text
    assert "expected: a ratio at least 0.5 (PS100012's verified download rate / the hashlib" in text
    assert "actual:   0.250 (PS100012: 4 file(s), 100.0 MB: chain 25.0 MB/s" in text
    assert "round 2: chain 5.000s, hashlib 1.000s, ratio 0.200" in text

    fast = figure((1.0, 1.0), (2.0, 1.0), (1.5, 1.0))  # median 0.667
    assert check_expectations(scenario, run_with(tmp_path, [transfer], [fast])) == []


def test_a_package_never_read_from_storage_is_not_measured(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, BENCHMARK))
    cached = PackageTransfer("PS100012", 1, 0, 0, 0.0, from_cache=True)
    failures = check_expectations(scenario, run_with(tmp_path, [cached], []))
    assert len(failures) == 1
    assert "not measured: PS100012 was not read from storage in this run" in failures[0].detail
    assert "PS100012.1: from the cache" in failures[0].detail


def test_a_later_round_that_fails_is_reported_at_the_rounds_line(tmp_path: Path) -> None:
    path = write(tmp_path, BENCHMARK)
    scenario = load_scenario(path)
    transfer = PackageTransfer("PS100012", 1, 2, 1 << 20, 1.0, from_cache=False)
    run = run_with(tmp_path, [transfer], [figure((1.0, 1.0))])
    run.benchmark_errors.append("round 2 failed 0x80040102 at step 'Upgrade the operating system'")
    failures = check_expectations(scenario, run)
    assert [(f.line, f.expectation) for f in failures] == [
        (line_of(path, "benchmark:"), "benchmark.rounds")
    ]
    assert "round 2 failed 0x80040102" in failures[0].detail


# --- what a benchmark scenario refuses, at its line ------------------------------------------


def test_what_needs_the_fault_proxy_is_refused_at_its_line(tmp_path: Path) -> None:
    text = BENCHMARK.replace(
        "benchmark: {baseline: hashlib, rounds: 3}\n",
        "cmg:\n  measure_egress: true\n"
        "benchmark: {baseline: hashlib, rounds: 3}\n"
        "faults:\n"
        "  - gateway: {endpoint: manifest, request: 1, status: 503}\n"
        "  - storage: {request: 1, reset_after: 300KiB}\n",
    ).replace(
        "  outcome: success\n",
        "  outcome: success\n  storage_bytes: {PS100012: 1MiB}\n  storage_requests: 2\n",
    )
    path = write(tmp_path, text)
    found = problems(tmp_path, text)
    lines = {rule.split(":", 1)[1].strip(): line for line, rule, _ in found}
    assert len(found) == 4, found
    bottleneck = "needs a Python proxy between them, which would be the bottleneck"
    assert all("a benchmark scenario's client reaches storage directly" in r for _, r, _ in found)
    assert all(bottleneck in r for _, r, _ in found)
    assert lines == {
        f"measured egress (a counting proxy) {bottleneck} the benchmark measures": line_of(
            path, "measure_egress: true"
        ),
        f"a storage fault {bottleneck} the benchmark measures": line_of(path, "- storage:"),
        f"expect.storage_bytes (counted by the fault proxy) {bottleneck} the benchmark "
        "measures": line_of(path, "storage_bytes:"),
        f"expect.storage_requests (counted by the fault proxy) {bottleneck} the benchmark "
        "measures": line_of(path, "storage_requests:"),
    }
    hints = {hint for _, _, hint in found}
    assert "move this fault to a scenario without benchmark; gateway faults are allowed" in hints


def test_gateway_faults_are_allowed_in_a_benchmark(tmp_path: Path) -> None:
    text = BENCHMARK.replace(
        "benchmark: {baseline: hashlib, rounds: 3}\n",
        "benchmark: {baseline: raw}\n"
        "faults:\n  - gateway: {endpoint: manifest, request: 1, status: 503}\n",
    )
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.benchmark == BenchmarkSpec(baseline="raw", rounds=1)
    assert [event.kind for event in scenario.timeline] == ["gateway"]


def test_a_case_that_adds_a_storage_fault_names_the_case(tmp_path: Path) -> None:
    text = BENCHMARK + textwrap.dedent(
        """\
        cases:
          - id: plain
          - id: cut
            set: {faults: [{storage: {request: 1, reset_after: 1KiB}}]}
        """
    )
    found = problems(tmp_path, text)
    assert len(found) == 1
    assert "would be the bottleneck" in found[0][1]
    assert found[0][2].endswith("in case cut")


def test_throughput_mistakes_are_reported_at_their_lines(tmp_path: Path) -> None:
    text = BENCHMARK.replace(
        "    PS100012: {at_least: 0.5}\n",
        "    PS100012: 0.5\n    PS100099: {at_least: 0.1}\n    PS100013: {at_least: 0.4, at_most: 0.2}\n",
    )
    path = write(tmp_path, text)
    found = problems(tmp_path, text)
    assert found == [
        (
            line_of(path, "PS100012: 0.5"),
            "expect.throughput.PS100012 must be a mapping with at_least and/or at_most, each a "
            "number >= 0, not 0.5",
            "a measured figure is never exact: write {at_least: 0.5}",
        ),
        (
            line_of(path, "PS100099"),
            "throughput names undeclared package PS100099",
            "declared packages: PS100012, PS100013",
        ),
        (
            line_of(path, "PS100013: {at_least"),
            "expect.throughput.PS100013: at_least 0.4 is more than at_most 0.2",
            "",
        ),
    ]


def test_throughput_without_a_benchmark_is_refused(tmp_path: Path) -> None:
    text = BENCHMARK.replace("benchmark: {baseline: hashlib, rounds: 3}\n", "")
    path = write(tmp_path, text)
    # A block mapping's value starts on its first entry's line: that is where it is reported.
    assert problems(tmp_path, text) == [
        (
            line_of(path, "PS100012: {at_least: 0.5}"),
            "expect.throughput needs a benchmark key: the rate is measured against the "
            "benchmark's baseline",
            "add benchmark: {baseline: hashlib}",
        )
    ]


def test_benchmark_settings_are_checked(tmp_path: Path) -> None:
    text = BENCHMARK.replace("{baseline: hashlib, rounds: 3}", "{baseline: sha, rounds: 0}")
    path = write(tmp_path, text)
    line = line_of(path, "benchmark:")
    assert problems(tmp_path, text) == [
        (line, "benchmark.baseline 'sha' is not one of hashlib, raw", ""),
        (line, "benchmark.rounds must be an integer from 1 to 9, got 0", ""),
    ]


def test_the_benchmark_marker_is_added_once(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, BENCHMARK))
    assert [(m.name, m.where) for m in scenario.markers] == [("benchmark", "benchmark")]
    marked = load_scenario(
        write(tmp_path, BENCHMARK + "markers: [slow, benchmark]\n", "m.cmg.yaml")
    )
    assert [m.name for m in marked.markers] == ["slow", "benchmark"]
    plain = load_scenario(
        write(
            tmp_path,
            BENCHMARK.replace("benchmark: {baseline: hashlib, rounds: 3}\n", "").split(
                "  throughput:"
            )[0],
            "p.cmg.yaml",
        )
    )
    assert plain.benchmark is None
    assert plain.markers == ()


# --- the baselines ---------------------------------------------------------------------------


def test_hashlib_baseline_hashes_any_size() -> None:
    # Sizes that are not a multiple of the 1 MiB update or of the buffer still end.
    assert hashlib_seconds(1) >= 0.0
    assert hashlib_seconds(3 * (1 << 20) + 7) > 0.0


class _Blobs(http.server.BaseHTTPRequestHandler):
    sizes: ClassVar[dict[str, int]] = {"/c/a": 3000, "/c/b": 5, "/c/missing": -1}

    def do_GET(self) -> None:
        size = self.sizes.get(self.path.split("?")[0], -1)
        if size < 0:
            self.send_response(404)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"not found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        self.wfile.write(b"x" * size)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def blob_server():
    _Blobs.protocol_version = "HTTP/1.1"  # keep-alive, as storage answers
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_raw_baseline_reads_every_blob_and_checks_the_total(blob_server: str) -> None:
    urls = [f"{blob_server}/c/a?sig=x", f"{blob_server}/c/b?sig=y"]
    assert raw_seconds(urls, 3005, workers=8, ca_file=None) >= 0.0
    assert raw_seconds(urls, 3005, workers=1, ca_file=None) >= 0.0
    with pytest.raises(RuntimeError, match="raw baseline read 3005 bytes, the package has 3006"):
        raw_seconds(urls, 3006, workers=2, ca_file=None)
    with pytest.raises(RuntimeError, match="raw baseline GET answered 404"):
        raw_seconds([f"{blob_server}/c/missing?sig=z"], 1, workers=1, ca_file=None)


# --- end to end: terminal summary, junitxml, marker ------------------------------------------


@pytest.fixture(scope="session")
def azurite_cache():
    return str(cache_dir())


def test_figures_reach_the_terminal_and_junitxml_pass_or_fail(pytester, azurite_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, azurite_cache)
    folder = pytester.path / "scenarios"
    folder.mkdir()
    small = BENCHMARK.replace("size: 1MiB", "size: 256KiB").replace(
        "benchmark: {baseline: hashlib, rounds: 3}", "benchmark: {baseline: raw, rounds: 2}"
    )
    (folder / "meets.cmg.yaml").write_text(
        small.replace("a benchmark", "meets").replace("{at_least: 0.5}", "{at_least: 0}")
    )
    # No chain is a millionth of storage's raw rate: this floor fails every time.
    failing = small.replace("a benchmark", "misses").replace(
        "{at_least: 0.5}", "{at_most: 0.000001}"
    )
    (folder / "misses.cmg.yaml").write_text(failing)
    line = failing.splitlines().index("    PS100012: {at_most: 0.000001}") + 1

    result = pytester.runpytest("-p", "no:cacheprovider", "-m", "benchmark", "--junitxml=junit.xml")

    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            f"scenarios/misses.cmg.yaml:{line}: expectation expect.throughput.PS100012 failed",
            "  expected: a ratio at most 1e-06 (PS100012's verified download rate / the raw *",
            "*= pytest-cmg scenario throughput =*",
            "*package*files*MB/s*files/s*baseline*ratio*expected",
            "scenarios/meets.cmg.yaml::meets",
            "  PS100012 * 2 * raw * >= 0.0 met",
            "scenarios/misses.cmg.yaml::misses (FAILED)",
            "  PS100012 * 2 * raw * <= 1e-06 NOT MET",
        ]
    )
    cases = ET.parse(pytester.path / "junit.xml").getroot().iter("testcase")
    for case in cases:
        props = {p.get("name"): p.get("value") for p in case.iter("property")}
        assert props["throughput[PS100012].baseline"] == "raw"
        assert props["throughput[PS100012].rounds"] == "2"
        assert props["throughput[PS100012].files"] == "2"
        assert props["throughput[PS100012].bytes"] == str(256 * 1024)
        assert float(props["throughput[PS100012].ratio"]) > 0
        assert float(props["throughput[PS100012].mb_per_s"]) > 0
    # Only the benchmark scenarios were selected, by the marker they got without asking.
    assert len(list(ET.parse(pytester.path / "junit.xml").getroot().iter("testcase"))) == 2


def test_the_published_schema_knows_benchmarks() -> None:
    import json

    import jsonschema
    import yaml

    root = Path(__file__).resolve().parent.parent
    schema = json.loads((root / "docs" / "scenario.schema.json").read_text(encoding="utf-8"))
    check = jsonschema.Draft202012Validator(schema)
    base = yaml.safe_load(BENCHMARK)
    assert check.is_valid(base)
    for change in (
        {"benchmark": {"baseline": "sha"}},
        {"benchmark": {"rounds": 0}},
        {"benchmark": {"round": 2}},
        {"expect": {"outcome": "success", "throughput": {"PS100012": 0.5}}},
        {"expect": {"outcome": "success", "throughput": {"PS100012": {"minimum": 0.5}}}},
    ):
        assert not check.is_valid({**base, **change}), change
