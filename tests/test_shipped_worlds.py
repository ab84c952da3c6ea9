"""Where ``include:`` and ``ref:`` names are looked up: the user's fixtures folder, then the
worlds and catalogs shipped in the package; the first that has the file wins."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pytest_cmg._errors import ScenarioError
from pytest_cmg._scenario.assemble import SHIPPED
from pytest_cmg._scenario.load import load_scenario

if TYPE_CHECKING:
    from pathlib import Path

USER = """\
scenario: a user's scenario on the small in-place upgrade world
include: [worlds/small-ipu-world]
expect:
  outcome: success
"""


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


def test_shipped_worlds_and_catalogs_resolve_without_any_fixtures_folder(tmp_path: Path) -> None:
    scenario = load_scenario(write(tmp_path, "s.cmg.yaml", USER))
    assert [p.id for p in scenario.packages] == ["PS100012", "PS100013"]
    world = (SHIPPED / "worlds/ipu-world.yaml").resolve()
    assert scenario.location("cmg.site_version") == (world, line_of(world, "site_version"))
    catalog = (SHIPPED / "catalog/drivers-contoso-ja.yaml").resolve()
    assert scenario.location("packages[1].locale") == (catalog, line_of(catalog, "locale"))


def test_a_users_file_shadows_the_shipped_one_also_where_a_shipped_world_refs_it(
    tmp_path: Path,
) -> None:
    mine = tmp_path / "mine"
    write(
        mine,
        "catalog/os-upgrade-win11.yaml",
        "id: PS100012\ntype: os_upgrade\nversion: 7\nfiles: 2\nsize: 64KiB\n",
    )
    path = write(tmp_path, "scenarios/s.cmg.yaml", USER)
    scenario = load_scenario(path, fixtures=mine)
    upgrade = scenario.packages[0]
    # The user's catalog entry, with the shipped small world's size on top of it.
    assert (upgrade.version, upgrade.files, upgrade.size) == (7, 2, 1024**2)
    # Without the user's folder the shipped catalog entry is used.
    assert load_scenario(path).packages[0].version == 3


def test_the_nearest_fixtures_folder_comes_before_the_shipped_one(tmp_path: Path) -> None:
    write(
        tmp_path, "fixtures/worlds/small-ipu-world.yaml", "include: [worlds/ipu-world]\nseed: 77\n"
    )
    scenario = load_scenario(write(tmp_path, "scenarios/s.cmg.yaml", USER))
    assert scenario.seed == 77
    # ... and its own non-relative include went on to the shipped world.
    assert [p.size for p in scenario.packages] == [24 * 1024**2, 2 * 1024**2]


def test_a_configured_folder_that_does_not_exist_is_named_in_the_error(tmp_path: Path) -> None:
    path = write(tmp_path, "s.cmg.yaml", USER.replace("small-ipu-world", "small-ipu-wrld"))
    try:
        load_scenario(path, fixtures=tmp_path / "nowhere")
    except ScenarioError as exc:
        problems = [p for p in exc.problems if "small-ipu-wrld" in p.rule]
    else:
        raise AssertionError("an unknown include must be a scenario error")
    assert len(problems) == 1
    problem = problems[0]
    assert (problem.path, problem.line) == (path, 2)
    assert "(--cmg-fixtures or ini cmg_fixtures, no such folder)" in problem.rule
    assert (
        f"; the shipped folder {SHIPPED}" in problem.rule
        or "; the shipped folder pytest_cmg/shipped" in problem.rule
    )
    assert problem.hint.startswith("did you mean 'worlds/small-ipu-world'? ")


def test_the_repository_keeps_one_copy_of_each_shipped_file() -> None:
    """fixtures/ holds only this repository's own data: a copy of a shipped file there would
    silently shadow the shipped one for the suite, and the two would drift apart."""
    root = SHIPPED.parent.parent / "fixtures"
    own = {p.relative_to(root).as_posix() for p in root.rglob("*.y*ml")}
    shipped = {p.relative_to(SHIPPED).as_posix() for p in SHIPPED.rglob("*.y*ml")}
    assert shipped, "the shipped worlds are missing from pytest_cmg/shipped"
    assert not own & shipped, f"in both fixtures/ and pytest_cmg/shipped/: {sorted(own & shipped)}"


#: Two user folders: both have worlds/site (only the first's is valid), the second has extra.
TWO_FOLDERS = {
    "one/worlds/site.yaml": "cmg:\n  site_version: 1910\n",
    "two/worlds/site.yaml": "cmg:\n  site_version: 1911\n",
    "two/worlds/extra.yaml": "seed: 5\n",
}
BOTH = USER.replace(
    "[worlds/small-ipu-world]", "[worlds/small-ipu-world, worlds/site, worlds/extra]"
)


def two_folders(pytester: pytest.Pytester, scenario: str = BOTH) -> None:
    for relative, text in TWO_FOLDERS.items():
        write(pytester.path, relative, text)
    write(pytester.path, "scenarios/s.cmg.yaml", scenario)


def test_several_fixtures_folders_are_searched_in_the_order_given(
    pytester: pytest.Pytester,
) -> None:
    two_folders(pytester)
    first = pytester.runpytest("--collect-only", "-q", "--cmg-fixtures=one", "--cmg-fixtures=two")
    # worlds/extra is only in the second folder; worlds/site is taken from the first.
    assert first.ret == pytest.ExitCode.OK, first.stdout.str()
    first.stdout.fnmatch_lines(["scenarios/s.cmg.yaml::*"])
    # The other order takes the second folder's (invalid) site world: the order decides.
    second = pytester.runpytest("--collect-only", "-q", "--cmg-fixtures=two", "--cmg-fixtures=one")
    assert second.ret == pytest.ExitCode.INTERRUPTED
    second.stdout.fnmatch_lines(["*two/worlds/site.yaml:2: cmg.site_version 1911 is not one of*"])


def test_the_ini_takes_one_fixtures_folder_a_line(pytester: pytest.Pytester) -> None:
    two_folders(pytester)
    pytester.makeini("[pytest]\ncmg_fixtures =\n    one\n    two\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.OK, result.stdout.str()
    # The command line replaces the ini's folders, as an option overrides its ini value.
    only_two = pytester.runpytest("--collect-only", "-q", "--cmg-fixtures=two")
    assert only_two.ret == pytest.ExitCode.INTERRUPTED


def test_a_missing_fixtures_folder_is_a_usage_error_naming_it(pytester: pytest.Pytester) -> None:
    two_folders(pytester)
    result = pytester.runpytest(
        "--collect-only", "-q", "--cmg-fixtures=one", "--cmg-fixtures=nowhere"
    )
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [f"*--cmg-fixtures nowhere: no folder {pytester.path / 'nowhere'}*"]
    )
    pytester.makeini("[pytest]\ncmg_fixtures =\n    one\n    gone\n")
    result = pytester.runpytest("--collect-only", "-q")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*ini cmg_fixtures gone: no folder {pytester.path / 'gone'}*"])


def test_not_found_lists_every_folder_searched(tmp_path: Path) -> None:
    for relative, text in TWO_FOLDERS.items():
        write(tmp_path, relative, text)
    path = write(tmp_path, "s.cmg.yaml", USER.replace("small-ipu-world", "absent"))
    with pytest.raises(ScenarioError) as caught:
        load_scenario(path, fixtures=[tmp_path / "one", tmp_path / "two"])
    (problem,) = [p for p in caught.value.problems if "absent" in p.rule]
    searched = problem.rule.split(" in ", 1)[1]
    assert searched.index("one") < searched.index("two") < searched.index("the shipped folder")
    assert searched.count("(--cmg-fixtures or ini cmg_fixtures)") == 2
