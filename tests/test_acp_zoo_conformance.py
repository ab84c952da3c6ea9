"""Every zoo member fails the scenario suite in conformance mode, not only a unit test (issue 11).

Each member of the zoo (tests/acp_zoo/zoo.py: the reference ACP with one realistic bug) runs as
``--cmg-download-program`` in a nested pytest over the scenario files :data:`KILLS` names for
it, and at least one scenario item must fail it. The table was found by running every member
over the whole ``scenarios/`` folder (``python tests/acp_zoo/conformance.py``, about 15 minutes on
two cores); here each member meets only the scenarios that killed it, as a mutation tester runs
only the tests that cover a mutant, so CI pays about a minute instead. The reference itself
passes every applicable scenario (tests/test_conformance_reference.py), which is what makes a
failure here the member's bug, not the scenario's.

What kills a member is mostly not a line of the files but the rules every program is held to
(``expectations._check_program``): it delivers (a fallback rescue is its failure), it exits 0 only
with verified content, it leaves nothing when it fails, it waits a Retry-After; and, for every
downloader, no secret in smsts.log and no torn file under a package file's name.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, path: Path):  # a module
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ZOO = _load("acp_zoo", ROOT / "tests" / "acp_zoo" / "zoo.py")
sys.modules["zoo"] = ZOO  # conformance.py imports its sibling by that name
CONFORMANCE = _load("acp_zoo_conformance", ROOT / "tests" / "acp_zoo" / "conformance.py")

#: Two scenarios that each download a PS100012 of their own content, in this order, with one
#: ``--cache`` for both: a cache keyed by anything but the content hands the first one's files
#: to the second.
CACHE_PAIR = (
    "scenarios/ipu/on-demand-token-software-center.cmg.yaml",
    "scenarios/conditions/not-equals-runs-the-step.cmg.yaml",
)

#: member -> the scenario files that fail it (from the full run), and whether it needs --cache.
KILLS: dict[str, tuple[tuple[str, ...], bool]] = {
    "no-hash-check": (
        ("scenarios/integrity/a-byte-flipped-in-every-answer-is-never-accepted.cmg.yaml",),
        False,
    ),
    "range-200-appended": (
        (
            "scenarios/integrity/"
            "a-link-that-drops-range-and-cuts-is-survived-without-splicing.cmg.yaml",
        ),
        False,
    ),
    "ignores-retry-after": (("scenarios/retry/storage-429-retry-after-honoured.cmg.yaml",), False),
    "no-sas-renewal": (("scenarios/sas/sas-refused-by-storage-is-renewed-once.cmg.yaml",), False),
    "checks-manifest-late": (
        (
            "scenarios/integrity/"
            "location-package-hash-differs-from-a-consistent-manifest.cmg.yaml",
        ),
        False,
    ),
    "cache-keyed-by-package-id": (CACHE_PAIR, True),
    "logs-sas-url": (("scenarios/sas/no-signature-in-any-log.cmg.yaml",), False),
    "logs-ini-token": (("scenarios/sas/no-signature-in-any-log.cmg.yaml",), False),
    # The stall shows the torn file only if the program has opened it when storage stalls.
    "writes-final-name": (
        (
            "scenarios/resume/stall-then-bytes-flow-again.cmg.yaml",
            "scenarios/resume/cut-then-busy-for-good-fails-and-leaves-nothing.cmg.yaml",
        ),
        False,
    ),
    "one-try-short": (("scenarios/retry/storage-5xx-each-retried.cmg.yaml",), False),
    "manifest-hash-trusted": (
        (
            "scenarios/integrity/"
            "location-package-hash-differs-from-a-consistent-manifest.cmg.yaml",
        ),
        False,
    ),
    "exit-0-on-failure": (("scenarios/retry/storage-404-is-fatal.cmg.yaml",), False),
    "leaves-partial": (
        ("scenarios/resume/cut-then-busy-for-good-fails-and-leaves-nothing.cmg.yaml",),
        False,
    ),
    "restarts-after-reset": (("scenarios/resume/repeated-cuts-still-byte-exact.cmg.yaml",), False),
    "resume-skips-a-byte": (("scenarios/resume/clean-close-mid-file-resumes.cmg.yaml",), False),
    "reset-not-retried": (("scenarios/faults/storage-reset-mid-file-resumes.cmg.yaml",), False),
    "manifest-not-retried": (
        ("scenarios/faults/manifest-503-retried-by-the-task-sequence.cmg.yaml",),
        False,
    ),
    "writes-receipt": (("scenarios/ipu/on-demand-token-software-center.cmg.yaml",), False),
    "takes-first-location": (
        ("scenarios/sources/on-prem-dp-skipped-by-the-internet-client.cmg.yaml",),
        False,
    ),
}


def test_the_kill_table_names_every_member_and_existing_scenarios() -> None:
    assert sorted(KILLS) == sorted(m.name for m in ZOO.MEMBERS)
    for scenarios, _ in KILLS.values():
        for scenario in scenarios:
            assert (ROOT / scenario).is_file(), scenario
    # Members that are not bugs under the contract are kept out, with their reason.
    assert not {m.name for m in ZOO.EQUIVALENT} & set(KILLS)


@pytest.mark.slow
@pytest.mark.parametrize("member", sorted(KILLS))
def test_the_conformance_suite_kills_the_member(member: str, tmp_path: Path) -> None:
    scenarios, cache = KILLS[member]
    data = CONFORMANCE.run_member(member, list(scenarios), tmp_path, cache=cache, timeout=600)
    # 1: some item failed. Anything else (2 usage, 3 internal error, 4 bad option) is the
    # harness breaking, which would be a kill for the wrong reason.
    assert data["returncode"] in (0, 1), data["output"]
    errors = [item for item in data["items"] if item["status"] == "failed" and "error" in item]
    assert errors == [], errors
    failed = CONFORMANCE.failures(data)
    print(f"\n{member}: " + "; ".join(f"{nodeid} -> {rule}" for nodeid, rule in failed))
    assert failed, f"{member} survives {', '.join(scenarios)}:\n{data['output']}"


@pytest.mark.slow
def test_the_reference_with_a_cache_passes_the_cache_pair(tmp_path: Path) -> None:
    # The cache member's kill is its key, not the cache: the reference keeps one too.
    data = CONFORMANCE.run_member("reference", list(CACHE_PAIR), tmp_path, cache=True)
    assert CONFORMANCE.failures(data) == [], data["output"]
    assert data["counts"]["passed"] == len(CACHE_PAIR)
