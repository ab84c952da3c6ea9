"""Unit tests of the scenario language: the spec, loading a scenario file, generated content.

Bad scenario files are built by copying the shipped example into ``tmp_path`` and changing its
text; every expected line number is computed from the text that was written, never hard-coded.
"""

from __future__ import annotations

import re
import zlib
from pathlib import Path

import pytest
import yaml

from pytest_cmg._errors import PytestCmgError, ScenarioError, ScenarioProblem
from pytest_cmg._scenario import content
from pytest_cmg._scenario import spec as spec_module
from pytest_cmg._scenario.content import generate_package
from pytest_cmg._scenario.language import SCENARIO
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.model import PackageSpec, Scenario
from pytest_cmg._scenario.spec import (
    Bool,
    Bounds,
    Choice,
    Field,
    Int,
    ListOf,
    MapOf,
    Record,
    Size,
    Str,
    Validation,
)

EXAMPLE = (
    Path(__file__).resolve().parents[1] / "scenarios/ipu/on-demand-token-software-center.cmg.yaml"
)
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def exact_line(text: str, line: str) -> int:
    """1-based number of the line that is exactly ``line`` (ignoring surrounding blanks)."""
    return next(i for i, have in enumerate(text.splitlines(), 1) if have.strip() == line.strip())


def line_of(text: str, needle: str, after: str | None = None) -> int:
    """1-based number of the first line containing ``needle`` (after the line containing ``after``)."""
    lines = text.splitlines()
    start = 0
    if after is not None:
        start = next(i for i, line in enumerate(lines) if after in line) + 1
    for i in range(start, len(lines)):
        if needle in lines[i]:
            return i + 1
    raise AssertionError(f"{needle!r} not found in the scenario text")


def mutate(text: str, *edits: tuple[str, str]) -> str:
    for old, new in edits:
        assert text.count(old) == 1, f"{old!r} must occur exactly once in the example"
        text = text.replace(old, new)
    return text


def write(tmp_path: Path, text: str, name: str = "s.cmg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def problems_of(tmp_path: Path, text: str) -> tuple[list[ScenarioProblem], ScenarioError, Path]:
    path = write(tmp_path, text)
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return info.value.problems, info.value, path


def only_problem(tmp_path: Path, text: str) -> tuple[ScenarioProblem, ScenarioError, Path]:
    problems, error, path = problems_of(tmp_path, text)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0], error, path


def check(spec: object, yaml_text: str, where: str = "x") -> tuple[object, Validation]:
    v = Validation(Path("spec.yaml"))
    node = yaml.compose(yaml_text, Loader=yaml.SafeLoader)
    return spec.check(node, where, v), v  # type: ignore[attr-defined]


def spec(
    pid: str = "PS100099",
    *,
    version: int = 1,
    kind: str = "package",
    files: int = 3,
    size: int = 4096,
    locale: str = "en_US",
) -> PackageSpec:
    return PackageSpec(
        id=pid,
        version=version,
        name="test",
        type=kind,
        on_cloud_dp=True,
        files=files,
        size=size,
        locale=locale,
    )


@pytest.fixture
def example(tmp_path: Path) -> Scenario:
    return load_scenario(write(tmp_path, EXAMPLE_TEXT))


# --------------------------------------------------------------------------------------------
# the example file loads
# --------------------------------------------------------------------------------------------


def test_example_top_level(example: Scenario) -> None:
    assert example.name == (
        "in-place upgrade downloads each package on demand through a content-enabled CMG"
    )
    assert example.description.startswith("A Windows in-place upgrade task sequence")
    assert "\n" not in example.description.rstrip("\n")  # folded scalar
    assert example.seed == 1910
    assert example.site_code == "PS1"


def test_example_packages(example: Scenario) -> None:
    assert [p.id for p in example.packages] == ["PS100012", "PS100013"]
    upgrade, drivers = example.packages
    assert upgrade == PackageSpec(
        id="PS100012",
        version=3,
        name="Windows 11 24H2 upgrade",
        type="os_upgrade",
        on_cloud_dp=True,
        files=4,
        size=25165824,
        locale="en_US",
    )
    assert upgrade.size == 24 * 1024 * 1024
    assert drivers.type == "driver"
    assert drivers.version == 1
    assert drivers.files == 12
    assert drivers.size == 2 * 1024 * 1024
    assert drivers.locale == "ja_JP"
    assert drivers.on_cloud_dp is True


def test_example_task_sequence(example: Scenario) -> None:
    ts = example.task_sequence
    assert ts.package_id == "PS100020"
    assert ts.name == "Windows 11 in-place upgrade"
    assert [(s.name, s.action, s.package) for s in ts.steps] == [
        ("Check readiness", "run_command_line", None),
        ("Upgrade the operating system", "upgrade_os", "PS100012"),
        ("Apply drivers", "apply_driver_package", "PS100013"),
    ]
    assert ts.package_versions == {"PS100012": 3, "PS100013": 1}
    assert ts.version_of("PS100012") == 3


def test_example_settings(example: Scenario) -> None:
    assert example.launch == "software_center"
    assert example.deployment.allow_internet is True
    assert example.deployment.download_mode == "on_demand"
    assert example.client.allow_cloud_dp is True
    assert example.cmg.content_enabled is True
    assert example.cache_size == 5120 * 1024 * 1024  # the default


def test_example_expectations(example: Scenario) -> None:
    expect = example.expect
    assert expect.outcome == "success"
    assert expect.exit_code == "0x00000000"
    assert expect.cache == ("PS100012.3", "PS100013.1")
    assert expect.downloaded == ("PS100012", "PS100013")
    assert expect.requests == {"location": Bounds(2, 2), "manifest": Bounds(2, 2)}
    assert expect.log is not None and expect.log[0] == "_SMSTSDownloadOnDemand=true"
    assert expect.log[2] == r"Hash verification succeeded for content PS100012\.3"
    assert len(expect.log) == 5
    assert expect.gateway_log == (r"Issued manifest for PS100012\.3",)


def test_example_lines_point_into_the_file(example: Scenario) -> None:
    text = EXAMPLE_TEXT
    assert example.line("expect.outcome") == line_of(text, "outcome:", after="expect:")
    assert example.line("expect.exit_code") == line_of(text, "exit_code:", after="expect:")
    assert example.line("seed") == line_of(text, "seed:")
    assert example.line("task_sequence.steps[1].package") == line_of(
        text, "package: PS100012", after="steps:"
    )
    assert example.line("expect.log[4]") == line_of(text, "Task sequence completed", after="log:")
    # A path that was not validated falls back to its nearest validated ancestor.
    assert example.line("expect.requests.nothing") == example.line("expect.requests")
    assert example.line("expect.requests") == line_of(text, "location:", after="requests:")
    assert example.line("packages[0].locale") == line_of(text, "- id: PS100012")


def test_defaults_fill_omitted_optional_sections(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("site:\n  code: PS1\n", ""),
        ("cmg:\n  content_enabled: true\n", ""),
        ("client:\n  allow_cloud_dp: true\n", ""),
        ("seed: 1910\n", ""),
        ("  launch: software_center\n", ""),
        ("  download: on_demand\n", ""),
        ("    version: 1\n", ""),
        ("    locale: ja_JP\n", ""),
    )
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.seed == 0
    assert scenario.site_code == "PS1"
    assert scenario.cmg.content_enabled is True
    assert scenario.client.allow_cloud_dp is True
    assert scenario.launch == "software_center"
    assert scenario.deployment.download_mode == "on_demand"
    assert scenario.packages[1].version == 1
    assert scenario.packages[1].locale == "en_US"


def test_explicit_settings_are_carried_through(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("content_enabled: true", "content_enabled: false"),
        ("allow_cloud_dp: true", "allow_cloud_dp: false\n  cache_size: 512KiB"),
        ("allow_internet: true", "allow_internet: false"),
        ("download: on_demand", "download: all_before_start"),
        ("code: PS1", "code: AB9"),
    )
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.cmg.content_enabled is False
    assert scenario.client.allow_cloud_dp is False
    assert scenario.cache_size == 512 * 1024
    assert scenario.deployment.allow_internet is False
    assert scenario.deployment.download_mode == "all_before_start"
    assert scenario.site_code == "AB9"


def test_scenario_error_is_a_pytest_cmg_error() -> None:
    assert issubclass(ScenarioError, PytestCmgError)
    problem = ScenarioProblem(Path("f.yaml"), 7, "rule", "hint")
    assert str(problem) == "f.yaml:7: rule (hint)"
    assert str(ScenarioProblem(Path("f.yaml"), 7, "rule")) == "f.yaml:7: rule"
    error = ScenarioError([problem, problem])
    assert str(error).startswith("2 problems in scenario file:\n")
    assert str(ScenarioError([problem])).startswith("1 problem in scenario file:\n")


# --------------------------------------------------------------------------------------------
# unknown keys
# --------------------------------------------------------------------------------------------


def test_misspelled_top_level_key(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("packages:", "pakages:"))
    problems, error, path = problems_of(tmp_path, text)
    unknown = [p for p in problems if "unknown key" in p.rule]
    assert len(unknown) == 1
    problem = unknown[0]
    expected = line_of(text, "pakages:")
    assert problem.line == expected
    assert "'pakages'" in problem.rule
    assert "did you mean 'packages'?" in problem.hint
    assert "allowed keys: scenario, description, seed, site, cmg, client, packages" in problem.hint
    assert f"{path}:{expected}" in str(error)
    # The required key is now missing too, reported at the document's line.
    missing = [p for p in problems if "missing" in p.rule]
    assert [(p.line, "'packages'" in p.rule) for p in missing] == [(1, True)]
    assert len(problems) == 2


def test_misspelled_task_sequence_key(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("  download: on_demand", "  dowload: on_demand"))
    problem, error, path = only_problem(tmp_path, text)
    expected = line_of(text, "dowload:")
    assert problem.line == expected
    assert "'dowload'" in problem.rule
    assert "task_sequence" in problem.rule
    assert "did you mean 'download'?" in problem.hint
    assert "allowed keys: " + ", ".join(SCENARIO.fields["task_sequence"].spec.fields) in problem.hint
    assert f"{path}:{expected}:" in str(error)


def test_misspelled_expect_key(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("outcome: success", "outcom: success"))
    problems, _, _ = problems_of(tmp_path, text)
    expected = line_of(text, "outcom:", after="expect:")
    unknown = [p for p in problems if "unknown key" in p.rule]
    assert len(unknown) == 1
    assert unknown[0].line == expected
    assert "did you mean 'outcome'?" in unknown[0].hint
    assert "allowed keys: outcome, exit_code, cache, downloaded, requests, log" in unknown[0].hint
    missing = [p for p in problems if "missing the required key 'outcome'" in p.rule]
    assert len(missing) == 1
    assert missing[0].line == expected  # the expect mapping starts at its first key


def test_unknown_key_without_near_match_lists_allowed_keys(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("  content_enabled: true", "  content_enabled: true\n  zzz: 1"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "zzz:")
    assert "did you mean" not in problem.hint
    assert problem.hint == (
        "allowed keys: content_enabled, site_version, egress_threshold_gb, stop_when_critical, "
        "prefer_cloud_sources, classic_cloud_dp, crl_check, crl_reachable, certificate_trust_list, "
        "measure_egress"
    )


# --------------------------------------------------------------------------------------------
# several problems at once
# --------------------------------------------------------------------------------------------


def test_all_problems_are_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("seed: 1910", "seed: -1"),
        ("size: 24MiB", "size: 12 parsecs"),
        ("      action: upgrade_os", "      action: upgrade_oss"),
    )
    problems, error, path = problems_of(tmp_path, text)
    assert len(problems) == 3, [str(p) for p in problems]
    assert [p.line for p in problems] == [
        line_of(text, "seed: -1"),
        line_of(text, "size: 12 parsecs"),
        line_of(text, "action: upgrade_oss"),
    ]
    assert str(error).startswith("3 problems in scenario file:")
    for p in problems:
        assert f"{path}:{p.line}: {p.rule}" in str(error)


def test_problems_found_late_but_early_in_the_file_sort_first(tmp_path: Path) -> None:
    # The missing 'scenario' key is found after every section was walked but belongs to line 1.
    first_line = EXAMPLE_TEXT.splitlines()[0] + "\n"
    text = mutate(
        EXAMPLE_TEXT,
        (first_line, ""),
        ("files: 12", "files: many"),
        ("allow_internet: true", "allow_internet: yes-please"),
    )
    problems, _, _ = problems_of(tmp_path, text)
    assert len(problems) == 3, [str(p) for p in problems]
    assert problems[0].line == 1
    assert "missing the required key 'scenario'" in problems[0].rule
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    assert problems[1].line == line_of(text, "files: many")
    assert problems[2].line == line_of(text, "allow_internet: yes-please")
    assert problems[0].hint == "The test name shown by pytest."


# --------------------------------------------------------------------------------------------
# type errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "needle", "fragments"),
    [
        ("seed: 1910", "seed: -1", "seed: -1", ["seed", "integer >= 0", "-1"]),
        ("seed: 1910", "seed: '7'", "seed: '7'", ["seed", "integer", "'7'"]),
        (
            "files: 12",
            "files: many",
            "files: many",
            ["packages[1].files", "integer >= 1", "'many'"],
        ),
        ("version: 3", "version: 0", "version: 0", ["packages[0].version", ">= 1"]),
        (
            "size: 24MiB",
            "size: 12 parsecs",
            "size: 12 parsecs",
            ["packages[0].size", "'12 parsecs'", "64MiB"],
        ),
        (
            "allow_internet: true",
            "allow_internet: yes-please",
            "allow_internet:",
            ["task_sequence.allow_internet", "true or false", "'yes-please'"],
        ),
        (
            "content_enabled: true",
            "content_enabled: 1",
            "content_enabled:",
            ["cmg.content_enabled", "true or false", "1"],
        ),
        (
            "      action: run_command_line",
            "      action: reboot",
            "action: reboot",
            ["task_sequence.steps[0].action", "'reboot'", "one of run_command_line, upgrade_os"],
        ),
        (
            "type: driver",
            "type: firmware",
            "type: firmware",
            ["packages[1].type", "one of package, os_upgrade, driver, application"],
        ),
        (
            "outcome: success",
            "outcome: maybe",
            "outcome: maybe",
            ["expect.outcome", "one of success, failure"],
        ),
        (
            "requests:\n    location: 2",
            "requests:\n    location: -2",
            "location: -2",
            ["expect.requests.location", ">= 0"],
        ),
    ],
)
def test_type_errors(tmp_path: Path, old: str, new: str, needle: str, fragments: list[str]) -> None:
    text = mutate(EXAMPLE_TEXT, (old, new))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, needle)
    for fragment in fragments:
        assert fragment in problem.rule


@pytest.mark.parametrize(
    ("old", "new", "needle", "where"),
    [
        (
            "scenario: in-place upgrade downloads each package on demand through a content-enabled CMG",
            'scenario: ""',
            "scenario:",
            "scenario",
        ),
        ("  name: Windows 11 in-place upgrade", '  name: ""', '  name: ""', "task_sequence.name"),
        (
            "    - name: Check readiness",
            "    - name: ''",
            "    - name: ''",
            "task_sequence.steps[0].name",
        ),
        (
            "task_sequence:",
            'faults: [{restart: {file: "", after_bytes: 1KiB}}]\ntask_sequence:',
            "faults:",
            "faults[0].restart.file",
        ),
        (
            "task_sequence:",
            "faults: [{storage: {file: '', respond: 503}}]\ntask_sequence:",
            "faults:",
            "faults[0].storage.file",
        ),
    ],
)
def test_empty_names_are_refused_at_their_line(
    tmp_path: Path, old: str, new: str, needle: str, where: str
) -> None:
    # An empty scenario name is an empty pytest item id; an empty step name cannot be named by
    # before_step; an empty `file` is part of every blob name, so it would hit every request
    # (the fault proxy refused it with a traceback before the language did).
    text = mutate(EXAMPLE_TEXT, (old, new))
    problems, _, _ = problems_of(tmp_path, text)
    empty = [p for p in problems if p.rule == f"{where} must not be empty"]
    assert empty, [str(p) for p in problems]
    assert empty[0].line == line_of(text, needle)
    assert empty[0].hint.startswith("e.g. ")


def test_choice_suggests_near_miss(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("      action: upgrade_os", "      action: upgrade_oss"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "action: upgrade_oss")
    assert problem.hint == "did you mean 'upgrade_os'?"
    assert "'upgrade_oss'" in problem.rule


def test_choice_without_near_miss_has_no_suggestion(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("      action: run_command_line", "      action: reboot"))
    problem, _, _ = only_problem(tmp_path, text)
    assert "did you mean" not in problem.hint


def test_package_id_pattern(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("  - id: PS100013", "  - id: XYZ"))
    problem, error, path = only_problem(tmp_path, text)
    expected = line_of(text, "- id: XYZ")
    assert problem.line == expected
    assert "packages[1].id 'XYZ' must match" in problem.rule
    assert problem.hint == "e.g. PS100012"
    assert f"{path}:{expected}: " in str(error)
    assert "(e.g. PS100012)" in str(error)


def test_lowercase_package_id_is_rejected(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("      package: PS100013", "      package: ps100013"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "package: ps100013")
    assert "task_sequence.steps[2].package" in problem.rule


def test_list_where_mapping_expected(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT, ("cmg:\n  content_enabled: true", "cmg:\n  - content_enabled: true")
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- content_enabled: true")
    assert problem.rule == (
        "cmg must be a mapping with keys content_enabled, site_version, egress_threshold_gb, "
        "stop_when_critical, prefer_cloud_sources, classic_cloud_dp, crl_check, crl_reachable, "
        "certificate_trust_list, measure_egress"
    )


def test_mapping_where_list_expected(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("downloaded: [PS100012, PS100013]", "downloaded: {PS100012: yes}"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "downloaded:")
    assert "expect.downloaded must be a list" in problem.rule


def test_list_where_scalar_expected(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("seed: 1910", "seed: [1, 2]"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "seed:")
    assert problem.rule == "seed must be an integer >= 0, not a list"


def test_scalar_where_document_mapping_expected(tmp_path: Path) -> None:
    problem, _, _ = only_problem(tmp_path, "just a sentence\n")
    assert problem.line == 1
    assert problem.rule.startswith("the document must be a mapping with keys scenario,")


def test_exit_code_pattern(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ('exit_code: "0x00000000"', 'exit_code: "0"'))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "exit_code:")
    assert problem.hint == "e.g. 0x80040102"


def test_empty_steps_list(tmp_path: Path) -> None:
    start = EXAMPLE_TEXT.index("  steps:\n")
    end = EXAMPLE_TEXT.index("\nexpect:")
    text = EXAMPLE_TEXT[:start] + "  steps: []\n" + EXAMPLE_TEXT[end:]
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "steps: []")
    assert problem.rule == "task_sequence.steps needs at least 1 item(s)"


# --------------------------------------------------------------------------------------------
# missing required keys and duplicate keys
# --------------------------------------------------------------------------------------------


def test_missing_expect(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT[: EXAMPLE_TEXT.index("expect:")]
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == 1
    assert problem.rule == "the document is missing the required key 'expect'"


def test_missing_packages(tmp_path: Path) -> None:
    start = EXAMPLE_TEXT.index("packages:")
    end = EXAMPLE_TEXT.index("task_sequence:")
    text = EXAMPLE_TEXT[:start] + EXAMPLE_TEXT[end:]
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == 1
    assert problem.rule == "the document is missing the required key 'packages'"


def test_missing_step_action_is_reported_at_the_step(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("      action: upgrade_os\n", ""))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- name: Upgrade the operating system")
    assert problem.rule == "task_sequence.steps[1] is missing the required key 'action'"


def test_missing_package_size_is_reported_at_the_package(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("    size: 2MiB\n", ""))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- id: PS100013")
    assert problem.rule == "packages[1] is missing the required key 'size'"
    assert problem.hint == "Total generated size, e.g. 8MiB."


def test_duplicate_top_level_key(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("seed: 1910", "seed: 1910\nseed: 2"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "seed: 2")
    assert problem.rule == "seed is given twice"


def test_duplicate_nested_key(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("    files: 4\n", "    files: 4\n    files: 5\n"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "files: 5")
    assert problem.rule == "packages[0].files is given twice"


# --------------------------------------------------------------------------------------------
# cross-checks
# --------------------------------------------------------------------------------------------


def test_step_references_undeclared_package(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("      package: PS100013", "      package: PS1000FF"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "package: PS1000FF")
    assert "PS1000FF" in problem.rule
    assert "not declared" in problem.rule
    assert problem.hint == "declared packages: PS100012, PS100013"


@pytest.mark.parametrize(
    ("step", "bad_line", "rule"),
    [
        (
            "      action: apply_driver_package\n      packages: [PS100013]",
            "packages: [PS100013]",
            "packages belongs to download_package_content steps",
        ),
        (
            "      action: download_package_content\n      package: PS100013\n"
            "      packages: [PS100012]",
            "packages: [PS100012]",
            "give package or packages, not both",
        ),
        (
            "      action: download_package_content\n      packages: [PS100013, PS1000FF]",
            "packages: [PS100013, PS1000FF]",
            "step references package PS1000FF, which is not declared",
        ),
        (
            "      action: download_package_content\n      packages: [PS100013, PS100013]",
            "packages: [PS100013, PS100013]",
            "package PS100013 is listed twice in the step",
        ),
    ],
    ids=["not-a-content-step", "both-keys", "undeclared", "twice"],
)
def test_a_steps_package_list_is_checked(
    tmp_path: Path, step: str, bad_line: str, rule: str
) -> None:
    text = mutate(
        EXAMPLE_TEXT, ("      action: apply_driver_package\n      package: PS100013", step)
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, bad_line)
    assert rule in problem.rule


def test_duplicate_package_ids(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("  - id: PS100013", "  - id: PS100012"),
        ("    version: 1\n", "    version: 3\n"),
        ("      package: PS100013", "      package: PS100012"),
        ("cache: [PS100012.3, PS100013.1]", "cache: [PS100012.3]"),
        ("downloaded: [PS100012, PS100013]", "downloaded: [PS100012]"),
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- id: PS100012", after="Windows 11 24H2 upgrade")
    assert problem.rule == "package PS100012 is declared twice"


def test_cache_names_undeclared_package(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT, ("cache: [PS100012.3, PS100013.1]", "cache: [PS100012.3, PS100077.1]")
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "cache:")
    assert "PS100077.1" in problem.rule
    assert "undeclared" in problem.rule
    assert problem.hint == "declared packages: PS100012, PS100013"


def test_cache_names_wrong_version(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("cache: [PS100012.3, PS100013.1]", "cache:\n    - PS100012.3\n    - PS100013.2"),
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- PS100013.2")
    assert problem.rule == (
        "cache entry PS100013.2 is not the declared version 1, nor an entry of client.cache"
    )
    assert problem.hint == "expect PS100013.1, or seed PS100013.2 with client.cache"


def test_downloaded_names_undeclared_package(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("downloaded: [PS100012, PS100013]", "downloaded:\n    - PS100012\n    - PS1000AA"),
    )
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "- PS1000AA")
    assert "PS1000AA" in problem.rule
    assert problem.hint == "declared packages: PS100012, PS100013"


def test_success_with_nonzero_exit_code(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ('exit_code: "0x00000000"', 'exit_code: "0x80040102"'))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "exit_code:")
    assert problem.rule == "a successful outcome has exit code 0x00000000"


def test_failure_with_nonzero_exit_code_is_fine(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("outcome: success", "outcome: failure"),
        ('exit_code: "0x00000000"', 'exit_code: "0x80040102"'),
    )
    scenario = load_scenario(write(tmp_path, text))
    assert scenario.expect.outcome == "failure"
    assert scenario.expect.exit_code == "0x80040102"


def test_more_files_than_bytes(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("size: 2MiB", "size: 11"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "files: 12")
    assert problem.rule == "12 files cannot share 11 bytes"
    assert problem.hint == "give each file at least one byte"


def test_as_many_files_as_bytes_is_fine(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("size: 2MiB", "size: 12"))
    assert load_scenario(write(tmp_path, text)).packages[1].size == 12


def test_several_cross_check_problems_at_once(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        ("size: 2MiB", "size: 3"),
        ("      package: PS100013", "      package: PS1000FF"),
        ('exit_code: "0x00000000"', 'exit_code: "0x00000001"'),
    )
    problems, _, _ = problems_of(tmp_path, text)
    assert [p.line for p in problems] == [
        line_of(text, "files: 12"),
        line_of(text, "package: PS1000FF"),
        line_of(text, "exit_code:"),
    ]


# --------------------------------------------------------------------------------------------
# YAML syntax and empty files
# --------------------------------------------------------------------------------------------


def test_invalid_yaml_syntax(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("    name: Contoso drivers", "    name: [Contoso drivers"))
    problem, error, path = only_problem(tmp_path, text)
    assert problem.rule.startswith("not valid YAML:")
    # The flow sequence is left open; the parser notices at the next line.
    opened = line_of(text, "name: [Contoso drivers")
    assert opened <= problem.line <= opened + 1
    assert f"{path}:{problem.line}: not valid YAML" in str(error)


def test_invalid_yaml_bad_indentation(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("    version: 3\n", "     version: 3\n"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.rule.startswith("not valid YAML:")
    assert problem.line == line_of(text, "     version: 3")


def test_tab_indentation_is_a_syntax_error(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, ("  code: PS1", "\tcode: PS1"))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == line_of(text, "\tcode: PS1")
    assert "not valid YAML" in problem.rule


def test_two_documents_are_rejected(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT + "---\nscenario: another\n"
    problem, _, _ = only_problem(tmp_path, text)
    assert "not valid YAML" in problem.rule
    assert problem.line == line_of(text, "---")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    problem, error, path = only_problem(tmp_path, text)
    assert problem.line == 1
    assert problem.rule == "the file is empty"
    assert str(error) == f"1 problem in scenario file:\n  {path}:1: the file is empty"


# --------------------------------------------------------------------------------------------
# null values and YAML's own typing (bugs: see the report)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (EXAMPLE_TEXT.splitlines()[0], "scenario:"),
        ("      action: upgrade_os", "      action:"),
        ("outcome: success", "outcome:"),
        ("  name: Windows 11 in-place upgrade", "  name: ~"),
        ("seed: 1910", "seed:"),
    ],
    ids=["scenario", "step-action", "outcome", "ts-name", "seed"],
)
def test_null_value_of_a_required_or_typed_key_is_a_problem(
    tmp_path: Path, old: str, new: str
) -> None:
    """An empty value is not a name, an action or an outcome; it must not load as None."""
    text = mutate(EXAMPLE_TEXT, (old, new))
    problem, _, _ = only_problem(tmp_path, text)
    assert problem.line == exact_line(text, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("size: 24MiB", "size:"),
        ("files: 4", "files:"),
        ("  - id: PS100013", "  - id:"),
    ],
    ids=["size", "files", "id"],
)
def test_null_value_is_a_scenario_error_not_a_crash(tmp_path: Path, old: str, new: str) -> None:
    text = mutate(EXAMPLE_TEXT, (old, new))
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    assert info.value.problems[0].line == exact_line(text, new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("seed: 1910", "seed: !!int abc"),
        ("    name: Contoso drivers", "    name: !custom drivers"),
        ("    name: Contoso drivers", "    name: 2024-13-45"),
    ],
    ids=["bad-int-tag", "unknown-tag", "impossible-date"],
)
def test_unconstructible_scalar_is_a_scenario_error_not_a_crash(
    tmp_path: Path, old: str, new: str
) -> None:
    text = mutate(EXAMPLE_TEXT, (old, new))
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    assert info.value.problems[0].line == line_of(text, new.strip())


@pytest.mark.parametrize(
    ("old", "new", "written"),
    [
        ('exit_code: "0x00000000"', "exit_code: 0x00000000", "0x00000000"),
        ("  name: Windows 11 in-place upgrade", "  name: 1.10", "1.10"),
        ("  name: Windows 11 in-place upgrade", "  name: yes", "yes"),
    ],
    ids=["unquoted-exit-code", "float-looking-name", "bool-looking-name"],
)
def test_string_values_keep_the_text_as_written(
    tmp_path: Path, old: str, new: str, written: str
) -> None:
    """A Str field either loads what the user wrote or, if rejected, quotes what the user wrote."""
    text = mutate(EXAMPLE_TEXT, (old, new))
    try:
        scenario = load_scenario(write(tmp_path, text))
    except ScenarioError as error:
        assert written in error.problems[0].rule, str(error)
    else:
        values = {scenario.expect.exit_code, scenario.task_sequence.name}
        assert written in values


# --------------------------------------------------------------------------------------------
# the spec types on their own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("64MiB", 64 * 1024**2),
        ("512KiB", 512 * 1024),
        ("1.5GiB", 1610612736),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("3KB", 3000),
        ("100B", 100),
        ("64 MiB", 64 * 1024**2),
        ("123", 123),
        ("'123'", 123),
        ("'0'", 0),
        ("0", 0),
        ("0.5KiB", 512),
    ],
)
def test_size_parses(yaml_text: str, expected: int) -> None:
    value, v = check(Size(), yaml_text)
    assert v.problems == []
    assert value == expected
    assert isinstance(value, int)
    assert not isinstance(value, bool)


@pytest.mark.parametrize(
    "yaml_text",
    ["-1", "'-5MiB'", "lots", "12 parsecs", "64 mib", "MiB", "1.5.2MiB", "true", "''", "64MiBs"],
)
def test_size_rejects(yaml_text: str) -> None:
    value, v = check(Size(), f"\n{yaml_text}")
    assert value is None
    assert len(v.problems) == 1
    assert v.problems[0].line == 2
    assert "is not a size such as 64MiB" in v.problems[0].rule


def test_size_rejects_a_list() -> None:
    value, v = check(Size(), "[1, 2]", where="packages[0].size")
    assert value is None
    assert v.problems[0].rule == (
        "packages[0].size must be a size such as 64MiB, 512KiB or a number of bytes, not a list"
    )


def test_int_rejects_bool_and_float() -> None:
    for text in ("true", "1.5"):
        value, v = check(Int(), text)
        assert value is None
        assert len(v.problems) == 1
        assert "must be an integer" in v.problems[0].rule


def test_int_minimum() -> None:
    assert check(Int(minimum=3), "3")[0] == 3
    value, v = check(Int(minimum=3), "2")
    assert value is None
    assert v.problems[0].rule == "x must be an integer >= 3, got 2"


def test_bool_accepts_yaml_booleans_only() -> None:
    assert check(Bool(), "false")[0] is False
    assert check(Bool(), "true")[0] is True
    value, v = check(Bool(), "'true'")
    assert value is None
    assert v.problems[0].rule == "x must be true or false, got 'true'"


def test_str_pattern_and_example() -> None:
    s = Str(pattern=r"[A-Z]{3}", example="ABC")
    assert check(s, "XYZ")[0] == "XYZ"
    value, v = check(s, "xyz")
    assert value is None
    assert v.problems[0].rule == "x 'xyz' must match [A-Z]{3}"
    assert v.problems[0].hint == "e.g. ABC"
    _, v = check(Str(pattern=r"[A-Z]{3}"), "xyz")
    assert v.problems[0].hint == ""


def test_choice_returns_the_choice() -> None:
    c = Choice(choices=("alpha", "beta"))
    assert check(c, "beta")[0] == "beta"
    value, v = check(c, "alpah")
    assert value is None
    assert v.problems[0].hint == "did you mean 'alpha'?"
    assert v.problems[0].rule == "x 'alpah' is not one of alpha, beta"


def test_list_of_checks_every_item_with_its_line() -> None:
    value, v = check(ListOf(item=Int(), min_items=1), "- 1\n- two\n- 3\n- four\n")
    assert value == [1, None, 3, None]
    assert [p.line for p in v.problems] == [2, 4]
    assert [p.rule.split(" ")[0] for p in v.problems] == ["x[1]", "x[3]"]
    assert v.lines["x[2]"] == 3


def test_list_of_min_items() -> None:
    value, v = check(ListOf(item=Int(), min_items=2), "[1]")
    assert value == [1]
    assert v.problems[0].rule == "x needs at least 2 item(s)"


def test_map_of_checks_keys_and_values() -> None:
    m = MapOf(key=Str(pattern=r"[a-z]+"), value=Int())
    value, v = check(m, "a: 1\nb: 2\n")
    assert value == {"a": 1, "b": 2}
    assert v.problems == []
    value, v = check(m, "a: 1\nB: 2\nc: x\n")
    assert value == {"a": 1, "c": None}
    assert [p.line for p in v.problems] == [2, 3]
    _, v = check(m, "[1]")
    assert "must be a mapping of a string matching [a-z]+ to an integer" in v.problems[0].rule


def test_record_defaults_and_required() -> None:
    r = Record(
        fields={
            "a": Field(Int(), required=True, doc="the a"),
            "b": Field(Str(), default="bee"),
        }
    )
    value, v = check(r, "a: 5\n")
    assert value == {"a": 5, "b": "bee"}
    assert v.problems == []
    _, v = check(r, "\n\nb: x\n")
    assert len(v.problems) == 1
    assert v.problems[0].line == 3
    assert v.problems[0].rule == "x is missing the required key 'a'"
    assert v.problems[0].hint == "the a"


def test_validation_line_falls_back_to_ancestors() -> None:
    v = Validation(Path("f.yaml"), lines={"": 1, "a": 3, "a.b[2]": 7, "a.b[2].c": 8})
    assert v.line("a.b[2].c") == 8
    assert v.line("a.b[2].d") == 7
    assert v.line("a.b[2].d.e[4]") == 7
    assert v.line("a.b[3]") == 3
    assert v.line("a.z") == 3


class _BoundedRe:
    """Stands in for ``re`` in the spec module; gives up when ``sub`` is called too often."""

    def __init__(self, limit: int = 1000) -> None:
        self.calls = 0
        self.limit = limit

    def __getattr__(self, name: str) -> object:
        return getattr(re, name)

    def sub(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.calls > self.limit:
            raise RuntimeError(f"Validation.line still walking up after {self.calls} steps")
        return re.sub(*args, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("where", ["seed", "client.cache_size"])
def test_validation_line_of_an_unvalidated_top_level_path_terminates(
    monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A path whose top-level key was never validated falls back to the document's line."""
    monkeypatch.setattr(spec_module, "re", _BoundedRe())
    v = Validation(Path("f.yaml"), lines={"": 1, "a": 3})
    assert v.line(where) == 1


def test_scenario_line_of_an_omitted_optional_section_terminates(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = mutate(EXAMPLE_TEXT, ("client:\n  allow_cloud_dp: true\n", ""))
    scenario = load_scenario(write(tmp_path, text))
    monkeypatch.setattr(spec_module, "re", _BoundedRe())
    assert scenario.line("client.cache_size") == 1


def test_scenario_spec_describes_its_keys() -> None:
    assert list(SCENARIO.fields) == [
        "scenario",
        "description",
        "seed",
        "site",
        "cmg",
        "client",
        "packages",
        "distribution_points",
        "task_sequence",
        "expect",
        "faults",
        "benchmark",
        "markers",
        "requires",
        "builtin_expect",
        "matrix",
        "cases",
        "include",
    ]
    required = {name for name, f in SCENARIO.fields.items() if f.required}
    assert required == {"scenario", "packages", "task_sequence", "expect"}


# --------------------------------------------------------------------------------------------
# generated content
# --------------------------------------------------------------------------------------------


def test_generate_package_is_deterministic() -> None:
    s = spec(kind="driver", files=7, size=50_000, locale="it_IT")
    first = generate_package(s, 42)
    second = generate_package(s, 42)
    assert [f.relpath for f in first] == [f.relpath for f in second]
    assert [f.data for f in first] == [f.data for f in second]
    assert first == second


def test_generate_package_depends_on_the_seed() -> None:
    s = spec(files=3, size=3000)
    a = generate_package(s, 1)
    b = generate_package(s, 2)
    assert [f.data for f in a] != [f.data for f in b]
    assert all(x.data != y.data for x, y in zip(a, b, strict=True))


def test_generate_package_depends_on_id_and_version() -> None:
    base = generate_package(spec("PS100099", version=1, files=2, size=2000), 5)
    other_version = generate_package(spec("PS100099", version=2, files=2, size=2000), 5)
    other_id = generate_package(spec("PS10009A", version=1, files=2, size=2000), 5)
    assert base[0].data != other_version[0].data
    assert base[0].data != other_id[0].data


@pytest.mark.parametrize("package_type", ["package", "os_upgrade", "driver", "application"])
@pytest.mark.parametrize(("files", "size"), [(1, 1), (1, 1000), (5, 5000), (12, 2 * 1024**2 + 7)])
def test_generate_package_count_and_total_size(package_type: str, files: int, size: int) -> None:
    generated = generate_package(spec(kind=package_type, files=files, size=size), 1910)
    assert len(generated) == files
    assert sum(len(f.data) for f in generated) == size
    assert all(isinstance(f.data, bytes) for f in generated)
    names = [f.relpath for f in generated]
    assert len(set(names)) == len(names)


def test_os_upgrade_main_file_is_install_wim() -> None:
    size = 24 * 1024 * 1024
    generated = generate_package(spec(kind="os_upgrade", files=4, size=size), 1910)
    assert generated[0].relpath == "sources/install.wim"
    assert [f.relpath for f in generated[1:3]] == ["setup.exe", "sources/setupprep.exe"]
    assert generated[3].relpath.startswith("sources/")
    assert generated[3].relpath.endswith(".dll")
    share = len(generated[0].data) / size
    assert 0.89 <= share <= 0.91
    assert all(len(f.data) < len(generated[0].data) for f in generated[1:])


def test_driver_package_file_names() -> None:
    generated = generate_package(spec(kind="driver", files=12, size=12_000), 3)
    suffixes = [f.relpath.rsplit(".", 1)[1] for f in generated]
    assert suffixes[:3] == ["sys", "inf", "cat"]
    assert set(suffixes) <= {"sys", "inf", "cat"}
    for f in generated:
        folder, _, file_name = f.relpath.partition("/")
        assert folder
        assert file_name.startswith(folder + ".")


def test_application_package_file_names() -> None:
    generated = generate_package(spec(kind="application", files=4, size=4000), 3)
    suffixes = [f.relpath.rsplit(".", 1)[1] for f in generated]
    assert suffixes == ["msi", "cab", "mst", "mst"]


@pytest.mark.parametrize("kind", ["package", "driver", "application", "os_upgrade"])
@pytest.mark.parametrize("seed", [1, 81, 1910])
def test_every_it_it_package_has_an_accented_name(kind: str, seed: int) -> None:
    generated = generate_package(spec(kind=kind, files=4, size=4000, locale="it_IT"), seed)
    accented = [f.relpath for f in generated if not f.relpath.isascii()]
    assert accented, [f.relpath for f in generated]
    assert all(any(not c.isascii() and c.isalpha() for c in name) for name in accented)


def test_ja_jp_locale_yields_non_ascii_names() -> None:
    generated = generate_package(spec(kind="driver", files=12, size=12_000, locale="ja_JP"), 1910)
    assert any(not f.relpath.isascii() for f in generated)
    en = generate_package(spec(kind="driver", files=12, size=12_000, locale="en_US"), 1910)
    assert all(f.relpath.isascii() for f in en)


def test_example_scenario_content(example: Scenario) -> None:
    upgrade, drivers = (generate_package(p, example.seed) for p in example.packages)
    assert upgrade[0].relpath == "sources/install.wim"
    assert sum(len(f.data) for f in upgrade) == 25165824
    assert len(drivers) == 12
    assert sum(len(f.data) for f in drivers) == 2 * 1024 * 1024
    assert any(not f.relpath.isascii() for f in drivers)


def test_adding_a_package_does_not_change_the_others(tmp_path: Path) -> None:
    extra = (
        "  - id: PS100014\n"
        "    name: Extra tools\n"
        "    type: application\n"
        "    files: 3\n"
        "    size: 64KiB\n"
    )
    before = load_scenario(write(tmp_path, EXAMPLE_TEXT, "before.cmg.yaml"))
    # Put the new package first, so every existing package changes its index too.
    text = mutate(EXAMPLE_TEXT, ("packages:\n", "packages:\n" + extra))
    after = load_scenario(write(tmp_path, text, "after.cmg.yaml"))
    assert [p.id for p in after.packages] == ["PS100014", "PS100012", "PS100013"]
    for package in before.packages:
        same = next(p for p in after.packages if p.id == package.id)
        assert same == package
        assert generate_package(package, before.seed) == generate_package(same, after.seed)


def test_content_seed_mixes_scenario_seed_with_package_identity(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    original = content.Faker.seed_instance

    def record(self: object, seed: int) -> None:
        seen.append(seed)
        original(self, seed)

    monkeypatch.setattr(content.Faker, "seed_instance", record)
    generate_package(spec("PS100012", version=3, files=1, size=10), 1910)
    assert seen == [1910 ^ zlib.crc32(b"PS100012.3")]


@pytest.mark.parametrize(("files", "size"), [(4, 10), (12, 20)])
def test_os_upgrade_gives_every_file_at_least_one_byte(files: int, size: int) -> None:
    """The model accepts files <= size ("give each file at least one byte"); so must content."""
    generated = generate_package(spec(kind="os_upgrade", files=files, size=size), 1)
    assert sum(len(f.data) for f in generated) == size
    assert min(len(f.data) for f in generated) >= 1, [(f.relpath, len(f.data)) for f in generated]


def test_many_files_in_a_small_vocabulary_terminate(monkeypatch: pytest.MonkeyPatch) -> None:
    """ja_JP has a few hundred words; 300 driver files must not loop forever looking for names."""
    files = 300
    calls = 0
    original = content._name

    def bounded(fake: object, pattern: str, word: str | None = None) -> str:
        nonlocal calls
        calls += 1
        if calls > 50 * files:
            raise RuntimeError(f"still looking for unique names after {calls} attempts")
        return original(fake, pattern, word)  # type: ignore[arg-type]

    monkeypatch.setattr(content, "_name", bounded)
    generated = generate_package(
        spec(kind="driver", files=files, size=files * 10, locale="ja_JP"), 1
    )
    assert len({f.relpath for f in generated}) == files
