"""One fault vocabulary and typed expectations (issue 14).

The storage faults a scenario can script are one table, ``_net.faults.VOCABULARY``: the
language's ``storage`` keys, its rules and the timeline derive from it, so every entry of the
table is accepted in a file and reaches the fault proxy, and a word added to it is usable with
no other edit. ``expect`` loads into :class:`Expectations`, one field per key of the language.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pytest_cmg
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._errors import ScenarioError
from pytest_cmg._net.faults import VOCABULARY, FaultWord, faults_from
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._scenario.model import Expectations, StorageFaultEntry
from pytest_cmg._scenario.spec import Bounds
from pytest_cmg._scenario.timeline import Timeline
from pytest_cmg._scenario.vocabulary import EXPECT, STORAGE_FAULT, storage_fault_fields

HEAD = """\
scenario: vocabulary
seed: 3
packages:
  - {id: PS100012, type: os_upgrade, files: 2, size: 64KiB}
  - {id: PS100013, type: driver, files: 1, size: 16KiB}
task_sequence:
  id: PS100020
  name: Windows 11 in-place upgrade
  steps:
    - {name: Upgrade the operating system, action: upgrade_os, package: PS100012}
    - {name: Apply drivers, action: download_package_content, package: PS100013}
"""
START = datetime(2026, 1, 1, tzinfo=UTC)


class _Proxy:
    """Records what the timeline arms on the fault proxy."""

    def __init__(self) -> None:
        self.added: list[tuple[str, int | None, int, str | None]] = []

    def add(
        self, fault: Any, *, request: int | None = None, times: int = 1, path: str | None = None
    ) -> None:
        self.added.append((fault.name, request, times, path))


def write(folder: Path, text: str) -> Path:
    path = folder / "v.cmg.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def _entry(word: FaultWord) -> str:
    """A ``storage`` entry asking for ``word``, its required args given (sample values)."""
    specs = storage_fault_fields()
    keys = [word.key, *(arg.key for arg in word.args if arg.required)]
    return ", ".join(f"{key}: {specs[key].spec.sample()}" for key in keys)


# --------------------------------------------------------------------------------------------
# the fault vocabulary
# --------------------------------------------------------------------------------------------


def test_the_storage_entry_keys_are_the_vocabulary_s() -> None:
    where = ("request", "times", "file")
    words = [key for word in VOCABULARY for key in word.keys]
    assert list(STORAGE_FAULT.fields) == [*where, *words]
    assert len(set(words)) == len(words), "two words of the vocabulary share a key"


@pytest.mark.parametrize("word", VOCABULARY, ids=[word.key for word in VOCABULARY])
def test_every_word_is_accepted_by_the_language_and_reaches_the_proxy(
    tmp_path: Path, word: FaultWord
) -> None:
    text = (
        HEAD
        + f"faults:\n  - storage: {{request: 2, {_entry(word)}}}\nexpect:\n  outcome: success\n"
    )
    (event,) = load_scenario(write(tmp_path, text)).timeline
    assert isinstance(event, StorageFaultEntry)
    (fault,) = event.faults
    assert fault.kind == word.kind
    proxy = _Proxy()
    Timeline((event,), None, proxy, VirtualTime(START)).start()  # type: ignore[arg-type]
    assert proxy.added == [(f"{fault.name}@faults[0]", 2, 1, None)]


def test_a_value_the_proxy_refuses_is_a_problem_at_its_line(tmp_path: Path) -> None:
    text = (
        HEAD
        + "faults:\n  - storage: {request: 1,\n      throttle: 0}\nexpect:\n  outcome: success\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    (problem,) = info.value.problems
    assert problem.line == 14
    assert problem.rule == "throttle: bytes_per_second must be > 0, not 0"


def test_values_that_go_together_follow_the_vocabulary(tmp_path: Path) -> None:
    text = (
        HEAD
        + "faults:\n  - storage: {request: 1, stall_for: 5s, error_code: ServerBusy}\nexpect:\n  outcome: success\n"
    )
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    rules = sorted(p.rule for p in info.value.problems)
    assert rules == [
        "error_code goes with respond",
        "stall_after and stall_for go together",
        "this storage fault does nothing",
    ]


#: Run in a fresh interpreter: the language's records are built when the modules are imported,
#: so the new word is added to the table first, as if it had been written there.
_NEW_WORD = """
import json, sys
from datetime import UTC, datetime
from pathlib import Path

import pytest_cmg._net.faults as vocabulary
from pytest_cmg._net.faults import FaultArg, FaultWord, respond

def busy(seconds):
    return respond(503, headers={"Retry-After": str(seconds)})

vocabulary.VOCABULARY = (
    *vocabulary.VOCABULARY,
    FaultWord("respond", "flag", "Answer 503 Server Busy.", busy, name="busy",
              args=(FaultArg("busy_for", "text", "Its Retry-After."),)),
)

import pytest_cmg
from pytest_cmg._errors import ScenarioError
from pytest_cmg._scenario.load import load_scenario
from pytest_cmg._client.retry import VirtualTime
from pytest_cmg._scenario.timeline import Timeline

class Proxy:
    def __init__(self):
        self.added = []
    def add(self, fault, *, request=None, times=1, path=None):
        self.added.append([fault.name, dict(fault.headers), request])

(event,) = load_scenario(Path(sys.argv[1])).timeline
proxy = Proxy()
Timeline((event,), None, proxy, VirtualTime(datetime.now(UTC))).start()
try:
    load_scenario(Path(sys.argv[2]))
    refused = []
except ScenarioError as error:
    refused = [[p.line, p.rule] for p in error.problems]
print(json.dumps({"added": proxy.added, "refused": refused}))
"""


def test_a_word_added_to_the_table_is_usable_in_a_scenario_with_no_other_edit(
    tmp_path: Path,
) -> None:
    tail = "expect:\n  outcome: success\n"
    good = tmp_path / "good.cmg.yaml"
    good.write_text(
        HEAD + "faults:\n  - storage: {request: 1, busy: true, busy_for: '7'}\n" + tail,
        encoding="utf-8",
    )
    bad = tmp_path / "bad.cmg.yaml"
    bad.write_text(
        HEAD + "faults:\n  - storage: {request: 1, busy: true}\n" + tail, encoding="utf-8"
    )
    script = tmp_path / "new_word.py"
    script.write_text(textwrap.dedent(_NEW_WORD), encoding="utf-8")
    # This checkout's package, as the test process imports it (not an installed copy).
    root = str(Path(pytest_cmg.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), str(good), str(bad)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["added"] == [["respond(503)@faults[0]", {"Retry-After": "7"}, 1]]
    # Its rules come with it: a required arg left out is refused at its line.
    assert seen["refused"] == [[13, "busy and busy_for go together"]]


# --------------------------------------------------------------------------------------------
# expectations
# --------------------------------------------------------------------------------------------


def test_expectations_have_one_field_per_key_of_the_language() -> None:
    assert [f.name for f in fields(Expectations)] == list(EXPECT.fields)


def test_an_unknown_expect_key_is_refused_at_its_line(tmp_path: Path) -> None:
    text = HEAD + "expect:\n  outcome: success\n  retires: 1\n"
    with pytest.raises(ScenarioError) as info:
        load_scenario(write(tmp_path, text))
    (problem,) = info.value.problems
    assert (problem.line, problem.rule) == (14, "unknown key 'retires' in expect")
    assert problem.hint.startswith("did you mean 'retries'?")


_PATTERN = (
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789 =", min_size=1, max_size=12)
    .map(str.strip)
    .filter(bool)
)
_COUNT = st.integers(min_value=0, max_value=50)


@st.composite
def _bounds(draw: st.DrawFn, exact: bool = True) -> tuple[str, Bounds]:
    low = draw(st.none() | _COUNT)
    high = draw(st.none() | _COUNT)
    if exact and draw(st.booleans()):
        return str(high or 0), Bounds(high or 0, high or 0)
    if low is None and high is None:
        low = 1
    if low is not None and high is not None and low > high:
        low, high = high, low
    given = {k: v for k, v in (("at_least", low), ("at_most", high)) if v is not None}
    return json.dumps(given), Bounds(low, high)


@st.composite
def _expect(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """An ``expect`` section as YAML, and the values each key must load as."""
    lines = ["expect:"]
    want: dict[str, Any] = {}
    outcome = draw(st.sampled_from(["success", "failure"]))
    lines.append(f"  outcome: {outcome}")
    want["outcome"] = outcome
    if outcome == "failure" and draw(st.booleans()):
        code = f"0x{draw(st.integers(min_value=1, max_value=2**32 - 1)):08X}"
        lines.append(f'  exit_code: "{code}"')
        want["exit_code"] = code
    for key, items in (
        ("cache", ["PS100012.1", "PS100013.1"]),
        ("ts_cache", ["PS100012.1", "PS100013.1"]),
        ("downloaded", ["PS100012", "PS100013"]),
    ):
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(items), unique=True))
            lines.append(f"  {key}: {json.dumps(chosen)}")
            want[key] = tuple(chosen)
    for key in ("log", "gateway_log", "absent_log", "absent_gateway_log"):
        if draw(st.booleans()):
            patterns = draw(st.lists(_PATTERN, min_size=1, max_size=3))
            lines.append(f"  {key}: {json.dumps(patterns)}")
            want[key] = tuple(patterns)
    for key in ("storage_requests", "retries", "restarts"):
        if draw(st.booleans()):
            text, bounds = draw(_bounds())
            lines.append(f"  {key}: {text}")
            want[key] = bounds
    if draw(st.booleans()):
        text, bounds = draw(_bounds())
        lines.append(f"  requests: {{manifest: {text}}}")
        want["requests"] = {"manifest": bounds}
    if draw(st.booleans()):
        text, bounds = draw(_bounds())
        lines.append(f"  storage_bytes: {{PS100013: {text}}}")
        want["storage_bytes"] = {"PS100013": bounds}
    if draw(st.booleans()):
        seconds = draw(st.integers(min_value=0, max_value=7200))
        lines.append(f"  elapsed: {{max: {seconds}s}}")
        want["elapsed"] = Bounds(None, float(seconds))
    if draw(st.booleans()):
        text, bounds = draw(_bounds())
        lines.append(f"  egress_bytes: {text}")
        want["egress_bytes"] = bounds
    return "\n".join(lines) + "\n", want


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=_expect())
def test_loaded_expectations_round_trip_the_yaml_values(
    tmp_path: Path, case: tuple[str, dict[str, Any]]
) -> None:
    text, want = case
    expect = load_scenario(write(tmp_path, HEAD + text)).expect
    defaults = Expectations(outcome=want["outcome"])
    for f in fields(Expectations):
        assert getattr(expect, f.name) == want.get(f.name, getattr(defaults, f.name)), f.name


def test_faults_from_asks_for_what_is_given_and_true() -> None:
    assert faults_from({}) == []
    assert faults_from({"ignore_range": False, "respond": None}) == []
    # A value of 0 is given (a reset before the first body byte), a flag only when true.
    assert [f.name for f in faults_from({"reset_after": 0, "ignore_range": True})] == [
        "reset_after(0)",
        "ignore_range()",
    ]


def test_the_gateway_fault_entry_is_spelled_by_gateway_fault_alone() -> None:
    """A ``gateway`` entry is built as ``GatewayFault(**entry)`` (``load.py``): its keys are the
    dataclass's fields, each once, so a field added to ``GatewayFault`` and not to the language
    (or a key the class does not take) fails here, not in a run."""
    from dataclasses import MISSING, fields

    from pytest_cmg._gateway.faults import GatewayFault
    from pytest_cmg._scenario.vocabulary import GATEWAY_FAULT

    by_name = {f.name: f for f in fields(GatewayFault)}
    assert sorted(GATEWAY_FAULT.fields) == sorted(by_name)
    for name, spec in GATEWAY_FAULT.fields.items():
        default = by_name[name].default
        # The language's "not given" (None, False) is the class's default, or None for a value
        # the class defaults to something that means the same (delay 0.0).
        assert default is not MISSING
        assert spec.default in (default, None), (name, spec.default, default)
