"""A suite that can fail (issue 11, item 4): every expectation, every scripted fault, every name.

A scenario proves something only if it can fail. So, here:

* every ``expect`` key has a scenario, run end to end on the session's harness (real Azurite
  and the HTTPS fake CMG), that violates it; the failure must name the key, the scenario file
  and line, what was expected and what happened (``test_every_expect_key_has_a_violation``
  fails when a key is added without one);
* a ``faults`` entry that never happened fails its scenario at its own line, unless it is
  ``optional: true``, the way ``responses``' ``assert_all_requests_are_fired`` fails a test;
* a storage fault's ``file`` must name a file of a package on the cloud DP, at collection;
* ``client.cache`` seeds real, verified cache entries of other content versions;
* the scenarios added for the bugs the suite missed fail when the client has that bug: the
  client is mutated here through its public surface, one bug at a time.
"""

from __future__ import annotations

import contextlib
import re
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Imported before any inner session, as in test_plugin.py: pytester's in-process runs drop
# modules first imported inside them, and cryptography's bindings reject re-imported classes.
import pytest_cmg._gateway.server
import pytest_cmg._net.proxy
import pytest_cmg._storage.clouddp  # noqa: F401
from pytest_cmg._client.cache import ClientCache
from pytest_cmg._client.engine import CMGClient
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._errors import ContentError, ExpectationFailed, ScenarioError
from pytest_cmg._gateway.faults import FaultPlan, GatewayFault
from pytest_cmg._net.faults import faults_from
from pytest_cmg._scenario.content import generate_package, package_file_names
from pytest_cmg._scenario.expectations import ScenarioRun, check_expectations
from pytest_cmg._scenario.items import ScenarioFailed
from pytest_cmg._scenario.load import load_scenario, load_scenarios
from pytest_cmg._scenario.model import PackageSpec, StorageFaultEntry
from pytest_cmg._scenario.runner import run_scenario
from pytest_cmg._scenario.timeline import Timeline, TimelineFault
from pytest_cmg._scenario.vocabulary import EXPECT
from pytest_cmg._scenario.world import seed_cache
from pytest_cmg._util.cachedir import CACHE_ENV, cache_dir
from pytest_cmg.faults import ProxiedRequest, reset_after

if TYPE_CHECKING:
    from collections.abc import Iterator

    from pytest_cmg._scenario.model import Scenario

ROOT = Path(__file__).resolve().parents[1]
START = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)

HEAD = """\
scenario: an upgrade and its drivers, on demand
seed: 11
packages:
  - {id: PS100012, type: os_upgrade, files: 2, size: 64KiB}
  - {id: PS100013, type: driver, files: 3, size: 24KiB}
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - {name: Upgrade the operating system, action: upgrade_os, package: PS100012}
    - {name: Apply drivers, action: apply_driver_package, package: PS100013}
"""

#: The location request fails: the first step fails with 0x80040102, before any download.
NO_LOCATION = "faults:\n  - gateway: {endpoint: location, request: 1, status: 500}\n"


def scenario_text(expect: str = "", *, outcome: str = "success", faults: str = "") -> str:
    return f"{HEAD}{faults}expect:\n  outcome: {outcome}\n{expect}"


def write(folder: Path, text: str, name: str = "s.cmg.yaml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def run(harness: object, path: Path, workdir: Path) -> tuple[Scenario, ScenarioRun, list[ExpectationFailed]]:
    scenario = load_scenario(path)
    result = run_scenario(scenario, harness, workdir)  # type: ignore[arg-type]
    return scenario, result, check_expectations(scenario, result)


def shipped(relpath: str) -> Path:
    return ROOT / "scenarios" / relpath


# --------------------------------------------------------------------------------------------
# every expect key, violated
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Violation:
    """A scenario whose one expectation does not hold, and how its failure must read."""

    key: str
    expect: str
    expectation: str
    expected: str
    actual: str
    outcome: str = "success"
    faults: str = ""
    #: A further fragment of the failure's detail: the evidence that explains it.
    context: str = ""

    @property
    def id(self) -> str:
        return self.key


VIOLATIONS = [
    Violation("outcome", "", "expect.outcome", "expected: failure", "actual:   success", outcome="failure"),
    Violation(
        "exit_code",
        '  exit_code: "0x87D01202"\n',
        "expect.exit_code",
        "expected: 0x87D01202",
        "actual:   0x80040102",
        outcome="failure",
        faults=NO_LOCATION,
        context="Content location request for PS100012:1 failed, hr=0x80040102",
    ),
    Violation(
        "cache",
        "  cache: [PS100012.1]\n",
        "expect.cache",
        "expected: PS100012.1",
        "actual:   PS100012.1, PS100013.1",
    ),
    Violation(
        "downloaded",
        "  downloaded: [PS100012]\n",
        "expect.downloaded",
        "expected: PS100012",
        "actual:   PS100012, PS100013",
        context="[manifest PS100013]",
    ),
    Violation(
        "requests",
        "  requests: {location: 1, manifest: 2}\n",
        "expect.requests.location",
        "expected: exactly 1 location request(s)",
        "actual:   2",
        context="[location PS100013]",
    ),
    Violation(
        "log",
        '  log: ["Hash verification succeeded for content PS100012\\\\.4"]\n',
        "expect.log[0]",
        "expected: a smsts.log line matching /Hash verification succeeded for content PS100012\\.4/",
        "actual:   no such line",
        context="Hash verification succeeded for content PS100012.1 downloaded",
    ),
    Violation(
        "gateway_log",
        '  gateway_log: ["Issued manifest for PS100014"]\n',
        "expect.gateway_log[0]",
        "expected: a gateway log line matching /Issued manifest for PS100014/",
        "actual:   no such line",
        context="Issued manifest for PS100013.1",
    ),
    Violation(
        "absent_log",
        '  absent_log: ["Hash verification succeeded for content"]\n',
        "expect.absent_log[0]",
        "expected: no smsts.log line matching /Hash verification succeeded for content/",
        "actual:   2 line(s) match",
        context="CAS: Hash verification succeeded for content PS100013.1",
    ),
    Violation(
        "absent_gateway_log",
        '  absent_gateway_log: ["Issued manifest for"]\n',
        "expect.absent_gateway_log[0]",
        "expected: no gateway log line matching /Issued manifest for/",
        "actual:   2 line(s) match",
        context="Issued manifest for PS100012.1",
    ),
    Violation(
        "storage_bytes",
        "  storage_bytes: {PS100013: 0}\n",
        "expect.storage_bytes.PS100013",
        "expected: exactly 0 bytes served for PS100013",
        "actual:   24KiB (24576 bytes)",
        context="GET PS100013.1/",
    ),
    Violation(
        "storage_requests",
        "  storage_requests: {at_most: 4}\n",
        "expect.storage_requests",
        "expected: at most 4 storage request(s)",
        "actual:   5",
        context="#5 GET PS1",
    ),
    Violation(
        "egress_bytes",
        "  egress_bytes: {at_least: 1MiB}\n",
        "expect.egress_bytes",
        "expected: at least 1MiB (1048576 bytes) of egress",
        "actual:   88KiB (90112 bytes) (manifest sizes)",
    ),
    Violation(
        "retries",
        "  retries: {at_least: 1}\n",
        "expect.retries",
        "expected: at least 1 retries",
        "actual:   0 (waits: none)",
    ),
    Violation(
        "restarts",
        "  restarts: 1\n",
        "expect.restarts",
        "expected: exactly 1 restart(s) of the computer",
        "actual:   0",
        context="(every boot ran in-process)",
    ),
    Violation(
        "elapsed",
        "  elapsed: {min: 1s}\n",
        "expect.elapsed",
        "expected: at least 1s of virtual time",
        "actual:   0s (retry waits 0s)",
    ),
    Violation(
        "ts_cache",
        "  ts_cache: [PS100012.1]\n",
        "expect.ts_cache",
        "expected: PS100012.1",
        "actual:   (empty)",
    ),
    Violation(
        "variables",
        '  variables: {_SMSTSInWinPE: "TRUE", _SMSTSSetupRollback: ""}\n',
        "expect.variables._SMSTSInWinPE",
        "expected: _SMSTSInWinPE='TRUE'",
        "actual:   _SMSTSInWinPE='FALSE'",
        context="Set a global environment variable _SMSTSInWinPE=FALSE",
    ),
]

#: Keys whose violation needs a world of its own, and the test that violates them.
ELSEWHERE = {
    "throughput": "tests/test_scenario_benchmark.py::test_a_ratio_below_its_floor_fails_at_its_yaml_line",
}


def test_every_expect_key_has_a_violation() -> None:
    covered = [v.key for v in VIOLATIONS] + list(ELSEWHERE)
    assert sorted(covered) == sorted(EXPECT.fields), "add a Violation for each new expect key"
    assert len(covered) == len(set(covered))
    for where in ELSEWHERE.values():
        file, _, name = where.partition("::")
        assert f"def {name}(" in (ROOT / file).read_text(encoding="utf-8")


@pytest.mark.parametrize("violation", VIOLATIONS, ids=lambda v: v.id)
def test_a_violated_expectation_names_its_key_line_expected_and_actual(
    violation: Violation, cmg_harness: object, tmp_path: Path
) -> None:
    text = scenario_text(violation.expect, outcome=violation.outcome, faults=violation.faults)
    path = write(tmp_path, text, f"{violation.key}.cmg.yaml")
    scenario, _, failures = run(cmg_harness, path, tmp_path / "work")
    # The scenario is true but for the one expectation: that is what fails it.
    assert [f.expectation for f in failures] == [violation.expectation]
    (failure,) = failures
    key_line = f"  {violation.key}:" if violation.expect else "  outcome:"
    line = line_of(path, key_line)
    assert (failure.path, failure.line) == (path, line)
    source = path.read_text(encoding="utf-8").splitlines()[line - 1]
    assert f"  {line:>4} | {source}\n" in failure.detail
    assert f"  {violation.expected}\n" in failure.detail
    assert f"  {violation.actual}" in failure.detail
    assert violation.context in failure.detail
    # As pytest shows it: the file and line first, then the rule's own text.
    shown = ScenarioFailed(failures, tmp_path / "work", scenario).render(tmp_path)
    assert shown.startswith(f"{violation.key}.cmg.yaml:{line}: expectation {violation.expectation} failed\n")


# --------------------------------------------------------------------------------------------
# a faults entry that never happened
# --------------------------------------------------------------------------------------------

#: Entries 0-3 never fire; 4 flips a byte (0x80091007), 5 makes the task sequence retry once.
ENTRIES = [
    "  - storage: {file: sources/install.wim, request: 3, reset_after: 1KiB}\n",
    "  - storage: {file: sources/install.wim, request: 1, reset_after: 1MiB}\n",
    "  - gateway: {endpoint: manifest, request: 3, status: 503}\n",
    "  - clock: 1h\n    at: 2h\n",
    "  - storage: {file: sources/install.wim, request: 1, flip_byte: 7}\n",
    "  - gateway: {endpoint: manifest, request: 1, status: 503}\n",
]
UNFIRED = "faults:\n" + "".join(ENTRIES)
HASH_MISMATCH = '  outcome: failure\n  exit_code: "0x80091007"\n'


def test_faults_that_never_fired_fail_at_their_lines_with_the_reason(
    cmg_harness: object, tmp_path: Path
) -> None:
    path = write(tmp_path, f"{HEAD}{UNFIRED}expect:\n{HASH_MISMATCH}")
    scenario, result, failures = run(cmg_harness, path, tmp_path / "work")
    assert result.waits == [15.0]  # the 503 fired, and the task sequence retried
    by_entry = {f.expectation: f for f in failures}
    assert sorted(by_entry) == ["faults[0]", "faults[1]", "faults[2]", "faults[3]"]
    lines = path.read_text(encoding="utf-8").splitlines()
    for index, needle in enumerate(
        ["request: 3, reset_after", "reset_after: 1MiB", "request: 3, status", "clock: 1h"]
    ):
        failure = by_entry[f"faults[{index}]"]
        assert failure.line == line_of(path, needle)
        assert failure.path == path
        assert f"  {failure.line:>4} | {lines[failure.line - 1]}" in failure.detail
        assert "(or optional: true on the entry, if the run may end without it)" in failure.detail
    detail = {k: f.detail for k, f in by_entry.items()}
    # The other file's request may never be made: the flipped byte fails the package, and the
    # core stops starting files, sometimes before the second one started (seen under CI load).
    assert re.search(
        r"  actual:   never fired: no storage request matched it: it waited for storage request "
        r"#3 for a blob whose name contains 'sources/install\.wim', and the run made 1 such "
        r"request\(s\) \([12] storage request\(s\) in all\)",
        detail["faults[0]"],
    )
    assert "faults=reset_after(1048576)@faults[1]" in detail["faults[1]"]  # the proxy's log
    # The two files start in parallel: the storage request number of install.wim varies.
    assert re.search(
        r"never fired: reset_after\(1048576\) hit 1 request\(s\) but never acted: none reached "
        r"body byte 1048576 \(#[12]: 58982 body bytes\); give a smaller offset, or name a larger "
        r"file",
        detail["faults[1]"],
    )
    assert (
        "  actual:   never fired: it waited for manifest request #3, and the gateway logged 2 "
        "manifest request(s) in the run" in detail["faults[2]"]
    )
    assert "  expected: this gateway fault fires in the run: gateway endpoint=manifest" in detail["faults[2]"]
    # The timeline tells armed from fired.
    assert "faults[2]: gateway endpoint=manifest, request=3, status=503, times=1  (armed, never fired)" in detail["faults[2]"]
    assert "faults[4]: storage file=sources/install.wim, request=1, flip_byte=7, times=1\n" in detail["faults[2]"]
    assert (
        "  actual:   never happened: virtual time reached only 15s, not 2h, so the "
        "entry was never armed" in detail["faults[3]"]
    )
    assert "  expected: this clock entry happens in the run: clock +1h (at 2h)" in detail["faults[3]"]
    # Reported as pytest shows every failed expectation, in the file's order.
    shown = ScenarioFailed(failures, tmp_path / "work", scenario).render(tmp_path)
    assert shown.index("s.cmg.yaml:13: expectation faults[0] failed") < shown.index(
        "expectation faults[3] failed"
    )


def test_optional_entries_may_never_fire(cmg_harness: object, tmp_path: Path) -> None:
    optional = "faults:\n" + "".join(entry + "    optional: true\n" for entry in ENTRIES)
    path = write(tmp_path, f"{HEAD}{optional}expect:\n{HASH_MISMATCH}")
    scenario = load_scenario(path)
    assert [e.optional for e in scenario.timeline] == [True] * 6
    _, result, failures = run(cmg_harness, path, tmp_path / "work")
    assert failures == []
    # Still told in the run's evidence, for whoever reads the timeline.
    assert {where for where, _ in result.unfired} == {"faults[0]", "faults[1]", "faults[2]", "faults[3]"}


def test_an_entry_before_a_step_that_never_starts_never_happened(
    cmg_harness: object, tmp_path: Path
) -> None:
    faults = NO_LOCATION + "  - service: stop\n    before_step: Apply drivers\n"
    path = write(tmp_path, scenario_text('  exit_code: "0x80040102"\n', outcome="failure", faults=faults))
    _, _, failures = run(cmg_harness, path, tmp_path / "work")
    (failure,) = failures
    assert (failure.expectation, failure.line) == ("faults[1]", line_of(path, "- service: stop"))
    assert "never happened: step 'Apply drivers' never started, so the entry was never armed" in failure.detail


def test_an_unfired_fault_fails_the_pytest_item_at_its_line(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CACHE_ENV, str(cache_dir()))
    faults = "faults:\n  - gateway: {endpoint: manifest, request: 9, status: 503}\n"
    path = write(pytester.path / "scenarios", scenario_text(faults=faults), "quiet.cmg.yaml")
    line = line_of(path, "request: 9")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            f"scenarios/quiet.cmg.yaml:{line}: expectation faults[0] failed",
            f"  {line:>4} |   - gateway: {{endpoint: manifest, request: 9, status: 503}}",
            "  expected: this gateway fault fires in the run: *",
            "  actual:   never fired: it waited for manifest request #9, and the gateway logged 2 *",
        ]
    )


def test_gateway_faults_are_counted_by_identity() -> None:
    plan = FaultPlan()
    first, second = GatewayFault("manifest", request=1, status=503), GatewayFault("manifest", request=1, status=503)
    assert first == second  # equal, yet two entries of a timeline
    plan.add(first)
    plan.add(second)
    plan.next_request("location")
    assert (plan.fired(first), plan.fired(second)) == (0, 0)
    plan.next_request("manifest")
    assert (plan.fired(first), plan.fired(second)) == (1, 1)
    third = GatewayFault("manifest", times=3, status=503)
    plan.add(third)
    plan.next_request("manifest")
    assert plan.fired(third) == 1
    assert plan.fired(GatewayFault("manifest", times=3, status=503)) == 0  # never armed


def _proxied(number: int, faults: tuple[str, ...], body: int) -> ProxiedRequest:
    path = "/devstoreaccount1/c/PS100012.1/sources/install.wim"
    return ProxiedRequest(number, 1, "GET", path, None, faults, True, 200, body, "complete")


@pytest.mark.parametrize(
    ("params", "body", "acted"),
    [
        ({"reset_after": 100}, 99, False),
        ({"reset_after": 100}, 100, True),  # the cut happens once the offset is reached
        ({"stall_after": 100, "stall_for": 5.0}, 100, True),
        ({"flip_byte": 100}, 100, False),  # byte 100 is the 101st: it was never sent
        ({"flip_byte": 100}, 101, True),
        ({"respond": 503}, 0, True),
    ],
)
def test_a_storage_fault_fired_only_if_it_acted(params: dict[str, object], body: int, acted: bool) -> None:
    event = StorageFaultEntry(where="faults[0]", request=1, faults=tuple(faults_from(params)))
    names = tuple(TimelineFault.of(f, "faults[0]").name for f in event.faults)
    time = VirtualTime(START)
    timeline = Timeline((event,), None, None, time)  # type: ignore[arg-type]
    timeline.fired.append((0.0, event))
    missed = timeline.missed([], [_proxied(1, names, body)])
    assert (missed == []) is acted
    # Another entry's fault on the request is not this entry's.
    other = tuple(name.replace("@faults[0]", "@faults[1]") for name in names)
    assert [e.where for e, _ in timeline.missed([], [_proxied(1, other, 10**6)])] == ["faults[0]"]


def test_timeline_faults_name_their_entry_and_keep_their_effect() -> None:
    fault = TimelineFault.of(reset_after(300), "faults[2]")
    assert fault.name == "reset_after(300)@faults[2]"
    assert (fault.kind, fault.offset) == ("reset_after", 300)


def test_optional_must_be_true_or_false(tmp_path: Path) -> None:
    path = write(tmp_path, scenario_text(faults="faults:\n  - clock: 1h\n    optional: maybe\n"))
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.rule) == (
        line_of(path, "optional: maybe"),
        "faults[0].optional must be true or false, got 'maybe'",
    )


# --------------------------------------------------------------------------------------------
# storage.file names a file, at collection
# --------------------------------------------------------------------------------------------


def storage_fault(file: str) -> str:
    return f"faults:\n  - storage: {{file: {file}, request: 1, reset_after: 1KiB}}\n"


def test_a_storage_file_that_names_no_file_is_a_collection_problem(tmp_path: Path) -> None:
    path = write(tmp_path, scenario_text(faults=storage_fault("instal.wim")))
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    assert (problem.path, problem.line) == (path, line_of(path, "file: instal.wim"))
    assert problem.rule == (
        "storage fault file 'instal.wim' names no blob of the packages on the cloud DP (5 "
        "file(s)): it must be part of a blob name <PackageID>.<version>/<path>"
    )
    assert problem.hint.startswith("nearest: 'install.wim', 'sources/install.wim', ")
    assert problem.hint.endswith("file names come from the seed, the package's type, file count and locale")


@pytest.mark.parametrize(
    "file", ["install.wim", "sources/install.wim", "PS100012.1/", "PS100012.1/sources/install.wim", ".wim"]
)
def test_a_storage_file_may_be_any_part_of_a_blob_name(tmp_path: Path, file: str) -> None:
    path = write(tmp_path, scenario_text(faults=storage_fault(file)))
    (entry,) = load_scenario(path).timeline
    assert isinstance(entry, StorageFaultEntry) and entry.file == file


def test_a_package_that_is_not_on_the_cloud_dp_has_no_blob(tmp_path: Path) -> None:
    text = scenario_text(faults=storage_fault("PS100013.1/")).replace(
        "size: 24KiB}", "size: 24KiB, on_cloud_dp: false}"
    )
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    assert [p.line for p in info.value.problems] == [line_of(path, "file: PS100013.1/")]


def test_storage_file_names_are_checked_in_each_case(tmp_path: Path) -> None:
    spec = PackageSpec("PS100013", 1, "", "driver", True, 3, 24 * 1024, "en_US")
    english = package_file_names(spec, 11)[0]
    cases = (
        "cases:\n  - id: english\n  - id: japanese\n    set:\n      packages[PS100013].locale: ja_JP\n"
    )
    path = write(tmp_path, scenario_text(faults=storage_fault(english)) + cases)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    assert problem.line == line_of(path, f"file: {english}")
    assert problem.hint.endswith("in case japanese")


@pytest.mark.parametrize(
    ("kind", "locale", "files"),
    [("os_upgrade", "en_US", 4), ("driver", "ja_JP", 12), ("package", "it_IT", 5), ("application", "en_US", 3)],
)
def test_file_names_are_generated_without_the_bytes(kind: str, locale: str, files: int) -> None:
    spec = PackageSpec("PS100050", 2, "", kind, True, files, 96 * 1024, locale)
    names = package_file_names(spec, 81)
    assert names == [source.relpath for source in generate_package(spec, 81)]
    # The size changes the bytes, never the names.
    assert package_file_names(replace(spec, size=50 * 1024), 81) == names


# --------------------------------------------------------------------------------------------
# client.cache: entries the client has before the run
# --------------------------------------------------------------------------------------------


def seeded(entries: str, expect: str = "") -> str:
    client = f"client:\n  cache_size: 1MiB\n  cache:\n{entries}"
    return scenario_text(expect).replace("task_sequence:", client + "task_sequence:", 1)


@pytest.mark.parametrize(
    ("entries", "needle", "rule"),
    [
        (
            "    - {package: PS100099, version: 2}\n",
            "PS100099",
            "client.cache entry names undeclared package PS100099",
        ),
        (
            "    - {package: PS100012, version: 2}\n    - {package: PS100012, version: 2}\n",
            "    - {package: PS100012, version: 2}\n    - {package: PS100012",
            "client.cache lists PS100012.2 twice",
        ),
        ("    - {package: PS100012}\n", "- {package: PS100012}", "client.cache[0] is missing the required key 'version'"),
        ("    - {package: PS100012, version: 0}\n", "version: 0", "client.cache[0].version must be an integer >= 1, got 0"),
    ],
)
def test_client_cache_entries_are_checked_at_their_lines(
    tmp_path: Path, entries: str, needle: str, rule: str
) -> None:
    path = write(tmp_path, seeded(entries))
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    lines = path.read_text(encoding="utf-8")
    expected_line = lines[: lines.index(needle) + len(needle)].count("\n") + 1
    assert (problem.line, problem.rule) == (expected_line, rule)


def test_client_cache_entries_must_fit_the_cache(tmp_path: Path) -> None:
    text = seeded("    - {package: PS100012, version: 2}\n").replace("cache_size: 1MiB", "cache_size: 32KiB")
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    assert problem.line == line_of(path, "- {package: PS100012, version: 2}")  # the list
    assert problem.rule == "the client.cache entries hold 64KiB, more than the 32KiB client.cache_size"


def test_a_seeded_version_may_be_expected_in_the_cache(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        seeded("    - {package: PS100012, version: 2}\n", "  cache: [PS100012.1, PS100012.2, PS100013.1]\n"),
    )
    scenario = load_scenario(path)
    assert [(p.id, p.version, p.size, p.files, p.type) for p in scenario.cache_seed] == [
        ("PS100012", 2, 64 * 1024, 2, "os_upgrade")
    ]
    unseeded = write(tmp_path, scenario_text("  cache: [PS100012.2]\n"), "u.cmg.yaml")
    with pytest.raises(ScenarioError) as info:
        load_scenarios(unseeded)
    assert info.value.problems[0].hint == "expect PS100012.1, or seed PS100012.2 with client.cache"


def test_seeding_makes_verified_entries_of_that_versions_content(tmp_path: Path) -> None:
    cache = ClientCache(tmp_path / "ccmcache")
    old = PackageSpec("PS100012", 2, "", "os_upgrade", True, 2, 64 * 1024, "en_US")
    made = seed_cache(cache, (old,), 11)
    (entry,) = cache.entries()
    assert entry.key == "PS100012.2"
    assert cache.staging_leftovers() == []
    generated = {s.relpath: s.data for s in generate_package(old, 11)}
    on_disk = {str(p.relative_to(entry.path)): p.read_bytes() for p in entry.path.rglob("*") if p.is_file()}
    assert on_disk == generated
    # Another version: the same layout, other bytes.
    current = {s.relpath: s.data for s in generate_package(replace(old, version=1), 11)}
    assert current.keys() == generated.keys()
    assert all(current[name] != data for name, data in generated.items())
    manifest = made["PS100012.2"]
    assert [f.relpath for f in manifest.files] == list(generated)
    assert manifest.hash  # what the run's cache check compares the entry with


# --------------------------------------------------------------------------------------------
# the added scenarios catch the bugs they were written for
# --------------------------------------------------------------------------------------------


def run_shipped(harness: object, relpath: str, workdir: Path) -> list[ExpectationFailed]:
    return run(harness, shipped(relpath), workdir)[2]


OLDER_VERSION = "cache/older-content-version-in-the-cache-is-not-reused.cmg.yaml"
PACKAGE_HASH = "integrity/location-package-hash-differs-from-a-consistent-manifest.cmg.yaml"
RESUMED = "resume/core-gives-up-and-the-task-sequence-retry-resumes.cmg.yaml"


def test_reusing_another_versions_cache_entry_fails_its_scenario(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_shipped(cmg_harness, OLDER_VERSION, tmp_path / "right") == []
    acquire = ClientCache.acquire

    def any_version(self: ClientCache, package_id: str, version: int) -> object:
        lease = acquire(self, package_id, version)
        older = [e for e in self.entries() if e.package_id == package_id]
        return lease if lease is not None or not older else acquire(self, package_id, older[0].version)

    monkeypatch.setattr(ClientCache, "acquire", any_version)
    failed = {f.expectation for f in run_shipped(cmg_harness, OLDER_VERSION, tmp_path / "bug")}
    assert {"expect.downloaded", "expect.storage_bytes.PS100012", "expect.log[1]", "expect.absent_log[0]"} <= failed


class _HashFromTheManifest:
    """A location reply whose package hash is read from the manifest the client fetched last."""

    def __init__(self, reply: object, client: CMGClient) -> None:
        self._reply, self._client = reply, client

    def __getattr__(self, name: str) -> object:
        return getattr(self._reply, name)

    @property
    def package_hash(self) -> str:
        return self._client.last_manifest_hash  # type: ignore[attr-defined,no-any-return]


def test_taking_the_package_hash_from_the_manifest_fails_its_scenario(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_shipped(cmg_harness, PACKAGE_HASH, tmp_path / "right") == []
    locate, manifest = CMGClient.locate, CMGClient.manifest

    def remembered(self: CMGClient, record: object) -> object:
        fetched = manifest(self, record)  # type: ignore[arg-type]
        self.last_manifest_hash = fetched.hash  # type: ignore[attr-defined]
        return fetched

    monkeypatch.setattr(CMGClient, "manifest", remembered)
    monkeypatch.setattr(CMGClient, "locate", lambda self, *a: _HashFromTheManifest(locate(self, *a), self))
    failed = {f.expectation for f in run_shipped(cmg_harness, PACKAGE_HASH, tmp_path / "bug")}
    assert {"expect.outcome", "expect.exit_code", "expect.cache", "expect.absent_log[0]"} <= failed


@pytest.mark.parametrize(
    "relpath",
    ["retry/storage-429-retry-after-honoured.cmg.yaml", "resume/repeated-cuts-still-byte-exact.cmg.yaml", RESUMED],
)
def test_a_sas_signature_in_the_log_fails_the_storage_retry_scenarios(
    relpath: str, cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = CMGClient.manifest

    def logged(self: CMGClient, record: object) -> object:
        fetched = manifest(self, record)  # type: ignore[arg-type]
        self.log.info("DataTransferService", f"Downloading {fetched.files[0].url}")
        return fetched

    monkeypatch.setattr(CMGClient, "manifest", logged)
    failures = {f.expectation: f for f in run_shipped(cmg_harness, relpath, tmp_path)}
    # The file's own absent_log, and the rule every run is held to (the SAS signature is one of
    # the secrets the gateway handed out).
    assert set(failures) == {"expect.absent_log[0]", "no secret in smsts.log"}
    assert "no smsts.log line matching /sig=/" in failures["expect.absent_log[0]"].detail
    assert "sig=<secret>" in failures["no secret in smsts.log"].detail


def test_a_retry_that_starts_over_fails_the_resume_scenario(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run_shipped(cmg_harness, RESUMED, tmp_path / "right") == []
    staging = ClientCache.staging

    @contextlib.contextmanager
    def forgetful(self: ClientCache, package_id: str, version: int) -> Iterator[Path]:
        with staging(self, package_id, version) as folder:
            try:
                yield folder
            except ContentError:
                shutil.rmtree(folder, ignore_errors=True)  # the verified prefix is lost
                raise

    monkeypatch.setattr(ClientCache, "staging", forgetful)
    failures = {f.expectation: f for f in run_shipped(cmg_harness, RESUMED, tmp_path / "bug")}
    assert set(failures) == {"expect.storage_bytes.PS100012", "expect.log[2]"}
    assert "actual:   1324KiB (1355776 bytes)" in failures["expect.storage_bytes.PS100012"].detail


def test_the_wrong_package_hash_is_in_the_location_reply_only(cmg_harness: object, tmp_path: Path) -> None:
    _, result, failures = run(cmg_harness, shipped(PACKAGE_HASH), tmp_path)
    assert failures == []
    (location,) = [r for r in result.requests if r.endpoint == "location"]
    true_hash = result.manifests["PS100012"].hash
    assert location.detail == f"scripted package hash {'0' if true_hash[0] != '0' else '1'}{true_hash[1:]} (the content's is {true_hash})"
    assert any(f"Using hash from LS Content Information: {location.detail.split()[3]}" in line for line in result.smsts)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (GatewayFault("manifest", package_hash="wrong"), "package_hash needs endpoint='location'"),
        (GatewayFault("location", package_hash="other"), "package_hash must be one of wrong, not 'other'"),
    ],
)
def test_the_package_hash_fault_is_checked_when_armed(fault: GatewayFault, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultPlan().add(fault)


def test_the_package_hash_fault_needs_the_location_endpoint_at_collection(tmp_path: Path) -> None:
    faults = "faults:\n  - gateway: {endpoint: manifest, package_hash: wrong}\n"
    path = write(tmp_path, scenario_text(faults=faults))
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path)
    (problem,) = info.value.problems
    assert (problem.line, problem.rule) == (line_of(path, "package_hash"), "package_hash needs endpoint: location")


def test_the_renamed_throttling_scenario_says_what_it_expects() -> None:
    scenario = load_scenario(shipped("failures/cmg-throttled-location-fails-the-step.cmg.yaml"))
    assert "fails the step" in scenario.name
    assert scenario.expect.outcome == "failure"
    assert not (ROOT / "scenarios/failures/cmg-throttled-then-recovers.cmg.yaml").exists()


def test_every_storage_retry_scenario_forbids_the_sas_signature_in_the_log() -> None:
    missing = []
    for path in sorted((ROOT / "scenarios").rglob("*.cmg.yaml")):
        for scenario in load_scenarios(path):
            if any(e.kind == "storage" for e in scenario.timeline) and "sig=" not in (
                scenario.expect.absent_log or ()
            ):
                missing.append(f"{path.relative_to(ROOT)}::{scenario.item_name}")
    assert missing == []

