"""The scenario language's composition features: includes, catalogs, cases, markers, timeline.

Pure tests (no services): files are written into ``tmp_path`` and every expected line number is
computed from the text that was written, never hard-coded.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import yaml

from pytest_cmg._errors import ScenarioError, ScenarioProblem
from pytest_cmg._gateway.faults import GatewayFault
from pytest_cmg._net.faults import delay, reset_after
from pytest_cmg._scenario.load import load_scenario, load_scenarios
from pytest_cmg._scenario.model import ClockJump, GatewayFaultEntry, ServiceEvent, StorageFaultEntry
from pytest_cmg._scenario.spec import Bounds, Count, Duration, Spec, Validation, parse_duration

if TYPE_CHECKING:
    from pytest_cmg._scenario.model import Scenario

BASE = """\
scenario: upgrade
seed: 3
packages:
  - id: PS100012
    type: os_upgrade
    files: 2
    size: 64KiB
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
    - name: Apply drivers
      action: run_command_line
expect:
  outcome: success
  cache: [PS100012.1]
"""

WORLD = """\
seed: 1910
cmg:
  site_version: 2010
client:
  auth: certificate
packages:
  - id: PS100012
    name: Windows 11 24H2 upgrade
    type: os_upgrade
    version: 3
    files: 4
    size: 1MiB
  - ref: catalog/drivers
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - name: Upgrade the operating system
      action: upgrade_os
      package: PS100012
    - name: Apply drivers
      action: apply_driver_package
      package: PS100013
"""

DRIVERS = """\
id: PS100013
name: Contoso drivers
type: driver
files: 6
size: 96KiB
locale: ja_JP
"""


def check(spec: Spec, yaml_text: str) -> tuple[object, Validation]:
    v = Validation(Path("spec.yaml"))
    return spec.check(yaml.compose(yaml_text, Loader=yaml.SafeLoader), "x", v), v


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def line_of(path: Path, needle: str) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    return next(i for i, line in enumerate(lines, 1) if needle in line)


def problems(path: Path, **kwargs: object) -> list[ScenarioProblem]:
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path, **kwargs)  # type: ignore[arg-type]
    return info.value.problems


def one(path: Path, **kwargs: object) -> ScenarioProblem:
    found = problems(path, **kwargs)
    assert len(found) == 1, [str(p) for p in found]
    return found[0]


@pytest.fixture
def world(tmp_path: Path) -> Path:
    """A project folder with fixtures/worlds/ipu.yaml and fixtures/catalog/drivers.yaml."""
    write(tmp_path, "fixtures/worlds/ipu.yaml", WORLD)
    write(tmp_path, "fixtures/catalog/drivers.yaml", DRIVERS)
    return tmp_path


def scenario_in(root: Path, body: str, name: str = "scenarios/s.cmg.yaml") -> Path:
    return write(root, name, body)


# --------------------------------------------------------------------------------------------
# includes and catalogs
# --------------------------------------------------------------------------------------------

USES_WORLD = """\
scenario: upgrade in the shared world
include: [worlds/ipu]
client:
  auth: token
packages:
  - id: PS100012
    version: 4
expect:
  outcome: success
  cache: [PS100012.4, PS100013.1]
"""


def test_an_included_world_is_merged_under_the_scenario(world: Path) -> None:
    scenario = load_scenario(scenario_in(world, USES_WORLD))
    assert scenario.seed == 1910  # from the world
    assert scenario.cmg.site_version == 2010  # from the world
    assert scenario.auth == "token"  # the scenario overrides the world
    assert [p.id for p in scenario.packages] == ["PS100012", "PS100013"]
    upgrade, drivers = scenario.packages
    # Packages merge by id: the scenario changed only the version.
    assert (upgrade.version, upgrade.files, upgrade.size, upgrade.name) == (
        4,
        4,
        1024**2,
        "Windows 11 24H2 upgrade",
    )
    # The catalog entry the world refers to.
    assert (drivers.type, drivers.files, drivers.locale) == ("driver", 6, "ja_JP")
    assert scenario.task_sequence.package_versions == {"PS100012": 4, "PS100013": 1}
    assert [s.name for s in scenario.task_sequence.steps] == [
        "Upgrade the operating system",
        "Apply drivers",
    ]


def test_lines_of_included_values_point_into_the_world(world: Path) -> None:
    scenario = load_scenario(scenario_in(world, USES_WORLD))
    world_file = (world / "fixtures/worlds/ipu.yaml").resolve()
    assert scenario.location("cmg.site_version") == (world_file, line_of(world_file, "site_version"))
    catalog = (world / "fixtures/catalog/drivers.yaml").resolve()
    assert scenario.location("packages[1].locale") == (catalog, line_of(catalog, "locale"))
    own = scenario.path
    assert scenario.location("expect.cache") == (own, line_of(own, "cache:"))
    assert scenario.location("packages[0].version") == (own, line_of(own, "version: 4"))


def test_relative_include_and_explicit_fixtures_folder(tmp_path: Path) -> None:
    write(tmp_path, "shared/worlds/ipu.yaml", WORLD)
    write(tmp_path, "shared/catalog/drivers.yaml", DRIVERS)
    text = USES_WORLD.replace("include: [worlds/ipu]", "include: [../shared/worlds/ipu.yaml]")
    path = scenario_in(tmp_path, text)
    # The world's own ``ref: catalog/drivers`` needs the fixtures folder: none is found above,
    # and the shipped folder has no such catalog.
    problem = one(path)
    assert problem.path == (tmp_path / "shared/worlds/ipu.yaml").resolve()
    assert problem.line == line_of(problem.path, "ref: catalog/drivers")
    assert "no file catalog/drivers.yaml in the shipped folder" in problem.rule
    assert "no fixtures folder is set, and none is above" in problem.rule
    assert problem.hint.endswith(f"included from {_rel(path)}:{line_of(path, 'include:')}")
    scenario = load_scenario(path, fixtures=tmp_path / "shared")
    assert [p.id for p in scenario.packages] == ["PS100012", "PS100013"]


def test_an_empty_value_keeps_the_included_one(world: Path) -> None:
    text = USES_WORLD.replace("client:\n  auth: token\n", "client:\n")
    scenario = load_scenario(scenario_in(world, text))
    assert scenario.auth == "certificate"


def test_a_problem_in_a_world_is_reported_at_its_line_with_the_including_line(world: Path) -> None:
    bad = WORLD.replace("  site_version: 2010", "  site_versoin: 2010")
    world_file = write(world, "fixtures/worlds/ipu.yaml", bad)
    path = scenario_in(world, USES_WORLD)
    problem = one(path)
    assert problem.path == world_file.resolve()
    assert problem.line == line_of(world_file, "site_versoin")
    assert problem.rule == "unknown key 'site_versoin' in cmg"
    assert "did you mean 'site_version'?" in problem.hint
    assert problem.hint.endswith(f"included from {_rel(path)}:{line_of(path, 'include:')}")


def test_a_problem_in_a_catalog_names_the_ref_line(world: Path) -> None:
    catalog = write(world, "fixtures/catalog/drivers.yaml", DRIVERS.replace("size: 96KiB", "size: lots"))
    path = scenario_in(world, USES_WORLD)
    problem = one(path)
    assert problem.path == catalog.resolve()
    assert problem.line == line_of(catalog, "size: lots")
    assert "'lots' is not a size" in problem.rule
    world_file = (world / "fixtures/worlds/ipu.yaml").resolve()
    # Referenced from the world, itself included from the scenario: the whole chain is named.
    assert f"referenced from {_rel(world_file)}:{line_of(world_file, 'ref:')}" in problem.hint
    assert f"included from {_rel(path)}:{line_of(path, 'include:')}" in problem.hint


def _rel(path: Path) -> str:
    import os

    return os.path.relpath(path)


def test_a_world_may_not_name_the_scenario(world: Path) -> None:
    world_file = write(world, "fixtures/worlds/ipu.yaml", "scenario: not here\n" + WORLD)
    found = problems(scenario_in(world, USES_WORLD))
    assert [(p.path, p.line, p.rule) for p in found] == [
        (world_file.resolve(), 1, "unknown key 'scenario' in the document")
    ]


def test_a_missing_include_is_reported_at_its_line(world: Path) -> None:
    path = scenario_in(world, USES_WORLD.replace("worlds/ipu]", "worlds/ipv]"))
    found = problems(path)
    missing = [p for p in found if "no file" in p.rule]
    assert len(missing) == 1
    assert (missing[0].path, missing[0].line) == (path, line_of(path, "include:"))
    assert "include 'worlds/ipv'" in missing[0].rule
    assert "did you mean 'worlds/ipu'?" in missing[0].hint
    # Without the world the scenario lacks its task sequence: reported too, at its own line.
    assert any("missing the required key 'task_sequence'" in p.rule for p in found)


def test_an_include_with_a_control_character_is_reported_at_its_line(world: Path) -> None:
    # A NUL reached Path.resolve and raised ValueError: a traceback, not a problem.
    path = scenario_in(world, USES_WORLD.replace("[worlds/ipu]", '["worlds/ip\\0u"]'))
    found = [p for p in problems(path) if "control character" in p.rule]
    assert len(found) == 1, [str(p) for p in problems(path)]
    assert (found[0].path, found[0].line) == (path, line_of(path, "include:"))
    assert "U+0000 at character 9" in found[0].rule


@pytest.mark.parametrize(
    ("body", "line_text", "rule"),
    [
        # An empty ``ref:`` is "not given": the package then needs its own id (it reached the
        # loader as a KeyError).
        (
            "packages:\n  - ref:\n",
            "  - ref:",
            "packages[2] is missing the required key 'id'",
        ),
        # An empty ``service:`` is no kind at all (it reached the loader as StopIteration).
        (
            "faults:\n  - service:\n    at: 1s\n",
            "  - service:",
            "faults[0] needs exactly one of gateway, storage, service, clock, restart",
        ),
    ],
)
def test_a_key_left_empty_is_not_given(world: Path, body: str, line_text: str, rule: str) -> None:
    text = USES_WORLD.replace("packages:\n  - id: PS100012\n    version: 4\n", body)
    path = scenario_in(world, text)
    found = [p for p in problems(path) if p.rule == rule]
    assert len(found) == 1, [str(p) for p in problems(path)]
    assert found[0].line == line_of(path, line_text)


def test_an_include_cycle_is_reported(world: Path) -> None:
    write(world, "fixtures/worlds/a.yaml", "include: [./b]\nseed: 1\n")
    b = write(world, "fixtures/worlds/b.yaml", "include: [./a]\nseed: 2\n")
    text = USES_WORLD.replace("include: [worlds/ipu]", "include: [worlds/ipu, worlds/a]")
    problem = one(scenario_in(world, text))
    assert problem.path == b.resolve()
    assert problem.line == 1
    a = (world / "fixtures/worlds/a.yaml").resolve()
    assert problem.rule == f"include cycle: {_rel(a)} -> {_rel(b.resolve())} -> {_rel(a)}"


def test_a_world_may_change_only_some_keys_of_an_included_package(world: Path) -> None:
    write(world, "fixtures/worlds/newer.yaml", "include: [./ipu]\npackages:\n  - {id: PS100013, version: 2}\n")
    text = USES_WORLD.replace("include: [worlds/ipu]", "include: [worlds/newer]").replace(
        "PS100013.1]", "PS100013.2]"
    )
    scenario = load_scenario(scenario_in(world, text))
    drivers = scenario.packages[1]
    assert (drivers.version, drivers.files, drivers.locale) == (2, 6, "ja_JP")


def test_a_partial_package_needs_its_id(world: Path) -> None:
    world_file = write(world, "fixtures/worlds/newer.yaml", "include: [./ipu]\npackages:\n  - {version: 2}\n")
    text = USES_WORLD.replace("include: [worlds/ipu]", "include: [worlds/newer]")
    found = problems(scenario_in(world, text))
    assert (found[0].path, found[0].line, found[0].rule) == (
        world_file.resolve(),
        3,
        "packages[0] is missing the required key 'id'",
    )


def test_later_includes_override_earlier_ones(world: Path) -> None:
    write(world, "fixtures/worlds/old-site.yaml", "cmg:\n  site_version: 1910\nseed: 5\n")
    text = USES_WORLD.replace("include: [worlds/ipu]", "include: [worlds/ipu, worlds/old-site]")
    scenario = load_scenario(scenario_in(world, text))
    assert (scenario.cmg.site_version, scenario.seed) == (1910, 5)


def test_a_ref_with_overrides(world: Path) -> None:
    text = BASE.replace(
        "packages:\n", "packages:\n  - {ref: catalog/drivers, version: 2, locale: it_IT}\n"
    )
    scenario = load_scenario(scenario_in(world, text))
    drivers = scenario.packages[0]
    assert (drivers.id, drivers.version, drivers.locale, drivers.files) == ("PS100013", 2, "it_IT", 6)


def test_a_missing_ref_excuses_the_keys_it_would_give(world: Path) -> None:
    text = BASE.replace("packages:\n", "packages:\n  - ref: catalog/nothing\n")
    path = scenario_in(world, text)
    problem = one(path)
    assert problem.line == line_of(path, "ref: catalog/nothing")
    assert "ref 'catalog/nothing': no file catalog/nothing.yaml in the fixtures folder" in problem.rule
    assert "(the nearest above the scenario); the shipped folder" in problem.rule


def test_a_case_that_sets_packages_may_ref_the_catalog(world: Path) -> None:
    # A case's values arrive after the file was assembled: its refs are resolved too (they
    # reached the builder unresolved once, and loading died on a KeyError).
    text = BASE + (
        "cases:\n"
        "  - id: plain\n"
        "  - id: drivers\n"
        "    set:\n"
        "      packages:\n"
        "        - {id: PS100012, type: os_upgrade, files: 2, size: 64KiB}\n"
        "        - {ref: catalog/drivers, files: 1}\n"
    )
    plain, drivers = load_scenarios(scenario_in(world, text))
    assert [p.id for p in plain.packages] == ["PS100012"]
    assert [(p.id, p.files, p.locale) for p in drivers.packages] == [
        ("PS100012", 2, "en_US"),
        ("PS100013", 1, "ja_JP"),
    ]


def test_a_missing_ref_in_a_case_is_reported_at_its_line(world: Path) -> None:
    text = BASE + (
        "cases:\n"
        "  - id: drivers\n"
        "    set: {packages: [{ref: catalog/nothing}]}\n"
    )
    path = scenario_in(world, text)
    found = problems(path)
    assert any(
        p.line == line_of(path, "ref: catalog/nothing") and "ref 'catalog/nothing'" in p.rule
        for p in found
    ), [str(p) for p in found]


def test_the_shipped_fixtures_load() -> None:
    root = Path(__file__).resolve().parents[1]
    scenarios = load_scenarios(root / "scenarios/worlds/ipu-world-reads-only-what-runs.cmg.yaml")
    assert [p.id for p in scenarios[0].packages] == ["PS100012", "PS100013", "PS100014"]
    assert scenarios[0].packages[2].locale == "it_IT"


# --------------------------------------------------------------------------------------------
# matrix and cases
# --------------------------------------------------------------------------------------------

MATRIX = BASE + """\
matrix:
  client.auth: [token, certificate]
  cmg.site_version: [1910, 2107]
"""


def test_a_matrix_makes_one_scenario_per_combination_in_written_order(tmp_path: Path) -> None:
    scenarios = load_scenarios(write(tmp_path, "m.cmg.yaml", MATRIX))
    assert [s.item_name for s in scenarios] == [
        "upgrade[token-1910]",
        "upgrade[token-2107]",
        "upgrade[certificate-1910]",
        "upgrade[certificate-2107]",
    ]
    assert [(s.auth, s.cmg.site_version) for s in scenarios] == [
        ("token", 1910),
        ("token", 2107),
        ("certificate", 1910),
        ("certificate", 2107),
    ]
    assert {s.item_where for s in scenarios} == {"matrix"}
    path = scenarios[0].path
    assert scenarios[2].case_values == (
        ("client.auth", "certificate", "matrix.client.auth[1]"),
        ("cmg.site_version", "1910", "matrix.cmg.site_version[0]"),
    )
    assert scenarios[2].line("matrix.client.auth[1]") == line_of(path, "client.auth:")


def test_loading_a_parametrised_file_as_one_scenario_is_a_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "m.cmg.yaml", MATRIX)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    (problem,) = info.value.problems
    assert problem.rule.startswith("this file is parametrised into 4 cases (token-1910, token-2107")
    assert problem.line == line_of(path, "client.auth:")  # where the matrix's mapping starts


CASES = BASE + """\
cases:
  - id: "1906"
    set: {cmg.site_version: 1906}
    expect:
      outcome: failure
      exit_code: "0x80040102"
      cache: []
    markers: [{xfail: {reason: known gap, strict: true}}]
  - id: japanese
    set:
      packages[PS100012].locale: ja_JP
      task_sequence.variables.OSDLanguage: ja-JP
"""


def test_cases_set_values_and_override_expectations(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cmg.yaml", CASES)
    old, japanese = load_scenarios(path)
    assert (old.case_id, old.cmg.site_version) == ("1906", 1906)
    assert old.expect.outcome == "failure"
    assert old.expect.exit_code == "0x80040102"
    assert old.expect.cache == ()
    assert old.location("expect.outcome") == (path, line_of(path, "outcome: failure"))
    assert [(m.name, m.kwargs) for m in old.markers] == [
        ("xfail", {"reason": "known gap", "strict": True})
    ]
    assert old.item_where == "cases[0]"
    assert old.line(old.item_where) == line_of(path, 'id: "1906"')
    assert japanese.expect.outcome == "success"
    assert japanese.packages[0].locale == "ja_JP"
    assert japanese.task_sequence.variables == {"OSDLanguage": "ja-JP"}
    assert japanese.markers == ()


def test_cases_times_matrix(tmp_path: Path) -> None:
    text = CASES + "matrix:\n  client.auth: [token, certificate]\n"
    ids = [s.case_id for s in load_scenarios(write(tmp_path, "c.cmg.yaml", text))]
    assert ids == ["1906-token", "1906-certificate", "japanese-token", "japanese-certificate"]


def test_a_bad_matrix_key_is_reported_with_the_nearest_key(tmp_path: Path) -> None:
    path = write(tmp_path, "m.cmg.yaml", MATRIX.replace("client.auth:", "client.auht:"))
    problem = one(path)
    assert problem.line == line_of(path, "client.auht:")
    assert problem.rule == "matrix key 'client.auht': unknown key 'auht' in client"
    assert problem.hint.startswith("did you mean 'auth'? allowed keys: auth, enable_cmg")


@pytest.mark.parametrize(
    ("key", "rule"),
    [
        ("scenario", "'scenario' cannot be set per case"),
        ("seed.x", "seed is not a mapping"),
        ("packages.id", "packages is not a mapping"),
        ("cmg[0]", "cmg is not a list"),
    ],
)
def test_set_paths_that_lead_nowhere(tmp_path: Path, key: str, rule: str) -> None:
    path = write(tmp_path, "m.cmg.yaml", BASE + f"matrix:\n  {key}: [a]\n")
    found = problems(path)
    line = line_of(path, "matrix:") + 1
    assert any(rule in p.rule and p.line == line for p in found), [
        str(p) for p in found
    ]


def test_a_bad_case_value_is_reported_at_its_line_naming_the_case(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cmg.yaml", CASES.replace("locale: ja_JP", "locale: ja_jp"))
    problem = one(path)
    assert problem.line == line_of(path, "locale: ja_jp")
    assert problem.rule == "packages[0].locale 'ja_jp' is not one of en_US, it_IT, ja_JP"
    assert problem.hint == "did you mean 'ja_JP'?; in case japanese"


def test_a_bad_matrix_value_names_every_case_it_breaks(tmp_path: Path) -> None:
    path = write(tmp_path, "m.cmg.yaml", MATRIX.replace("[1910, 2107]", "[1910, 2108]"))
    problem = one(path)
    assert problem.line == line_of(path, "cmg.site_version:")
    assert "2108 is not one of" in problem.rule
    assert problem.hint == "nearest: 2107; in cases token-2108, certificate-2108"


def test_a_case_missing_list_item_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cmg.yaml", CASES.replace("packages[PS100012]", "packages[PS1000FF]"))
    problem = one(path)
    assert problem.line == line_of(path, "packages[PS1000FF]")
    assert problem.rule == "cannot set 'packages[PS1000FF].locale': no item with id PS1000FF"
    path = write(tmp_path, "c.cmg.yaml", CASES.replace("packages[PS100012]", "packages[3]"))
    assert "the list has 1 item(s)" in one(path).rule


def test_duplicate_case_ids(tmp_path: Path) -> None:
    path = write(tmp_path, "c.cmg.yaml", CASES.replace("id: japanese", 'id: "1906"'))
    problem = one(path)
    lines = path.read_text().splitlines()
    assert problem.line == [i for i, x in enumerate(lines, 1) if 'id: "1906"' in x][1]
    assert problem.rule == "case id '1906' is given twice"


def test_too_many_items(tmp_path: Path) -> None:
    values = ", ".join(str(i) for i in range(20))
    text = BASE + f"matrix:\n  seed: [{values}]\n  task_sequence.variables.X: [{values}]\n"
    problem = one(write(tmp_path, "m.cmg.yaml", text))
    assert problem.rule == "this file makes 400 items; at most 256 are allowed"


def test_matrix_ids_are_sanitised_and_kept_unique(tmp_path: Path) -> None:
    text = BASE + "matrix:\n  task_sequence.variables.X: ['a b', 'a/b']\n"
    problem = one(write(tmp_path, "m.cmg.yaml", text))
    assert problem.rule == "two items would have the same ID 'a_b'"


# --------------------------------------------------------------------------------------------
# markers
# --------------------------------------------------------------------------------------------


def test_markers_of_every_shape(tmp_path: Path) -> None:
    text = BASE + (
        "markers:\n"
        "  - slow\n"
        "  - {xfail: {reason: known gap, strict: true}}\n"
        "  - {skipif: {condition: \"sys.platform == 'win32'\", reason: no TIOCOUTQ}}\n"
        "  - {xdist_group: storage}\n"
        "  - {custom: [1, two]}\n"
        "  - {other: {level: 3}}\n"
    )
    scenario = load_scenario(write(tmp_path, "k.cmg.yaml", text))
    assert [(m.name, m.args, m.kwargs) for m in scenario.markers] == [
        ("slow", (), {}),
        ("xfail", (), {"reason": "known gap", "strict": True}),
        ("skipif", (), {"condition": "sys.platform == 'win32'", "reason": "no TIOCOUTQ"}),
        ("xdist_group", ("storage",), {}),
        ("custom", (1, "two"), {}),
        ("other", (), {"level": 3}),
    ]


@pytest.mark.parametrize(
    ("marker", "fragment"),
    [
        ("{xfail: {reason: x, stric: true}}", "unknown key 'stric' in markers[0].xfail"),
        ("{xfail: {strict: maybe}}", "markers[0].xfail.strict must be true or false"),
        ("skipif", "marker skipif needs arguments"),
        ("{slow: 1, fast: 2}", "must be a marker name, or a mapping of one marker name"),
        ("'not a name'", "must match"),
    ],
)
def test_bad_markers(tmp_path: Path, marker: str, fragment: str) -> None:
    path = write(tmp_path, "k.cmg.yaml", BASE + f"markers:\n  - {marker}\n")
    problem = one(path)
    assert fragment in problem.rule
    assert problem.line == line_of(path, "markers:") + 1


# --------------------------------------------------------------------------------------------
# the timeline (faults, service, clock)
# --------------------------------------------------------------------------------------------

FAULTS = BASE + """\
faults:
  - gateway: {endpoint: manifest, request: 1, status: 503, retry_after: "5"}
  - storage: {request: 2, times: 3, reset_after: 300KiB, delay: 2s}
  - service: stop
    before_step: Apply drivers
  - clock: 9h
    at: 30s
"""


def test_timeline_events_are_read(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, "f.cmg.yaml", FAULTS))
    gateway, storage, service, clock = scenario.timeline
    assert (gateway.kind, gateway.before_step, gateway.at) == ("gateway", None, None)
    assert isinstance(gateway, GatewayFaultEntry)
    assert gateway.fault == GatewayFault(endpoint="manifest", request=1, status=503, retry_after="5")
    assert isinstance(storage, StorageFaultEntry) and storage.kind == "storage"
    assert (storage.request, storage.times, storage.file) == (2, 3, None)
    assert storage.faults == (reset_after(300 * 1024), delay(2.0))
    assert isinstance(service, ServiceEvent) and isinstance(clock, ClockJump)
    assert (service.kind, service.service, service.before_step) == ("service", "stop", 1)
    assert (clock.kind, clock.seconds, clock.at) == ("clock", 9 * 3600.0, 30.0)
    assert clock.describe() == "clock +9h (at 30s)"
    assert service.describe() == "service stop (before step 1)"


@pytest.mark.parametrize(
    ("old", "new", "needle", "rule", "hint"),
    [
        (
            "  - service: stop",
            "  - servce: stop",
            "servce:",
            "unknown key 'servce' in faults[2]",
            "did you mean 'service'?",
        ),
        (
            "  - clock: 9h\n",
            "  - clock: 9h\n    service: start\n",
            "- clock: 9h",
            "faults[3] needs exactly one of gateway, storage, service, clock",
            "given: service, clock",
        ),
        (
            "before_step: Apply drivers",
            "before_step: Apply driver",
            "before_step:",
            "before_step names no step: 'Apply driver'",
            "did you mean 'Apply drivers'?",
        ),
        ("status: 503", "status: 302", "status: 302", "must be an integer from 400 to 599", ""),
        (
            'endpoint: manifest, request: 1, status: 503, retry_after: "5"',
            "endpoint: location, wrong_hash: true",
            "wrong_hash: true",
            "wrong_hash needs endpoint: manifest",
            "",
        ),
        ("reset_after: 300KiB, ", "stall_after: 1MiB, ", "stall_after", "stall_after and stall_for go together", ""),
        ("reset_after: 300KiB, delay: 2s", "times: 1", "times: 1", "duplicate" , ""),
        ("clock: 9h", "clock: soon", "clock: soon", "'soon' is not a duration", ""),
        ("reset_after: 300KiB, delay: 2s", "retry_after: '5'", "retry_after: '5'", "", ""),
    ],
    ids=[
        "unknown-kind",
        "two-kinds",
        "unknown-step",
        "bad-status",
        "wrong-hash-needs-manifest",
        "stall-alone",
        "given-twice",
        "bad-duration",
        "does-nothing",
    ],
)
def test_timeline_problems(
    tmp_path: Path, old: str, new: str, needle: str, rule: str, hint: str
) -> None:
    path = write(tmp_path, "f.cmg.yaml", FAULTS.replace(old, new))
    found = problems(path)
    rules = [str(p) for p in found]
    if rule == "duplicate":
        assert any("times is given twice" in p.rule for p in found), rules
        return
    if rule == "":
        assert any(p.rule == "this storage fault does nothing" for p in found), rules
        assert any(p.rule == "retry_after goes with respond" for p in found), rules
        return
    match = [p for p in found if rule in p.rule]
    assert match, rules
    assert match[0].line == line_of(path, needle)
    assert hint in match[0].hint


def test_before_step_and_at_are_exclusive(tmp_path: Path) -> None:
    path = write(tmp_path, "f.cmg.yaml", FAULTS.replace("    at: 30s\n", "    at: 30s\n    before_step: Apply drivers\n"))
    assert "fires before_step or at a time, not both" in one(path).rule


# --------------------------------------------------------------------------------------------
# expectations
# --------------------------------------------------------------------------------------------


def test_new_expectations_are_read(tmp_path: Path) -> None:
    text = BASE + (
        "  storage_bytes: {PS100012: 64KiB}\n"
        "  storage_requests: {at_least: 2}\n"
        "  retries: 0\n"
        "  elapsed: {max: 1m}\n"
        "  requests: {location: 1, manifest: {at_most: 2}, sts: 0}\n"
        '  absent_log: ["sig="]\n'
    )
    expect = load_scenario(write(tmp_path, "e.cmg.yaml", text)).expect
    assert expect.storage_bytes == {"PS100012": Bounds(65536, 65536)}
    assert expect.storage_requests == Bounds(2, None)
    assert expect.retries == Bounds(0, 0)
    assert expect.elapsed == Bounds(None, 60.0)
    assert expect.requests == {"location": Bounds(1, 1), "manifest": Bounds(None, 2), "sts": Bounds(0, 0)}
    assert expect.absent_log == ("sig=",)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ('  log: ["Hash (verification"]\n', "is not a valid regular expression: missing )"),
        ("  storage_bytes: {PS100077: 1}\n", "storage_bytes names undeclared package PS100077"),
        ("  retries: {at_least: 3, at_most: 1}\n", "at_least 3 is more than at_most 1"),
        ("  retries: {}\n", "needs at least one of at_least, at_most"),
        ("  elapsed: {maximum: 3s}\n", "unknown key 'maximum' in expect.elapsed"),
        ("  requests: {sta: 1}\n", "unknown key 'sta' in expect.requests"),
    ],
)
def test_bad_expectations(tmp_path: Path, extra: str, fragment: str) -> None:
    path = write(tmp_path, "e.cmg.yaml", BASE + extra)
    problem = one(path)
    assert fragment in problem.rule
    assert problem.line == line_of(path, extra.strip().split(":")[0] + ":")


def test_an_empty_optional_section_takes_its_defaults(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, "e.cmg.yaml", "cmg:\nclient:\n" + BASE))
    assert scenario.cmg.site_version == 2107
    assert scenario.auth == "token"


# --------------------------------------------------------------------------------------------
# spec pieces
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25), ("2d", 172800.0), ("-60s", -60.0), ("1.5h", 5400.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "h", "5 m", "5x", "--5s", "5s-"])
def test_parse_duration_rejects(text: str) -> None:
    assert parse_duration(text) is None


def test_duration_spec() -> None:
    assert check(Duration(), "12")[0] == 12.0
    assert check(Duration(), "2m")[0] == 120.0
    value, v = check(Duration(), "-5s")
    assert value is None
    assert "is not a duration" in v.problems[0].rule
    assert check(Duration(negative=True), "-5s")[0] == -5.0
    value, v = check(Duration(maximum=10), "11s")
    assert value is None
    assert v.problems[0].rule == "x '11s' is longer than 10s"


def test_count_spec_and_bounds() -> None:
    assert check(Count(), "3")[0] == Bounds(3, 3)
    assert check(Count(), "{at_most: 3}")[0] == Bounds(None, 3)
    bounds = Bounds(1, 3)
    assert [bounds.holds(n) for n in (0, 1, 3, 4)] == [False, True, True, False]
    assert Bounds(2, 2).describe() == "exactly 2"
    assert Bounds(None, 2).describe("s") == "at most 2s"
    assert Bounds(1, 2).describe() == "between 1 and 2"
    value, v = check(Count(), "-1")
    assert value is None
    assert "integer >= 0" in v.problems[0].rule


def test_scenario_is_a_frozen_dataclass_with_item_names(tmp_path: Path) -> None:
    scenario: Scenario = load_scenario(write(tmp_path, "b.cmg.yaml", BASE))
    assert scenario.item_name == "upgrade"
    assert scenario.case_id is None
    assert scenario.item_where == "scenario"
