"""Parametrised scenario files, markers and failure rendering as users meet them (pytester)."""

from __future__ import annotations

import textwrap

import pytest

# Imported before any inner session, as in test_plugin.py: pytester's in-process runs drop
# modules first imported inside them, and cryptography's bindings reject re-imported classes.
import pytest_cmg._gateway.server
import pytest_cmg._net.proxy
import pytest_cmg._storage.clouddp  # noqa: F401
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir

SCENARIO = """\
scenario: {name}
seed: 7
packages:
  - id: PS100012
    type: os_upgrade
    files: 2
    size: 128KiB
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
expect:
  outcome: success
  cache: [PS100012.1]
  requests: {{location: 1, manifest: 1}}
"""

MATRIX = """\
matrix:
  client.auth: [token, certificate]
  cmg.site_version: [1910, 2107]
"""


@pytest.fixture(scope="session")
def azurite_cache():
    return str(cache_dir())


@pytest.fixture(autouse=True)
def shared_azurite_cache(azurite_cache, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, azurite_cache)


def write(pytester, name, extra="", scenario=None, folder="scenarios"):
    path = pytester.path / folder / f"{name}.cmg.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = (scenario or SCENARIO).format(name=name.replace("-", " ")) + textwrap.dedent(extra)
    path.write_text(text, encoding="utf-8")
    return path


def collected(pytester, *args):
    result = pytester.runpytest("--collect-only", "-q", *args)
    return [line for line in result.stdout.lines if "::" in line]


def test_a_matrix_is_one_item_per_combination_with_stable_ids(pytester):
    write(pytester, "auth", MATRIX)
    first = collected(pytester)
    assert first == [
        "scenarios/auth.cmg.yaml::auth[token-1910]",
        "scenarios/auth.cmg.yaml::auth[token-2107]",
        "scenarios/auth.cmg.yaml::auth[certificate-1910]",
        "scenarios/auth.cmg.yaml::auth[certificate-2107]",
    ]
    assert collected(pytester) == first
    # One case is selected by its ID, as xdist workers and --lf do.
    assert collected(pytester, "scenarios/auth.cmg.yaml::auth[certificate-1910]") == [first[2]]


def test_items_point_at_their_case_line(pytester):
    path = write(
        pytester,
        "cases",
        """\
        cases:
          - id: old
            set: {cmg.site_version: 1910}
          - id: new
        """,
    )
    lines = path.read_text().splitlines()
    pytester.makeconftest(
        """
        def pytest_collection_modifyitems(items):
            with open("locations.txt", "w") as out:
                for item in items:
                    out.write(f"{item.location[0]}:{item.location[1] + 1}:{item.location[2]}\\n")
        """
    )
    pytester.runpytest("--collect-only", "-q")
    old = lines.index("  - id: old") + 1
    new = lines.index("  - id: new") + 1
    assert (pytester.path / "locations.txt").read_text().splitlines() == [
        f"scenarios/cases.cmg.yaml:{old}:scenario: cases[old]",
        f"scenarios/cases.cmg.yaml:{new}:scenario: cases[new]",
    ]


def test_markers_select_and_mark_items(pytester):
    write(pytester, "slow-one", "markers: [slow]\n")
    write(pytester, "quick-one")
    write(
        pytester,
        "mixed",
        """\
        cases:
          - id: plain
          - id: benched
            markers: [benchmark]
        """,
    )
    assert collected(pytester, "-m", "slow") == ["scenarios/slow-one.cmg.yaml::slow one"]
    assert collected(pytester, "-m", "benchmark") == ["scenarios/mixed.cmg.yaml::mixed[benched]"]
    assert len(collected(pytester, "-m", "not slow and not benchmark")) == 2


def test_an_unregistered_marker_is_a_collection_error_at_its_line(pytester):
    path = write(pytester, "typo", "markers: [slwo]\n")
    line = path.read_text().splitlines().index("markers: [slwo]") + 1
    result = pytester.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*1 problem in scenario file:",
            f"  scenarios/typo.cmg.yaml:{line}: marker 'slwo' is not registered "
            "(did you mean 'slow'? register it in the markers ini option; known: *",
        ]
    )


def test_a_broken_world_is_reported_at_its_line_and_the_including_line(pytester):
    (pytester.path / "fixtures" / "worlds").mkdir(parents=True)
    (pytester.path / "fixtures" / "worlds" / "site.yaml").write_text(
        "cmg:\n  site_version: 1911\n", encoding="utf-8"
    )
    path = write(pytester, "uses-world", "include: [worlds/site]\n")
    include_line = path.read_text().splitlines().index("include: [worlds/site]") + 1
    result = pytester.runpytest("--collect-only")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [
            "*1 problem in scenario file:",
            "  fixtures/worlds/site.yaml:2: cmg.site_version 1911 is not one of *"
            f"(nearest: 1910; included from scenarios/uses-world.cmg.yaml:{include_line})",
        ]
    )


def test_the_fixtures_folder_option(pytester):
    shared = pytester.path / "elsewhere" / "worlds"
    shared.mkdir(parents=True)
    (shared / "site.yaml").write_text("cmg:\n  site_version: 1910\n", encoding="utf-8")
    write(pytester, "uses-world", "include: [worlds/site]\n")
    assert pytester.runpytest("--collect-only", "-q").ret == pytest.ExitCode.INTERRUPTED
    assert collected(pytester, "--cmg-fixtures=elsewhere") == [
        "scenarios/uses-world.cmg.yaml::uses world"
    ]
    pytester.makeini("[pytest]\ncmg_fixtures = elsewhere\n")
    assert collected(pytester) == ["scenarios/uses-world.cmg.yaml::uses world"]


def test_a_failed_case_names_the_case_its_values_and_the_yaml_line(pytester):
    path = write(
        pytester,
        "versions",
        """\
        cases:
          - id: "1906"
            set: {cmg.site_version: 1906}
        """,
    )
    lines = path.read_text().splitlines()
    outcome_line = lines.index("  outcome: success") + 1
    set_line = lines.index("    set: {cmg.site_version: 1906}") + 1
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"case 1906: cmg.site_version=1906 (line {set_line})",
            "",
            f"scenarios/versions.cmg.yaml:{outcome_line}: expectation expect.outcome failed",
            f"  {outcome_line:>4} |   outcome: success",
            "  expected: success",
            "  actual:   failure 0x80040102 at step 'Upgrade the operating system'*",
            "  smsts.log*",
            "*No content location for PS100012:1: site version 1906*",
        ]
    )
    assert "Traceback" not in result.stdout.str()


def test_xfail_from_the_file(pytester):
    write(
        pytester,
        "known-gap",
        """\
        cases:
          - id: fails
            set: {cmg.site_version: 1906}
            markers: [{xfail: {reason: on-demand needs 1910, strict: true}}]
          - id: passes-strictly
            markers: [{xfail: {reason: wrongly expected to fail, strict: true}}]
        """,
    )
    result = pytester.runpytest("-rxX")
    result.assert_outcomes(xfailed=1, failed=1)
    output = result.stdout.str()
    assert "XFAIL scenarios/known-gap.cmg.yaml::known gap[fails] - on-demand needs 1910" in output
    assert "[XPASS(strict)] wrongly expected to fail" in output


def test_a_matrix_runs_under_xdist(pytester):
    write(pytester, "auth", MATRIX)
    result = pytester.runpytest("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=4)
