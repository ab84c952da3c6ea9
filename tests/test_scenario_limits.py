"""The scenario loader's input limits (issue 10, items 11 to 13 and the input part of item 5).

Whatever a scenario file holds (bytes that are not UTF-8, a 50 MB file, a misplaced value of
megabytes, a 10 TiB package, anchors that expand to millions of values), ``load_scenario`` and
``load_scenarios`` give a valid scenario or a :class:`ScenarioError` whose problems name the file,
the line and the rule in a few hundred characters: never another exception, never the whole
value. Includes and catalog refs get the same checks, at their own file and line. Collection
(``pytest --collect-only``) and ``serve`` show those problems, not a traceback.

Content generation makes files of 256 MiB and more in pieces (``randbytes`` cannot make them in
one call), large packages on disk in a temporary folder removed after use, and the very bytes
2dfdc7b generated for everything below that.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
import tracemalloc
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_cmg._errors import ScenarioError, ScenarioProblem
from pytest_cmg._scenario.load import load_scenario, load_scenarios
from pytest_cmg._scenario.model import PackageSpec, Scenario

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "scenarios/ipu/on-demand-token-software-center.cmg.yaml"
EXAMPLE_TEXT = EXAMPLE.read_text(encoding="utf-8")
MiB = 1024**2
GiB = 1024**3

# The documented limits (docs/scenarios.md, "Limits"); test_the_documented_limits_are_the_code's
# checks they are the code's. Spelled out here so each test fails on its own on a loader
# without limits.
MAX_SCENARIO_FILE_BYTES = MiB
MAX_VALUES = 10_000
RANDOM_PIECE_BYTES = 64 * MiB
#: What a problem may take: its rule and its hint are each cut at 400 characters (the hint of a
#: problem in an included file also says where it was included from).
RULE_CHARS = 400
HINT_CHARS = 2 * RULE_CHARS + 2


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def line_of(text: str, needle: str) -> int:
    """1-based number of the first line containing ``needle``."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def mutate(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def problems(path: Path, **kwargs: Any) -> list[ScenarioProblem]:
    with pytest.raises(ScenarioError) as info:
        load_scenarios(path, **kwargs)
    return info.value.problems


def only_problem(path: Path, **kwargs: Any) -> ScenarioProblem:
    found = problems(path, **kwargs)
    assert len(found) == 1, "\n".join(map(str, found))
    return found[0]


def assert_short(problem: ScenarioProblem) -> None:
    """The problem names its file and line and fits in a few lines."""
    assert str(problem).startswith(f"{problem.path}:{problem.line}: ")
    assert problem.line >= 1
    assert len(problem.rule) <= RULE_CHARS, problem.rule
    assert len(problem.hint) <= HINT_CHARS, problem.hint


def package(size: int, files: int = 1, kind: str = "package", pid: str = "PS100012") -> PackageSpec:
    return PackageSpec(pid, 1, "", kind, True, files, size, "en_US")


def test_the_documented_limits_are_the_codes() -> None:
    from pytest_cmg._scenario import limits

    assert limits.MAX_SCENARIO_FILE_BYTES == MAX_SCENARIO_FILE_BYTES
    assert limits.MAX_VALUES == MAX_VALUES
    assert limits.MAX_NESTING == 32
    assert limits.MESSAGE_CHARS == RULE_CHARS
    assert limits.SHOWN_CHARS == 80
    assert (limits.MAX_FILE_BYTES, limits.MAX_PACKAGE_BYTES) == (4 * GiB, 8 * GiB)
    assert (limits.MAX_SCENARIO_BYTES, limits.MAX_PACKAGE_FILES) == (8 * GiB, 10_000)
    assert limits.MAX_CASE_VALUES == 200_000
    assert (limits.RANDOM_PIECE_BYTES, limits.IN_MEMORY_PACKAGE_BYTES) == (64 * MiB, 256 * MiB)


# --------------------------------------------------------------------------------------------
# item 11: encoding
# --------------------------------------------------------------------------------------------


def test_a_byte_that_is_not_utf8_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, "seed: 1910", "seed: 1910  # caf\u00e9 \u00e9")
    path = tmp_path / "latin1.cmg.yaml"
    path.write_bytes(text.encode("latin-1", errors="replace"))
    problem = only_problem(path)
    assert problem.path == path
    assert problem.line == line_of(text, "seed: 1910")
    column = text.splitlines()[problem.line - 1].index("\u00e9") + 1
    assert f"byte 0xe9 at column {column} is not UTF-8" in problem.rule
    assert problem.rule.endswith("scenario files are UTF-8")
    assert "save the file as UTF-8" in problem.hint
    assert_short(problem)


def test_the_column_of_a_bad_byte_counts_characters_not_bytes(tmp_path: Path) -> None:
    # Two good two-byte characters before the bad byte: column 5, not 7.
    path = tmp_path / "s.cmg.yaml"
    path.write_bytes(b"scenario: x\n# \xc3\xa9\xc3\xa9\xff\n")
    problem = only_problem(path)
    assert problem.line == 2
    assert "byte 0xff at column 5 is not UTF-8" in problem.rule


def test_a_control_character_is_reported_at_its_line_and_column(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, "seed: 1910", "seed: 1910 # a\x00b")
    path = tmp_path / "nul.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "seed: 1910")
    assert f"U+0000 at column {len('seed: 1910 # a') + 1} is not allowed in YAML" in problem.rule
    assert_short(problem)


def world_and_scenario(tmp_path: Path, world: bytes, *, ref: bool = False) -> tuple[Path, Path]:
    """A scenario in ``tmp_path/scenarios`` that includes (or refs) ``world`` from fixtures."""
    (tmp_path / "fixtures/worlds").mkdir(parents=True)
    (tmp_path / "scenarios").mkdir()
    target = tmp_path / "fixtures/worlds/w.yaml"
    target.write_bytes(world)
    if ref:
        text = mutate(
            EXAMPLE_TEXT,
            "  - id: PS100013\n",
            "  - ref: worlds/w\n  - id: PS100013\n",
        )
    else:
        text = "include: [worlds/w]\n" + EXAMPLE_TEXT
    scenario = tmp_path / "scenarios/s.cmg.yaml"
    scenario.write_text(text, encoding="utf-8")
    return target, scenario


@pytest.mark.parametrize("ref", [False, True], ids=["include", "ref"])
def test_an_included_file_that_is_not_utf8_is_reported_at_its_own_line(
    tmp_path: Path, ref: bool
) -> None:
    body = b"id: PS100099\n" if ref else b"seed: 3\n"
    world, scenario = world_and_scenario(tmp_path, body + b"# na\xefve\n", ref=ref)
    problem = only_problem(scenario)
    assert (problem.path, problem.line) == (world, 2)
    assert "byte 0xef at column 5 is not UTF-8" in problem.rule
    assert "scenario files are UTF-8" in problem.rule
    assert ("referenced from" if ref else "included from") in problem.hint
    assert "cannot read" not in problem.rule  # the old, line-less report


# --------------------------------------------------------------------------------------------
# item 12: sizes and counts
# --------------------------------------------------------------------------------------------


def size_problem(
    tmp_path: Path, size: str, *, files: str = "files: 4"
) -> tuple[ScenarioProblem, str]:
    text = mutate(EXAMPLE_TEXT, "    files: 4\n    size: 24MiB", f"    {files}\n    size: {size}")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    return only_problem(path), text


def test_a_package_of_10_tib_as_an_integer_is_refused_at_its_line(tmp_path: Path) -> None:
    problem, text = size_problem(tmp_path, str(10 * 1024**4))
    assert problem.line == line_of(text, f"size: {10 * 1024**4}")
    assert problem.rule == (
        "packages[0].size 10995116277760 is 10240GiB, more than the 8GiB allowed"
    )
    assert "Azurite keeps uploaded content in memory" in problem.hint


def test_a_size_in_an_unknown_unit_names_the_units(tmp_path: Path) -> None:
    problem, text = size_problem(tmp_path, "10TiB")
    assert problem.line == line_of(text, "size: 10TiB")
    assert "packages[0].size '10TiB' is not a size" in problem.rule
    assert problem.hint == "units: B, KiB, MiB, GiB (1024) or KB, MB, GB (1000)"


def test_a_size_of_400_digits_is_refused_not_an_overflow(tmp_path: Path) -> None:
    problem, _ = size_problem(tmp_path, "9" * 400 + "GiB")
    assert "more than the 8GiB allowed" in problem.rule
    assert "(403 characters)" in problem.rule
    assert_short(problem)


def test_a_generated_file_above_4_gib_is_refused_with_the_fix(tmp_path: Path) -> None:
    # The example's PS100012 is an os_upgrade package: install.wim takes 90 % of 5 GiB.
    problem, text = size_problem(tmp_path, "5GiB")
    assert problem.line == line_of(text, "size: 5GiB")
    assert problem.rule == (
        "package PS100012: its largest file would be 4.5GiB (its install.wim takes 90% of it), "
        "more than the 4GiB a generated file may have"
    )
    assert problem.hint == "an os_upgrade package may be at most 4.444GiB"
    text = mutate(EXAMPLE_TEXT, "type: os_upgrade", "type: package")
    text = mutate(text, "    files: 4\n    size: 24MiB", "    files: 1\n    size: 6GiB")
    (tmp_path / "p.cmg.yaml").write_text(text, encoding="utf-8")
    problem = only_problem(tmp_path / "p.cmg.yaml")
    assert "1 file(s) share it evenly" in problem.rule
    assert problem.hint == "give it at least 2 files, or a smaller size"


def test_too_many_files_in_a_package_are_refused(tmp_path: Path) -> None:
    problem, text = size_problem(tmp_path, "24MiB", files="files: 20000")
    assert problem.line == line_of(text, "files: 20000")
    assert problem.rule == "package PS100012: 20000 files, more than the 10,000 a package may have"


def test_the_packages_of_a_scenario_total_at_most_8_gib(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, "    files: 4\n    size: 24MiB", "    files: 2\n    size: 4GiB")
    text = mutate(text, "    size: 2MiB", "    size: 4097MiB")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "- id: PS100012")  # where the list starts
    assert problem.rule == (
        "the packages total 8.001GiB, more than the 8GiB a scenario may generate"
    )


def test_sizes_in_an_included_world_are_checked_at_the_worlds_line(tmp_path: Path) -> None:
    world = b"packages:\n  - id: PS100012\n    size: 10995116277760\n"
    target, scenario = world_and_scenario(tmp_path, world)
    found = problems(scenario)
    assert {(p.path, p.line) for p in found} == {(target, 3)}
    assert all("more than the 8GiB allowed" in p.rule for p in found)
    assert all("included from" in p.hint for p in found)


def test_a_duration_of_a_billion_days_is_refused(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT + "faults:\n  - clock: 1000000000d\n"
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "clock: 1000000000d")
    assert "is longer than 36500d (100 years)" in problem.rule


def test_a_number_too_large_for_a_float_is_refused_not_an_overflow(tmp_path: Path) -> None:
    text = mutate(
        EXAMPLE_TEXT,
        "  content_enabled: true\n",
        "  content_enabled: true\n  egress_threshold_gb: 1" + "0" * 400 + "\n",
    )
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.rule == (
        "cmg.egress_threshold_gb must be a number >= 0, got a number of about 401 digits"
    )


def test_a_key_yaml_cannot_construct_is_an_unknown_key(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT + "!!int abc: 1\n2001-02-30: 2\n"
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    found = problems(path)
    assert [(p.line, p.rule) for p in found] == [
        (line_of(text, "!!int abc"), "unknown key 'abc' in the document"),
        (line_of(text, "2001-02-30"), "unknown key '2001-02-30' in the document"),
    ]


# --------------------------------------------------------------------------------------------
# item 13: file size, value size, values, nesting
# --------------------------------------------------------------------------------------------


def test_a_50_mb_file_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    text = mutate(EXAMPLE_TEXT, "size: 24MiB", "size: " + "x" * 49_000_000)
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    size = path.stat().st_size
    tracemalloc.start()
    try:
        problem = only_problem(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (problem.path, problem.line) == (path, 1)
    mib = f"{size / MiB:.3f}".rstrip("0").rstrip(".")
    assert problem.rule == (
        f"the file is {mib}MiB ({size:,} bytes); a scenario file may have at most 1MiB"
    )
    # Nothing of the file was read: 2dfdc7b read and composed it all (14 s and 266 MB of RSS
    # here) to echo the 49 MB value whole.
    assert peak < 2 * MiB, peak


def test_a_misplaced_value_of_a_megabyte_is_cut_in_the_message(tmp_path: Path) -> None:
    value = "x" * (MAX_SCENARIO_FILE_BYTES - 4096)
    text = mutate(EXAMPLE_TEXT, "size: 24MiB", f"size: {value}")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "size: xxx")
    assert problem.rule.startswith(
        f"packages[0].size '{'x' * 75}'... ({len(value):,} characters) is not a size"
    )
    assert "x" * 76 not in str(problem)
    assert_short(problem)


def test_long_keys_and_paths_are_cut_in_the_message(tmp_path: Path) -> None:
    key = "K" * 1000  # YAML's longest plain key
    text = mutate(EXAMPLE_TEXT, "  name: Windows 11 in-place upgrade\n", f"  name: x\n  {key}: 1\n")
    text = mutate(text, "  content_enabled: true\n", f"  content_enabled: true\n  {key}: 2\n")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    found = problems(path)
    assert len(found) == 2
    for problem in found:
        assert "K" * 81 not in str(problem)
        assert_short(problem)


def test_a_world_larger_than_the_limit_is_refused_at_the_world(tmp_path: Path) -> None:
    world, scenario = world_and_scenario(tmp_path, b"seed: 3\n#" + b"x" * (2 * MiB) + b"\n")
    problem = only_problem(scenario)
    assert (problem.path, problem.line) == (world, 1)
    assert "a scenario file may have at most 1MiB" in problem.rule
    assert "included from" in problem.hint


def test_anchors_cannot_expand_into_millions_of_values(tmp_path: Path) -> None:
    # Nine lines that name 10^7 values through aliases (the "billion laughs").
    bomb = "x0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7)
    )
    text = EXAMPLE_TEXT + bomb
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "x3: &a3")  # 10 + 100 + 1,000 + 10,000 values
    assert problem.rule.startswith("the scenario holds more than 10,000 YAML values here")


def test_values_are_counted_over_the_file_and_what_it_includes(tmp_path: Path) -> None:
    # 5,701 values: the world is within the limit alone, not when it is included twice.
    world = b"faults:\n" + b"".join(b"  - {clock: 1s}\n" for _ in range(1900))
    target, scenario = world_and_scenario(tmp_path, world)
    text = scenario.read_text(encoding="utf-8")
    assert load_scenario(scenario).timeline
    scenario.write_text(mutate(text, "include: [worlds/w]", "include: [worlds/w, worlds/w]"))
    problem = only_problem(scenario)
    # Where the budget ran out: in the second copy, past the scenario's and the first one's.
    assert problem.path == target
    assert 2 + (MAX_VALUES - 5701 - len(EXAMPLE_TEXT) // 10) // 3 < problem.line < 1900
    assert "more than 10,000 YAML values" in problem.rule


def test_nesting_deeper_than_32_levels_is_refused(tmp_path: Path) -> None:
    text = EXAMPLE_TEXT + "x: " + "[" * 500 + "]" * 500 + "\n"
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "x: [[[")
    assert problem.rule == "lists and mappings nest deeper than 32 levels"


def test_many_cases_of_a_long_file_are_refused_before_they_are_built(tmp_path: Path) -> None:
    log = "".join(f'    - "line {i}"\n' for i in range(900))
    matrix = "matrix:\n  seed: [" + ", ".join(map(str, range(256))) + "]\n"
    text = mutate(EXAMPLE_TEXT, "expect:\n", f"{matrix}expect:\n  absent_log:\n{log}")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    problem = only_problem(path)
    assert problem.line == line_of(text, "  seed: [0, 1, ")  # the matrix's first line
    assert problem.rule.startswith("this file makes 256 items of ")
    assert problem.rule.endswith("all items together may hold at most 200,000")


# --------------------------------------------------------------------------------------------
# properties: any input gives a scenario or a ScenarioError of short, located problems
# --------------------------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=150,
    deadline=timedelta(seconds=3),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_BREAKS = ("\r\n", "\r", "\n", "\x85", "\u2028", "\u2029")


def check_any_outcome(path: Path, data: bytes) -> None:
    """Loading ``data`` gives scenarios or a ScenarioError whose problems are located and short."""
    path.write_bytes(data)
    try:
        scenarios = load_scenarios(path)
    except ScenarioError as error:
        assert error.problems
        try:
            text = data.decode("utf-8")
            lines = sum(text.count(b) for b in _BREAKS) + 2
        except UnicodeDecodeError:
            lines = data.count(b"\n") + 1
        for problem in error.problems:
            assert problem.path == path
            assert 1 <= problem.line <= lines, (problem, lines)
            assert_short(problem)
        return
    assert scenarios
    assert all(isinstance(s, Scenario) for s in scenarios)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("limits") / "p.cmg.yaml"


@PROPERTY
@given(st.binary(max_size=4096))
@example(b"scenario: caf\xe9\n")
@example(b"\xff\xfe" + "scenario: x".encode("utf-16-le"))
@example(b"a: !!int abc\n!!float x: 1\n")
def test_arbitrary_bytes_give_a_scenario_error(scratch: Path, data: bytes) -> None:
    check_any_outcome(scratch, data)


_SNIPPETS = (
    ": ",
    "- ",
    "[",
    "]",
    "{",
    "}",
    "&a ",
    "*a",
    "!!int ",
    "!!binary ",
    "!custom ",
    "? ",
    "|\n",
    ">\n",
    "'",
    '"',
    "#",
    "%YAML 1.1\n",
    "---\n",
    "...\n",
    "\t",
    "\n",
    "  ",
    "\x00",
    "\x1b",
    "\ufeff",
    "\u2028",
    "\xe9",
    "1e400",
    "9" * 40,
    "0x" + "f" * 30,
    "2001-02-30",
    "~",
    "null",
    "yes",
    ".inf",
    "-.nan",
    "10TiB",
    "8GiB",
    "99999999999d",
    "<<: *a\n",
    "\\x",
)


@st.composite
def mutated_example(draw: st.DrawFn) -> bytes:
    text = EXAMPLE_TEXT
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        insert = draw(
            st.one_of(
                st.sampled_from(_SNIPPETS),
                st.text(alphabet=st.characters(codec="utf-8"), max_size=12),
            )
        )
        text = text[:at] + insert + text[at + cut :]
    return text.encode("utf-8", errors="surrogatepass")


@PROPERTY
@given(mutated_example())
def test_a_mutated_scenario_gives_a_scenario_or_a_scenario_error(
    scratch: Path, data: bytes
) -> None:
    check_any_outcome(scratch, data)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(("64MiB", "10TiB", "0", "-1", "90s", "-60s", "1h30m", "PS100012", "x" * 200)),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
#: Documents whose values are replaced: the example, and files that use what it does not
#: (includes, catalog refs, a timeline of every kind, cases that set packages, restarts).
#: The example alone missed an empty ``ref:`` and an empty ``service:``, which reached the
#: loader and raised KeyError and StopIteration.
_RICH = [
    EXAMPLE,
    *(
        ROOT / "scenarios" / name
        for name in (
            "ipu/power-cut-mid-download-resumes-from-the-journal.cmg.yaml",
            "ipu/boot-media-restarts-into-the-new-os.cmg.yaml",
            "faults/cmg-stopped-before-the-drivers.cmg.yaml",
            "faults/a-reset-a-busy-cmg-and-an-expired-token.cmg.yaml",
            "auth/site-token-renewed-monthly-across-restarts.cmg.yaml",
        )
    ),
]
_TEXTS = [path.read_text(encoding="utf-8") for path in _RICH]


def _keys(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path (mapping keys, list indexes) into the example's tree."""
    out = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            out += _keys(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            out += _keys(value, (*prefix, index))
    return out


_PATHS = [_keys(yaml.safe_load(text))[1:] for text in _TEXTS]


@st.composite
def example_with_values(draw: st.DrawFn) -> bytes:
    """One of the rich documents with a few of its values (any depth) replaced by arbitrary
    YAML values, empty ones among them."""
    which = draw(st.integers(0, len(_TEXTS) - 1))
    document = yaml.safe_load(_TEXTS[which])
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(_PATHS[which]))
        node = document
        for step in path[:-1]:
            if not isinstance(node, dict | list):
                break
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                break
        else:
            last = path[-1]
            if isinstance(node, dict) or (
                isinstance(node, list) and isinstance(last, int) and last < len(node)
            ):
                node[last] = draw(_VALUES)
    return yaml.safe_dump(document, allow_unicode=True, sort_keys=False).encode("utf-8")


@PROPERTY
@given(example_with_values())
def test_any_value_anywhere_gives_a_scenario_or_a_scenario_error(
    scratch: Path, data: bytes
) -> None:
    check_any_outcome(scratch, data)


# --------------------------------------------------------------------------------------------
# collection and serve show the problems, never a traceback
# --------------------------------------------------------------------------------------------


def collect(pytester: pytest.Pytester, name: str, data: bytes) -> tuple[str, pytest.RunResult]:
    (pytester.path / name).write_bytes(data)
    result = pytester.runpytest("--collect-only", "-q", "-p", "no:cacheprovider")
    out = result.stdout.str()
    assert result.ret == pytest.ExitCode.INTERRUPTED
    assert f"ERROR collecting {name}" in out
    for crash in ("Traceback", "UnicodeDecodeError", "OverflowError", "RecursionError"):
        assert crash not in out
    return out, result


def test_collection_shows_the_line_of_a_byte_that_is_not_utf8(pytester: pytest.Pytester) -> None:
    text = mutate(EXAMPLE_TEXT, "seed: 1910", "seed: 1910  # caf\u00e9")
    line = line_of(text, "seed: 1910")
    _, result = collect(pytester, "bad.cmg.yaml", text.encode("latin-1"))
    result.stdout.fnmatch_lines(
        [f"  bad.cmg.yaml:{line}: byte 0xe9 at column 18 is not UTF-8 * scenario files are UTF-8 *"]
    )


def test_collection_shows_the_line_of_a_10_tib_package(pytester: pytest.Pytester) -> None:
    text = mutate(EXAMPLE_TEXT, "size: 24MiB", "size: 10995116277760")
    line = line_of(text, "size: 10995116277760")
    _, result = collect(pytester, "big.cmg.yaml", text.encode())
    result.stdout.fnmatch_lines(
        [f"  big.cmg.yaml:{line}: packages[[]0[]].size 10995116277760 is 10240GiB, more than *"]
    )


def test_collection_of_a_50_mb_file_is_a_few_lines(pytester: pytest.Pytester) -> None:
    text = mutate(EXAMPLE_TEXT, "size: 24MiB", "size: " + "x" * 49_000_000)
    out, result = collect(pytester, "huge.cmg.yaml", text.encode())
    result.stdout.fnmatch_lines(["  huge.cmg.yaml:1: the file is 46.*MiB (* bytes); a scenario *"])
    assert "x" * 81 not in out
    assert len(out) < 3000


def test_serve_prints_the_problems_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "bad.cmg.yaml"
    text = mutate(EXAMPLE_TEXT, "seed: 1910", "seed: 1910  # caf\u00e9")
    path.write_bytes(text.encode("latin-1"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest_cmg",
            "serve",
            str(path),
            "--azurite",
            "external",
            "--connection-string",
            "UseDevelopmentStorage=true",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert f"{path}:{line_of(text, 'seed: 1910')}: byte 0xe9 at column 18" in done.stderr
    assert "scenario files are UTF-8" in done.stderr
    assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------------------
# content generation: in pieces, on disk when large, the same bytes as before
# --------------------------------------------------------------------------------------------

#: What 2dfdc7b generated for these packages: the sha-256 of each file's name and hash.
PINS = {
    ("PS100012", 3, "os_upgrade", 4, MiB, "en_US", 1910): (
        "b0dce06b7f46c0c4791aab32edea34c618c3da1dac5eda5a52cbb3455a6d189e"
    ),
    ("PS100013", 1, "driver", 6, 64 * 1024, "ja_JP", 7): (
        "ee25bc899af17ed043620655a695273ddc2564ff242b03e883e5bdab3ad0ace4"
    ),
    ("PS100014", 2, "application", 3, 300 * 1024, "it_IT", 0): (
        "87d5cb9d40387736ca73d54b31ca8edf42f4cc201f17d87d010df73726eadc46"
    ),
    # Its first file (35 MiB) is drawn in one call at the default piece, in 9 at 4 MiB.
    ("PS100015", 1, "package", 2, 70 * MiB + 3, "en_US", 42): (
        "e6444918b9f469ded224a9a56798e9dfe01eed9e77b9446e7985d87ddaa2e2b4"
    ),
}


def fingerprint(sources: list[Any]) -> str:
    digest = hashlib.sha256()
    for source in sources:
        data = source.data if isinstance(source.data, bytes) else source.data.read_bytes()
        digest.update(source.relpath.encode() + b"\0" + hashlib.sha256(data).digest())
    return digest.hexdigest()


@pytest.mark.parametrize(("key", "pin"), PINS.items(), ids=[k[0] for k in PINS])
def test_content_is_what_2dfdc7b_generated_in_memory_on_disk_and_in_pieces(
    tmp_path: Path, key: tuple[Any, ...], pin: str
) -> None:
    from pytest_cmg._scenario.content import generate_package

    pid, version, kind, files, size, locale, seed = key
    spec = PackageSpec(pid, version, "", kind, True, files, size, locale)
    in_memory = generate_package(spec, seed)
    assert all(isinstance(s.data, bytes) for s in in_memory)
    assert fingerprint(in_memory) == pin
    on_disk = generate_package(spec, seed, folder=tmp_path, piece=4 * MiB, in_memory=0)
    assert all(isinstance(s.data, Path) and s.data.parent == tmp_path for s in on_disk)
    assert [s.relpath for s in on_disk] == [s.relpath for s in in_memory]
    assert fingerprint(on_disk) == pin


def test_a_large_package_needs_a_folder(tmp_path: Path) -> None:
    from pytest_cmg._scenario.content import generate_package

    with pytest.raises(ValueError, match=r"PS100012\.1 has 2048 bytes, more than the 1024 "):
        generate_package(package(2048), 1, in_memory=1024)
    with pytest.raises(ValueError, match="multiple of 4"):
        generate_package(package(2048), 1, folder=tmp_path, piece=6)


def test_a_300_mib_file_is_accepted_and_generated_in_pieces_into_a_folder_removed_after_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    from pytest_cmg._scenario.content import generate_package, generated_package

    # The example's os_upgrade package at 334 MiB in 2 files: install.wim is 300.6 MiB.
    text = mutate(EXAMPLE_TEXT, "    files: 4\n    size: 24MiB", "    files: 2\n    size: 334MiB")
    path = tmp_path / "s.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    scenario = load_scenario(path)
    spec = scenario.packages[0]
    drawn: list[int] = []
    draw = random.Random.randbytes

    def spy(self: random.Random, n: int) -> bytes:
        drawn.append(n)
        return draw(self, n)

    monkeypatch.setattr(random.Random, "randbytes", spy)
    with generated_package(spec, scenario.seed) as sources:
        assert [s.relpath for s in sources] == ["sources/install.wim", "setup.exe"]
        assert all(isinstance(s.data, Path) for s in sources)
        folder = sources[0].data.parent
        assert folder.name.startswith("pytest-cmg-content-PS100012.3-")
        sizes = [s.data.stat().st_size for s in sources]
        with sources[0].data.open("rb") as handle:
            head = handle.read(16)
    assert not folder.exists()
    assert sizes == [int(334 * MiB * 0.9), 334 * MiB - int(334 * MiB * 0.9)]
    assert max(drawn) == RANDOM_PIECE_BYTES
    assert sum(drawn) == 334 * MiB
    # The bytes do not depend on the piece: a small package of the same id, version, type and
    # file count (so the same names drawn first) starts with the same bytes.
    monkeypatch.undo()
    small = generate_package(replace(spec, size=32), scenario.seed)
    assert isinstance(small[0].data, bytes)
    assert small[0].data[:16] == head


def test_the_folder_is_removed_when_the_block_fails() -> None:
    from pytest_cmg._scenario.content import generated_package

    spec = package(3 * 1024, files=3)
    with pytest.raises(RuntimeError, match="upload failed"):
        with generated_package(spec, 1, in_memory=1024) as sources:
            folder = sources[0].data.parent
            assert isinstance(sources[0].data, Path)
            raise RuntimeError("upload failed")
    assert not folder.exists()


def test_an_on_premises_manifest_hashes_content_on_disk(tmp_path: Path) -> None:
    from pytest_cmg._scenario.content import generate_package
    from pytest_cmg._scenario.world import _local_manifest

    spec = package(10_000, files=3, kind="driver")
    in_memory = _local_manifest("PS100012", 1, generate_package(spec, 5))
    on_disk = _local_manifest(
        "PS100012", 1, generate_package(spec, 5, folder=tmp_path, in_memory=0)
    )
    assert on_disk == in_memory
    assert sum(f.size for f in on_disk.files) == 10_000


@pytest.mark.parametrize(
    "name",
    ["ipu/on-demand-token-software-center", "sources/only-an-on-prem-dp-has-the-package"],
)
def test_scenarios_whose_content_is_generated_on_disk_pass_end_to_end(
    cmg_harness: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # Every package goes to disk: uploaded from its file (cloud DP), or hashed from it (a
    # package only an on-premises DP holds); the client verifies what storage serves.
    from pytest_cmg._scenario import content
    from pytest_cmg._scenario.expectations import check_expectations
    from pytest_cmg._scenario.runner import run_scenario

    folders: list[Path] = []
    generate = content.generate_package

    def recording(spec: PackageSpec, seed: int, **kwargs: Any) -> list[Any]:
        sources = generate(spec, seed, **kwargs)
        folders.append(kwargs["folder"])
        assert all(isinstance(s.data, Path) for s in sources)
        return sources

    monkeypatch.setattr(content, "IN_MEMORY_PACKAGE_BYTES", 0)
    monkeypatch.setattr(content, "generate_package", recording)
    scenario = load_scenario(ROOT / f"scenarios/{name}.cmg.yaml")
    run = run_scenario(scenario, cmg_harness, tmp_path / "work")  # type: ignore[arg-type]
    assert check_expectations(scenario, run) == []
    assert folders
    assert not any(folder.exists() for folder in folders)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (12, "12B"),
        (1536, "1.5KiB"),
        (8 << 30, "8GiB"),
        (300 * (1 << 20) + 1, "300MiB"),
        ((1 << 20) - 1, "1023.999KiB"),  # thousandths, as the float formatting wrote them
        (10**400, ""),
    ],
)
def test_human_size_writes_any_integer(count: int, text: str) -> None:
    from pytest_cmg._scenario.limits import human_size

    written = human_size(count)
    if text:
        assert written == text
    else:
        # Past a float's range: still written, with every digit of the whole GiB count.
        assert written.startswith(str(count // (1 << 30))) and written.endswith("GiB")
