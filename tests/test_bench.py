"""The benchmark machinery, for real at a tiny scale (--quick, 1 round) and in its pure parts.

The full-size benchmark never runs in the suite (``--cmg-bench`` is off); these tests prove that
what it reports is computed right: statistics, ratios, targets, the JSON layout, the chart,
``--compare`` pass and fail, the refusal to run under xdist, and ``--download-program`` (the
reference ACP measured through a real fake CMG; programs that fail or lie; programs that cannot
run).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import http.server
import io
import json
import os
import statistics
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest

from pytest_cmg._bench._aria2 import Aria2, resolve_aria2
from pytest_cmg._bench._cases import Sample
from pytest_cmg._bench._compare import compare, load_baseline
from pytest_cmg._bench._rawget import get_all, get_all_verified
from pytest_cmg._bench._report import (
    PEAK_METRIC,
    CaseResult,
    MemoryProbe,
    WorkloadResult,
    build_report,
    render_table,
    time_stats,
)
from pytest_cmg._bench._workloads import FULL, QUICK, Workload, parse_workloads
from pytest_cmg._bench.command import EXIT_BREACHED, EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pytest_cmg._cli import main
from pytest_cmg._errors import BenchError
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REFERENCE_ACP = Path(__file__).resolve().parents[1] / "examples" / "acp" / "acp.py"
XDIST_ENV = ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT", "PYTEST_XDIST_TESTRUNUID")


def run_cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", *args])
    return code, out.getvalue()


# --- a real run at tiny scale -------------------------------------------------------------------


def test_quick_bench_measures_every_case_verifies_and_reports(tmp_path):
    report_path, chart_path = tmp_path / "run.json", tmp_path / "run.png"
    code, table = run_cli(
        "--quick", "--json", str(report_path), "--chart", str(chart_path), "--aria2", "cached", "-q"
    )
    assert code == EXIT_OK, table
    report = json.loads(report_path.read_text())

    # pytest-benchmark's top-level layout, plus our sections.
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(report)
    assert {"ratios", "targets", "bench"} <= set(report)
    assert report["bench"]["rounds"] == 1 and report["bench"]["quick"] is True

    cases = {(b["group"], b["extra_info"]["case"]): b for b in report["benchmarks"]}
    for workload in ("big", "m1", "k16"):
        for case in ("core", "sdk", "raw", "raw-verified", "hashlib"):
            assert (workload, case) in cases, (workload, case)
        # The verified ceiling ran (its files were checked by the runner) at a positive rate.
        assert cases[(workload, "raw-verified")]["extra_info"]["mb_per_s"]["median"] > 0
    aria2_measured = ("big", "aria2c") in cases
    unavailable = report["bench"]["unavailable"].get("big", {})
    assert aria2_measured != ("aria2c" in unavailable)
    if not aria2_measured:
        assert unavailable["aria2c"].startswith("not available: ")
    assert not any(case == "aria2c" for (group, case) in cases if group != "big")

    for (workload, case), bench in cases.items():
        stats, info = bench["stats"], bench["extra_info"]
        shape = QUICK[workload]
        assert stats["rounds"] == 1 and len(stats["data"]) == 1
        assert stats["min"] == stats["median"] == stats["max"] > 0
        assert stats["ops"] == pytest.approx(1 / stats["mean"])
        assert info["bytes"] == shape.total and info["files"] == shape.files
        assert info["mb_per_s"]["median"] == pytest.approx(shape.total / 1e6 / stats["median"])
        if shape.many:
            assert info["files_per_s"]["median"] == pytest.approx(shape.files / stats["median"])
        else:
            assert info["files_per_s"] is None
        assert info["cpu_percent"]["median"] >= 0
        if case != "hashlib":
            assert info["server_cpu_percent"] is not None  # Azurite's /proc/<pid>/stat delta

    # Ratios are medians of this run divided by each other.
    for workload, ratios in report["ratios"].items():
        core = cases[(workload, "core")]["extra_info"]["mb_per_s"]["median"]
        for base in ("raw-verified", "sdk", "raw", "hashlib"):
            other = cases[(workload, base)]["extra_info"]["mb_per_s"]["median"]
            assert ratios[f"core/{base}"] == pytest.approx(core / other)
        assert ("core/aria2c" in ratios) == (workload == "big" and aria2_measured)

    memory = report["bench"]["memory"]["big"]
    assert 0 < memory["baseline_mib"] <= memory["peak_mib"]
    assert set(report["bench"]["memory"]) == {"big"}
    targets = {(t["workload"], t["metric"]): t for t in report["targets"]}
    assert targets[("big", PEAK_METRIC)]["value"] == memory["peak_mib"]
    assert targets[("big", PEAK_METRIC)]["met"] == (memory["peak_mib"] <= 64)
    assert targets[("m1", "core/sdk")]["met"] == (report["ratios"]["m1"]["core/sdk"] >= 3.5)
    # Every workload is judged by the verified ceiling; hashlib and raw are information only.
    for workload in ("big", "m1", "k16"):
        ratio = report["ratios"][workload]["core/raw-verified"]
        assert targets[(workload, "core/raw-verified")]["value"] == ratio
        assert targets[(workload, "core/raw-verified")]["met"] == (ratio >= 0.9)
    assert not any(metric in ("core/hashlib", "core/raw") for _, metric in targets)

    for heading in (
        "big: 1 x 32 MiB",
        "m1: 16 x 1 MiB",
        "k16: 200 x 16 KiB",
        "core/sdk",
        "core/raw-verified",
    ):
        assert heading in table

    data = chart_path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and data[12:16] == b"IHDR"
    from matplotlib.image import imread

    height, width = imread(chart_path).shape[:2]
    assert width > 300 and height > 200

    # The saved run compared with itself passes even with no margin ...
    code, out = run_cli("--load", str(report_path), "--compare", str(report_path), "--margin", "0")
    assert code == EXIT_OK, out
    assert "figures within the margin" in out
    # ... and with a baseline whose core was twice as good, every ratio breaches.
    better = copy.deepcopy(report)
    better["ratios"] = {w: {k: 2 * v for k, v in r.items()} for w, r in report["ratios"].items()}
    baseline = tmp_path / "better.json"
    baseline.write_text(json.dumps(better))
    code, out = run_cli("--load", str(report_path), "--compare", str(baseline))
    assert code == EXIT_BREACHED
    breached = [line for line in out.splitlines() if line.strip().startswith("BREACHED")]
    assert len(breached) == sum(len(r) for r in report["ratios"].values())
    assert any("k16 core/raw" in line for line in breached)


# --- statistics, report, compare ----------------------------------------------------------------


def test_time_stats_use_pytest_benchmark_names_and_values():
    stats = time_stats([3.0, 1.0, 10.0, 2.0, 4.0])
    assert stats["min"] == 1.0 and stats["max"] == 10.0
    assert stats["median"] == 3.0 and stats["mean"] == 4.0
    assert stats["stddev"] == pytest.approx(statistics.stdev([1, 2, 3, 4, 10]))
    assert stats["rounds"] == 5 and stats["iterations"] == 1
    assert (stats["q1"], stats["q3"], stats["iqr"]) == (2.0, 4.0, 2.0)
    # 10 lies beyond q3 + 1.5 IQR = 7: one IQR outlier, and the whiskers stop at 1 and 4.
    assert stats["iqr_outliers"] == 1 and (stats["ld15iqr"], stats["hd15iqr"]) == (1.0, 4.0)
    assert stats["ops"] == 0.25 and stats["total"] == 20.0
    assert stats["data"] == [3.0, 1.0, 10.0, 2.0, 4.0]  # in round order
    single = time_stats([2.0])
    assert single["stddev"] == 0.0 and single["median"] == 2.0 and single["rounds"] == 1


def _result(workload, seconds_by_case, peak=None):
    result = WorkloadResult(workload)
    for case, seconds in seconds_by_case.items():
        result.cases[case] = CaseResult(case, f"{case} case")
        result.cases[case].samples = [Sample(s, s / 2, s / 4) for s in seconds]
    if peak is not None:
        result.memory = MemoryProbe(peak, 30.0, 1.0, "test")
    return result


BIG = Workload("big", 1, 100_000_000)
K16 = Workload("k16", 1000, 16 * 1024)


def synthetic_report(core_big=(1.0, 2.0, 1.5), peak=40.0):
    big = _result(
        BIG,
        {
            "core": core_big,
            "raw-verified": (1.0, 1.0, 1.0),
            "sdk": (3.0, 3.0, 3.0),
            "hashlib": (0.5, 0.5, 0.5),
            "raw": (1, 1, 1),
        },
        peak=peak,
    )
    big.unavailable["aria2c"] = "not available: disabled"
    k16 = _result(
        K16,
        {"core": (2.0,), "raw-verified": (1.9,), "sdk": (5.0,), "raw": (1.0,), "hashlib": (0.1,)},
    )
    return build_report([big, k16], {"rounds": 3, "workers": 8})


def test_ratios_come_from_median_throughput_and_targets_say_met_or_not():
    report = synthetic_report()
    # core big: 100 MB in 1.5 s median -> 66.7 MB/s; raw-verified 100; sdk 33.3; hashlib 200;
    # raw 100.
    ratios = report["ratios"]["big"]
    assert ratios["core/raw-verified"] == pytest.approx(2 / 3)
    assert ratios["core/sdk"] == pytest.approx(2.0)
    assert ratios["core/hashlib"] == pytest.approx(1 / 3)
    assert ratios["core/raw"] == pytest.approx(2 / 3)
    assert "core/aria2c" not in ratios
    assert report["ratios"]["k16"]["core/sdk"] == pytest.approx(2.5)
    targets = {(t["workload"], t["metric"]): t for t in report["targets"]}
    assert targets[("big", "core/raw-verified")]["met"] is False  # 0.67 < 0.9
    assert targets[("big", "core/aria2c")]["met"] is None  # not measured
    assert targets[("big", PEAK_METRIC)]["met"] is True  # 40 <= 64
    assert targets[("k16", "core/raw-verified")]["met"] is True  # 0.95 >= 0.9
    # Information, not targets: hashlib and the raw loop without hash or writes.
    assert ("big", "core/hashlib") not in targets and ("k16", "core/raw") not in targets
    assert not any(t["workload"] == "m1" for t in report["targets"])  # m1 did not run
    assert targets[("big", PEAK_METRIC)]["met"] is True
    assert build_report([_result(BIG, {"core": (1,)}, peak=64.0)], {})["targets"][-1]["met"]
    assert not build_report([_result(BIG, {"core": (1,)}, peak=64.1)], {})["targets"][-1]["met"]

    table = render_table(report)
    assert "core/raw-verified       0.67  >= 0.9  NOT MET" in table
    assert "core/sdk                2.00\n" in table
    assert "core/hashlib            0.33\n" in table
    assert "core/aria2c                -  >= 1.5  not measured" in table
    assert "core peak MiB           40.0  <= 64  met" in table
    assert "aria2c       not available: disabled" in table
    assert "  raw-verified     100.0" in table
    assert "core peak memory 40.0 MiB" in table


def test_compare_with_a_baseline_flags_only_ratios_beyond_the_margin():
    baseline = synthetic_report()
    slower = synthetic_report(core_big=(1.8, 1.8, 1.8))  # core/sdk 2.0 -> 1.67, -17%
    result = compare(slower, baseline, 0.15)
    assert [(c.workload, c.metric) for c in result.breaches] == [
        ("big", "core/hashlib"),
        ("big", "core/raw"),
        ("big", "core/raw-verified"),
        ("big", "core/sdk"),
    ]
    assert compare(slower, baseline, 0.20).breaches == []
    assert compare(baseline, baseline, 0.0).breaches == []
    assert "4 of" in result.render() and "BREACHED big core/sdk = 1.67" in result.render()


def test_compare_memory_is_worse_when_higher_and_missing_figures_are_skipped():
    baseline = synthetic_report(peak=40.0)
    fatter = synthetic_report(peak=50.0)
    breaches = compare(fatter, baseline, 0.15).breaches
    assert [(c.workload, c.metric) for c in breaches] == [("big", PEAK_METRIC)]
    assert compare(synthetic_report(peak=30.0), baseline, 0.0).breaches == []
    with_aria2 = copy.deepcopy(baseline)
    with_aria2["ratios"]["big"]["core/aria2c"] = 1.3
    result = compare(baseline, with_aria2, 0.15)
    assert result.breaches == []
    assert result.skipped == ["big core/aria2c: not measured in this run"]


def test_compare_against_the_targets():
    report = synthetic_report()
    result = compare(report, None, 0.15)
    assert result.against == "the targets"
    # big core/raw-verified 0.67 < 0.9 * 0.85; k16's 0.95 and the peak pass. hashlib and raw
    # (0.33 and 0.5) are far below their old targets and judged by none.
    assert sorted((c.workload, c.metric) for c in result.breaches) == [
        ("big", "core/raw-verified"),
    ]
    assert sorted((c.workload, c.metric) for c in result.checks) == [
        ("big", PEAK_METRIC),
        ("big", "core/raw-verified"),
        ("k16", "core/raw-verified"),
    ]
    assert "big core/aria2c: not measured in this run" in result.skipped
    assert load_baseline("targets") is None


def test_bad_baselines_and_options_are_usage_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="cannot read the baseline"):
        load_baseline(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text('{"benchmarks": []}')
    with pytest.raises(ValueError, match="has no 'ratios' section"):
        load_baseline(str(tmp_path / "other.json"))
    assert run_cli("--compare", str(tmp_path / "missing.json"))[0] == EXIT_USAGE
    for args in (
        ["--workloads", "big,huge"],
        ["--margin", "1.5"],
        ["--rounds", "0"],
        ["--workers", "0"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", *args])
        assert exit_info.value.code == EXIT_USAGE
    err = capsys.readouterr().err
    assert "unknown workload huge; choose among big, m1, k16" in err
    assert "the margin must be a fraction between 0 and 1" in err
    assert "the number of rounds must be a whole number >= 1, not '0'" in err
    # Each count option names itself: --workers 0 is not a wrong number of rounds.
    assert "--workers: the number of workers must be a whole number >= 1, not '0'" in err


class _Blobs(http.server.BaseHTTPRequestHandler):
    """Serves ``bodies[path]`` with a Content-Length on kept-alive HTTP/1.1 connections."""

    protocol_version = "HTTP/1.1"
    bodies: ClassVar[dict[str, bytes]] = {}

    def do_GET(self):
        body = self.bodies.get(self.path.split("?", 1)[0])
        if body is None:
            missing = b"<Error><Code>BlobNotFound</Code></Error>"
            self.send_response(404)
            self.send_header("Content-Length", str(len(missing)))
            self.end_headers()
            self.wfile.write(missing)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass  # quiet: pytest shows stderr of a failed test


@pytest.fixture
def blob_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Blobs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _Blobs.bodies
    server.shutdown()
    server.server_close()
    _Blobs.bodies.clear()


def test_raw_verified_hashes_and_writes_every_byte_and_fails_loudly_on_a_wrong_one(
    tmp_path, blob_server
):
    url, bodies = blob_server
    # Bodies over one 1 MiB buffer, and one over 8 MiB (received on a thread, hashed here).
    good = {f"/f{i}": os.urandom((1 << 20) + 17 * i) for i in range(3)}
    good["/big"] = os.urandom((9 << 20) + 3)
    bodies.update(good)
    urls = [f"{url}{name}?sv=x" for name in good]
    paths = [str(tmp_path / name.strip("/")) for name in good]
    digests = [hashlib.sha256(body).hexdigest() for body in good.values()]
    assert get_all_verified(urls, paths, digests, workers=2) == sum(map(len, good.values()))
    for path, body in zip(paths, good.values(), strict=True):
        assert Path(path).read_bytes() == body

    # One byte flipped deep in the second buffer of one blob: the loop must say so, not time it.
    wrong = bytearray(good["/f1"])
    wrong[(1 << 20) + 5] ^= 0x01
    bodies["/f1"] = bytes(wrong)
    # A BenchError (also the RuntimeError it was): what it is, where, the rule and the fix.
    with pytest.raises(BenchError, match=r"SHA-256 of .*f1 is [0-9a-f]{64}, expected") as info:
        get_all_verified(urls, paths, digests, workers=2)
    assert "a verified ceiling times only bytes that hash to the manifest's digest" in str(
        info.value
    )
    assert "upload the workload again and rerun" in str(info.value)
    bodies["/f1"] = good["/f1"]
    wrong = bytearray(good["/big"])
    wrong[(8 << 20) + 1] ^= 0x80
    bodies["/big"] = bytes(wrong)
    with pytest.raises(BenchError, match=r"raw-verified: SHA-256 of .*big is [0-9a-f]{64}, "):
        get_all_verified(urls, paths, digests, workers=1)


def test_a_ceiling_that_gets_no_200_is_a_bench_error_naming_the_blob_not_its_sas(blob_server):
    url, bodies = blob_server
    bodies["/c/there"] = b"x" * 100
    urls = [f"{url}/c/there?sig=SECRET", f"{url}/c/gone?sig=SECRET"]
    # The raw ceiling as benchmark scenarios use it (get_all), outside any benchmark run that
    # would wrap the error: what reaches the user must be of the pytest-cmg tree.
    with pytest.raises(BenchError) as info:
        get_all(urls, workers=1, label="raw baseline")
    message = str(info.value)
    assert message.startswith("raw baseline GET answered 404 for /c/gone: b'<Error><Code>Blob")
    assert "a ceiling times only 200 answers" in message
    assert "check that the blob exists and its URL's SAS is valid" in message
    assert "SECRET" not in message


def test_workloads_parse_and_have_the_documented_sizes():
    assert parse_workloads("k16, big,k16") == ("k16", "big")
    with pytest.raises(ValueError, match="unknown workload"):
        parse_workloads("")
    assert (FULL["big"].total, FULL["m1"].total, FULL["k16"].total) == (
        256 << 20,
        200 << 20,
        2000 * 16 << 10,
    )
    assert all(QUICK[name].total < FULL[name].total for name in FULL)


def test_aria2_missing_is_a_reason_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no aria2c, and no apt-get to fetch it with
    assert resolve_aria2("never") == "not available: disabled"
    reason = resolve_aria2("cached")
    assert reason.startswith("not available: aria2c is not on PATH nor provisioned")
    assert "--with-aria2" in reason
    reason = resolve_aria2("auto")
    assert reason.startswith("not available: `apt-get` is not available")


def test_a_cache_folder_with_a_broken_marker_is_passed_over_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no aria2c on PATH
    for name, marker in (("aria2-1.37.0", '{"exe": "usr/bin/aria2c", '), ("aria2-1.36.0", "[]")):
        folder = tmp_path / "cache" / name
        (folder / "usr" / "bin").mkdir(parents=True)
        (folder / "usr" / "bin" / "aria2c").write_text("#!/bin/sh\n")
        (folder / ".pytest-cmg-complete").write_text(marker)
    assert resolve_aria2("cached").startswith(
        "not available: aria2c is not on PATH nor provisioned"
    )
    # A whole marker beside them is still found.
    good = tmp_path / "cache" / "aria2-1.35.0"
    (good / "usr" / "bin").mkdir(parents=True)
    (good / "usr" / "bin" / "aria2c").write_text("#!/bin/sh\n")
    marker = {"exe": "usr/bin/aria2c", "lib_dirs": [], "version": "1.35.0"}
    (good / ".pytest-cmg-complete").write_text(json.dumps(marker))
    found = resolve_aria2("cached")
    assert isinstance(found, Aria2) and found.version == "1.35.0"


def test_a_work_folder_that_cannot_be_made_is_a_bench_failure(tmp_path, capsys):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    argv = ["--workdir", str(taken / "out"), "--aria2", "never", "--quick", "--workloads", "k16"]
    # Refused before Azurite starts: a BenchError (exit 3) saying the fix, not an OSError.
    assert run_cli(*argv)[0] == EXIT_FAILED
    err = capsys.readouterr().err
    assert f"the benchmark's work folder cannot be made in {taken / 'out'}" in err
    assert "pass a writable folder (--workdir)" in err


def test_aria2_command_is_the_documented_one():
    # The command line is built without running aria2c, so no binary is needed to check it.
    found = Aria2(Path("/opt/aria2/bin/aria2c"), (), "1.36.0", "test")
    argv = found.command(cache_dir(), "blob", "http://127.0.0.1:1/x")
    assert argv[0] == "/opt/aria2/bin/aria2c"
    assert argv[argv.index("-x") + 1] == "8" and argv[argv.index("-s") + 1] == "8"
    assert "--file-allocation=falloc" in argv and argv[-1] == "http://127.0.0.1:1/x"


def test_plugin_import_does_not_load_the_benchmark():
    code = (
        "import sys, pytest_cmg.plugin; "
        "print(','.join(m for m in sys.modules if m.startswith(('pytest_cmg._bench', 'matplotlib'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --- through pytest -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache_dir():
    # Session scope resolves it before pytester points HOME at a temporary folder, where the
    # inner session would install Azurite again (~30 s) and find no aria2c.
    return str(cache_dir())


@pytest.fixture
def no_xdist_env(monkeypatch, real_cache_dir):
    # This file itself may run in an xdist worker (CI runs `pytest -n 2`); the inner sessions
    # must not inherit that, or every one of them would be refused.
    for name in XDIST_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(CACHE_ENV, real_cache_dir)


@pytest.mark.parametrize("args", [["-n", "1"], ["-n", "2"]])
def test_bench_refuses_xdist_workers(pytester, no_xdist_env, args):
    result = pytester.runpytest("--cmg-bench", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*benchmarks refuse to run under xdist: *run with -n 0 / -p no:xdist*"]
    )


def test_bench_refuses_to_run_inside_an_xdist_worker(pytester, no_xdist_env, monkeypatch):
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    result = pytester.runpytest("--cmg-bench", "-p", "no:xdist")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*benchmarks refuse to run under xdist*"])


def test_without_the_option_no_benchmark_is_collected(pytester, no_xdist_env):
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = pytester.runpytest("-p", "no:xdist")
    result.assert_outcomes(passed=1)
    assert "cmg-bench" not in result.stdout.str()


def test_bench_items_replace_the_suite_and_k_selects_workloads(pytester, no_xdist_env):
    pytester.makepyfile(test_plain="def test_one():\n    assert True\n")
    result = pytester.runpytest("--cmg-bench", "--collect-only", "-q", "-n", "0")
    result.stdout.fnmatch_lines(["cmg-bench::big", "cmg-bench::m1", "cmg-bench::k16"])
    assert "test_one" not in result.stdout.str()
    result = pytester.runpytest("--cmg-bench", "--collect-only", "-q", "-p", "no:xdist", "-k", "m1")
    assert [line for line in result.stdout.lines if line.startswith("cmg-bench")] == [
        "cmg-bench::m1"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cmg-bench-workloads=big,huge"], "*--cmg-bench: unknown workload huge*"),
        (["--cmg-bench-margin=-1"], "*--cmg-bench: the margin must be a fraction*"),
        (["--cmg-bench-compare=nothing.json"], "*--cmg-bench-compare: cannot read the baseline*"),
    ],
)
def test_bad_bench_options_are_usage_errors(pytester, no_xdist_env, args, message):
    result = pytester.runpytest("--cmg-bench", "-p", "no:xdist", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_bench_items_run_print_the_table_and_fail_on_a_breached_margin(pytester, no_xdist_env):
    # A baseline no core can meet: its item must fail, and say which ratio.
    baseline = {"ratios": {"k16": {"core/sdk": 1000.0}, "m1": {"core/sdk": 0.001}}}
    (pytester.path / "baseline.json").write_text(json.dumps(baseline))
    result = pytester.runpytest_subprocess(
        "-p",
        "no:xdist",
        "-p",
        "no:cacheprovider",
        "--cmg-bench",
        "--cmg-bench-quick",
        "--cmg-bench-workloads=k16,m1",
        "--cmg-bench-compare=baseline.json",
        "--cmg-bench-json=out.json",
        timeout=240,
    )
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*cmg-bench k16*",
            "k16: 1 figure(s) more than 15% worse than baseline.json:",
            "  k16 core/sdk = *, below the limit 850.00 (baseline 1000.00)",
            "*pytest-cmg benchmark*",
            "k16: 200 x 16 KiB",
            "*BREACHED k16 core/sdk*",
            "JSON written to out.json",
        ]
    )
    report = json.loads((pytester.path / "out.json").read_text())
    assert {b["group"] for b in report["benchmarks"]} == {"k16", "m1"}


# --- --download-program ----------------------------------------------------------------------------

#: What is needed to measure a program on the smallest workload, and nothing else, in seconds.
PROGRAM_RUN = ("--quick", "--workloads", "k16", "--aria2", "never", "--no-memory", "-q")


def test_download_program_is_measured_beside_the_core_through_a_fake_cmg(tmp_path):
    program = f"{sys.executable} {REFERENCE_ACP} --backoff 0.05"
    report_path = tmp_path / "run.json"
    code, table = run_cli(*PROGRAM_RUN, "--download-program", program, "--json", str(report_path))
    assert code == EXIT_OK, table
    report = json.loads(report_path.read_text())
    assert report["bench"]["download_program"] == program
    cases = {b["extra_info"]["case"]: b["extra_info"] for b in report["benchmarks"]}
    assert {"core", "sdk", "raw", "raw-verified", "hashlib", "program"} <= set(cases)
    measured = cases["program"]
    assert measured["mb_per_s"]["median"] > 0 and measured["files_per_s"]["median"] > 0
    assert measured["bytes"] == QUICK["k16"].total and program in measured["description"]
    assert measured["cpu_percent"]["median"] > 0  # the child's rusage, not this process's

    ratios = report["ratios"]["k16"]
    for base in ("core", "raw-verified", "hashlib", "raw"):
        expected = measured["mb_per_s"]["median"] / cases[base]["mb_per_s"]["median"]
        assert ratios[f"program/{base}"] == pytest.approx(expected)
    assert f"program = {program}" in table
    assert any(line.split()[:1] == ["program/core"] for line in table.splitlines())
    assert any(line.split()[:1] == ["program"] for line in table.splitlines())


@pytest.mark.parametrize(
    ("body", "says"),
    [
        # Exits 0 having written nothing: every file is missing.
        (
            "sys.exit(0)",
            "exited 0, but its destination is not the package's 200 file(s): 200 missing",
        ),
        # Writes one file of the package with the wrong bytes, then exits 0.
        (
            "Path(sys.argv[3], 'f000').write_bytes(b'x'); sys.exit(0)",
            "199 missing (f001, f002, f003, f004, f005, ...); 1 with a wrong size or SHA-256 (f000)",
        ),
        (
            "print('no route to storage'); sys.exit(7)",
            "exited 7, not 0 with every file written; its last output: no route to storage",
        ),
    ],
    ids=["delivers-nothing", "wrong-bytes", "exits-7"],
)
def test_a_download_program_that_fails_or_lies_fails_the_bench(tmp_path, capsys, body, says):
    liar = tmp_path / "liar.py"
    liar.write_text(f"import sys\nfrom pathlib import Path\n{body}\n")
    program = f"{sys.executable} {liar}"
    code, _ = run_cli(*PROGRAM_RUN, "--download-program", program)
    err = capsys.readouterr().err
    assert code == EXIT_FAILED, err
    assert "bench: the benchmark failed: " in err
    assert f"the download program {program!r} on workload k16" in err
    assert says in err


def test_a_download_program_that_cannot_run_is_a_usage_error(tmp_path, capsys):
    not_executable = tmp_path / "acp.sh"
    not_executable.write_text("#!/bin/sh\nexit 0\n")
    not_executable.chmod(0o644)
    cases = [
        (
            str(tmp_path / "missing-acp"),
            "is not an executable file; create it and make it executable",
        ),
        (str(not_executable), "is not an executable file; create it and make it executable"),
        ("no-such-acp-on-path --fast", "'no-such-acp-on-path' is not found on PATH; give a path"),
        ('"unclosed', "cannot be split into arguments"),
        ("   ", "no program given; name one"),
    ]
    for program, says in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--download-program", program])
        assert exit_info.value.code == EXIT_USAGE, program
        err = capsys.readouterr().err
        assert "argument --download-program: " in err and says in err, err
    assert os.access(REFERENCE_ACP, os.R_OK)


def _with_program(program="acp", seconds=4.0):
    k16 = _result(
        K16,
        {
            "core": (2.0,),
            "raw-verified": (1.9,),
            "sdk": (5.0,),
            "raw": (1.0,),
            "hashlib": (0.1,),
            "program": (seconds,),
        },
    )
    return build_report([k16], {"rounds": 1, "workers": 8, "download_program": program})


def test_program_ratios_are_in_the_report_and_compare_skips_a_baseline_without_them():
    report = _with_program()
    # program k16: 4 s against the core's 2, raw-verified's 1.9, raw's 1 and hashlib's 0.1.
    ratios = report["ratios"]["k16"]
    assert ratios["program/core"] == pytest.approx(0.5)
    assert ratios["program/raw-verified"] == pytest.approx(0.475)
    assert ratios["program/raw"] == pytest.approx(0.25)
    assert ratios["program/hashlib"] == pytest.approx(0.025)
    assert "core/sdk" in ratios  # the core's ratios are unchanged beside them
    assert "program = acp (--download-program" in render_table(report)

    without = synthetic_report()  # no program at all
    result = compare(report, without, 0.15)
    assert result.breaches == []
    assert "k16 program/core: not in the baseline" in result.skipped
    result = compare(without, report, 0.15)
    assert result.breaches == []
    assert "k16 program/core: not measured in this run" in result.skipped
    assert compare(report, None, 0.15).checks  # the targets still apply to the core

    # The same program twice as fast in the baseline breaches; another program is not compared.
    assert [c.metric for c in compare(_with_program(seconds=8.0), report, 0.15).breaches] == [
        "program/core",
        "program/hashlib",
        "program/raw",
        "program/raw-verified",
    ]
    other = compare(_with_program("other-acp", seconds=8.0), report, 0.15)
    assert other.breaches == []
    assert any("measured another download program ('acp'" in s for s in other.skipped)
