"""The scenario suite against the built-in client with one realistic bug at a time (issue 11).

Each mutant (tests/builtin_mutants/mutants.py: one change to one file of pytest_cmg/_client) runs
as a copy of the whole package, in a pytest process of its own, against the scenario items
recorded as its killers; at least one of them must fail. The killers must pass on the unchanged
client (tested here once, in one session, so a kill means the bug and not a broken scenario).

The default run costs one pytest session per mutant plus one (about 4-6 s each: Azurite starts
in each): about 65 s on one core. ``PYTEST_CMG_MUTANTS_FULL=1`` also runs every mutant against
all of scenarios/ but the benchmarks (about 30-50 s per mutant) and prints the kill matrix, as
``python tests/builtin_mutants/mutants.py --matrix`` does.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load():
    path = ROOT / "tests" / "builtin_mutants" / "mutants.py"
    spec = importlib.util.spec_from_file_location("builtin_mutants", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


MUTANTS = _load()
NAMES = [m.name for m in MUTANTS.MUTANTS]
FULL = os.environ.get("PYTEST_CMG_MUTANTS_FULL") == "1"


def _file_of(node: str) -> Path:
    return ROOT / node.split("::", 1)[0]


def test_the_twelve_mutants_are_distinct_and_each_has_killers():
    assert len(NAMES) == 12
    assert len(set(NAMES)) == len(NAMES)
    assert set(MUTANTS.KILLERS) == set(NAMES)
    for name, nodes in MUTANTS.KILLERS.items():
        assert nodes, f"{name}: no killing scenario recorded"
        for node in nodes:
            # Killers are scenario items: the scenario suite must kill each mutant, not unit tests.
            assert node.startswith("scenarios/"), node
            assert _file_of(node).is_file(), f"{name}: {node} names no scenario file"


@pytest.mark.parametrize("name", NAMES)
def test_the_mutant_fits_the_client(name):
    """Each change occurs exactly once in today's client, and the result compiles."""
    chosen = MUTANTS.mutant(name)
    source = (ROOT / "pytest_cmg" / chosen.path).read_text(encoding="utf-8")
    mutated = MUTANTS.mutate(source, chosen)
    assert mutated != source
    compile(mutated, chosen.path, "exec")


def test_a_change_that_does_not_fit_fails_loudly():
    chosen = MUTANTS.mutant(NAMES[0])
    broken = MUTANTS.Mutant(chosen.name, chosen.bug, chosen.path, (("no such line", "x"),))
    with pytest.raises(ValueError, match="occurs 0 times"):
        MUTANTS.mutate("source", broken)
    twice = MUTANTS.Mutant(chosen.name, chosen.bug, chosen.path, (("a", "b"),))
    with pytest.raises(ValueError, match="occurs 2 times"):
        MUTANTS.mutate("a a", twice)


@pytest.mark.slow
def test_the_killers_pass_on_the_unchanged_client():
    """The copy without a bug passes every killing item: a kill is the bug's, not the item's."""
    nodes = sorted({node for nodes in MUTANTS.KILLERS.values() for node in nodes})
    outcome = MUTANTS.run_scenarios(None, nodes)
    assert not outcome.failed, (
        f"failing on the unchanged client: {outcome.failed}\n{outcome.output}"
    )
    assert len(outcome.passed) >= len(nodes), outcome.output


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_the_scenarios_kill_the_mutant(name):
    chosen = MUTANTS.mutant(name)
    nodes = MUTANTS.KILLERS[name]
    outcome = MUTANTS.run_scenarios(chosen, nodes)
    assert outcome.killed, (
        f"{name} ({chosen.bug}) survived {', '.join(nodes)}: every item passed\n{outcome.output}"
    )


@pytest.mark.slow
@pytest.mark.skipif(not FULL, reason="PYTEST_CMG_MUTANTS_FULL=1 runs the full kill matrix")
def test_full_kill_matrix():
    """Every mutant against all of scenarios/ but the benchmarks (mutants.MATRIX_OPTIONS says
    why), printed as it goes (``-s`` shows it); each must fail an item the unchanged client
    passes."""
    _, kills = MUTANTS.matrix(["scenarios"], echo=True)
    survivors = [name for name, nodes in kills.items() if not nodes]
    assert not survivors, f"survived all of scenarios/: {survivors}"
