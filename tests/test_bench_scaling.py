"""``bench --scaling``'s plumbing: options, every point measured and reported, no zero figures.

The tiny runs here are real (Azurite, the core, raw-verified, a fake CMG in its own process,
CMGClient threads) at sizes that take seconds; nothing asserts a timing, only that each point
was measured, verified and reported, and that a point that measured nothing fails loudly.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from pytest_cmg._bench import _scaling
from pytest_cmg._bench._cases import RAW_VERIFIED, Sample
from pytest_cmg._bench._scaling import (
    CORE_CASES,
    FILE_SIZES,
    GATEWAY_CLIENTS,
    SWEEPS,
    WORKER_COUNTS,
    ScalingConfig,
    ScalingError,
    parse_sweeps,
    quick_config,
    render_scaling,
    run_scaling,
    size_workload,
)
from pytest_cmg._bench._workloads import KIB, MIB, Workload
from pytest_cmg._bench.command import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from pytest_cmg._cli import main
from pytest_cmg._errors import PytestCmgError


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["bench", *args])
    return code, out.getvalue()


# --- options ----------------------------------------------------------------------------------


def test_sweeps_parse_and_unknown_ones_are_named():
    assert parse_sweeps("gateway, workers") == ("gateway", "workers")
    assert parse_sweeps("sizes,sizes") == ("sizes",)
    with pytest.raises(ValueError, match=r"unknown sweep speed; choose among workers, sizes"):
        parse_sweeps("workers,speed")
    with pytest.raises(ValueError, match=r"unknown sweep \(none\)"):
        parse_sweeps(" , ")


def test_bad_sweep_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--sweep", "workers,speed"])
    assert exit_info.value.code == EXIT_USAGE
    assert "unknown sweep speed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--compare", "targets"], "--compare"),
        (["--chart", "x.png"], "--chart"),
        (["--load", "run.json"], "--load"),
    ],
)
def test_options_of_the_cases_bench_are_refused_with_scaling(capsys, extra, named):
    code, out = run_cli("--scaling", "--quick", *extra)
    assert code == EXIT_USAGE
    assert out == ""
    err = capsys.readouterr().err
    assert f"{named} cannot be used with --scaling" in err


def test_the_default_tables_are_the_issue_s():
    config = ScalingConfig()
    assert config.sweeps == SWEEPS == ("workers", "sizes", "gateway")
    assert config.worker_counts == WORKER_COUNTS == (1, 2, 4, 8, 16)
    assert [w.name for w in config.worker_workloads] == ["m1", "big"]
    assert tuple(w.file_size for w in config.size_workloads) == FILE_SIZES
    assert FILE_SIZES == (16 * KIB, 256 * KIB, MIB, 16 * MIB, 256 * MIB)
    assert config.gateway_clients == GATEWAY_CLIENTS == (1, 10, 50)
    # Comparable bytes per size point: 64 MiB to 256 MiB.
    assert [w.total // MIB for w in config.size_workloads] == [64, 128, 128, 128, 256]
    assert size_workload(16 * KIB).files == 4096
    assert size_workload(256 * MIB).files == 1


# --- a point that measured nothing is an error, not a zero ----------------------------------


def test_a_core_point_without_rounds_or_with_a_zero_round_is_an_error():
    workload = Workload("m1", 4, MIB)
    good = [Sample(0.5, 0.25, None), Sample(0.25, 0.25, None), Sample(1.0, 0.5, None)]
    row = _scaling._core_row("workers", workload, 2, {"core": good, RAW_VERIFIED: good[:1]})
    core = row["cases"]["core"]
    assert core["mb_per_s"] == round(4 * MIB / 1e6 / 0.5, 2)  # the median round
    assert core["min"] == round(4 * MIB / 1e6 / 1.0, 2)
    assert core["files_per_s"] == 8.0
    assert core["cpu_percent"] == 50
    assert row["core/raw-verified"] == 1.0
    with pytest.raises(
        ScalingError, match=r"workers: 4 x 1 MiB at workers=2: case raw-verified has no"
    ):
        _scaling._core_row("workers", workload, 2, {"core": good, RAW_VERIFIED: []})
    with pytest.raises(ScalingError, match=r"case core has a round of 0.0 s"):
        _scaling._core_row(
            "workers", workload, 2, {"core": [Sample(0.0, 0.0, None)], RAW_VERIFIED: good}
        )
    assert issubclass(ScalingError, PytestCmgError)


def test_a_gateway_point_with_a_round_of_no_pairs_is_an_error():
    measured = _scaling._GatewayRound(4, 2.0, [1.0, 2.0, 3.0, 100.0], [5.0] * 4, 0.5, 1.0)
    row = _scaling._gateway_row(10, [measured])
    assert row["pairs_per_s"] == 2.0
    assert row["requests_per_s"] == 4.0
    assert row["location_ms"] == {"p50": 2.0, "p99": 100.0}
    assert row["pair_ms"]["p99"] == 105.0
    assert row["gateway_cpu_percent"] == 50
    empty = _scaling._GatewayRound(0, 2.0, [], [], 0.5, 1.0)
    with pytest.raises(ScalingError, match=r"10 concurrent client\(s\), round 2: 0 location"):
        _scaling._gateway_row(10, [measured, empty])
    with pytest.raises(ScalingError, match=r"has no measured round"):
        _scaling._gateway_row(10, [])


# --- real tiny runs ---------------------------------------------------------------------------


def tiny_config(tmp_path, **overrides):
    settings = {
        "worker_counts": (1, 3),
        "worker_workloads": (Workload("m1", 6, 64 * KIB), Workload("big", 1, 2 * MIB)),
        "size_workloads": (
            size_workload(16 * KIB, MIB, 32),
            size_workload(MIB, 2 * MIB, 32),
        ),
        "default_workers": 4,
        "gateway_clients": (1, 3),
        "gateway_seconds": 0.3,
        "gateway_pairs": 30,
        "workdir": tmp_path / "work",
    }
    settings.update(overrides)
    return quick_config(**settings)


def test_every_point_of_every_table_is_measured_and_reported(tmp_path):
    report = run_scaling(tiny_config(tmp_path, rounds=2))
    tables = report["scaling"]["tables"]
    assert list(tables) == ["workers", "sizes", "gateway"]
    assert [(r["workload"], r["workers"]) for r in tables["workers"]] == [
        ("m1", 1),
        ("m1", 3),
        ("big", 1),
        ("big", 3),
    ]
    assert [(r["files"], r["file_size"]) for r in tables["sizes"]] == [(32, 16 * KIB), (2, MIB)]
    assert {r["workers"] for r in tables["sizes"]} == {4}
    for row in tables["workers"] + tables["sizes"]:
        for case in CORE_CASES:
            assert row["cases"][case]["rounds"] == 2
            assert row["cases"][case]["mb_per_s"] > 0
        assert row["core/raw-verified"] > 0
    assert [r["clients"] for r in tables["gateway"]] == [1, 3]
    for row in tables["gateway"]:
        assert row["rounds"] == 2
        assert 2 <= row["pairs"] <= 2 * 30  # bounded by gateway_pairs per round
        assert row["pairs_per_s"] > 0 and row["location_ms"]["p99"] > 0
    assert "start" in report["scaling"]["loadavg"] and "end" in report["scaling"]["loadavg"]

    text = render_scaling(report)
    for line in ("m1 x1", "m1 x3", "big x1", "big x3", "32 x 16 KiB", "2 x 1 MiB"):
        assert line in text
    gateway_rows = [line.split() for line in text.splitlines()[-2:]]
    assert [row[0] for row in gateway_rows] == ["1", "3"]


def test_the_command_prints_and_writes_the_tables(tmp_path, capsys):
    out_json = tmp_path / "scale.json"
    code, out = run_cli(
        "--scaling", "--quick", "--sweep", "gateway", "--json", str(out_json), "-q",
        "--workdir", str(tmp_path / "work"),
    )  # fmt: skip
    assert code == EXIT_OK, capsys.readouterr().err
    saved = json.loads(out_json.read_text(encoding="utf-8"))
    assert list(saved["scaling"]["tables"]) == ["gateway"]
    assert [r["clients"] for r in saved["scaling"]["tables"]["gateway"]] == [1, 4]
    assert "fake CMG: content location + manifest GET" in out
    assert "core against workers" not in out


def test_a_gateway_that_cannot_serve_the_clients_fails_the_sweep(tmp_path, monkeypatch):
    # The clients ask for a package the gateway's cloud DP does not hold: no pair can complete.
    monkeypatch.setattr(_scaling, "package_id", lambda workload: "BENCH-NOSUCH")
    with pytest.raises(
        ScalingError, match=r"gateway round 1/1 \d client\(s\): \d failure"
    ) as error:
        run_scaling(tiny_config(tmp_path, sweeps=("gateway",)))
    assert "client GUID:pytest-cmg-scale-" in str(error.value)


def test_a_failed_point_exits_3_not_a_table_with_a_zero(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(_scaling, "package_id", lambda workload: "BENCH-NOSUCH")
    code, out = run_cli(
        "--scaling", "--quick", "--sweep", "gateway", "-q", "--workdir", str(tmp_path / "w")
    )
    assert code == EXIT_FAILED
    assert out == ""
    assert "the scaling benchmark failed: gateway round" in capsys.readouterr().err
