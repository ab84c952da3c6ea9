"""What both commands share: the JSON line's version, reading the user's scenario file
(one case of it), and one-line messages."""

from __future__ import annotations

import errno
import sys
from typing import TYPE_CHECKING

from .._errors import ScenarioError

if TYPE_CHECKING:
    from pathlib import Path

    from .._scenario.model import Scenario


__all__ = ["CONTRACT_VERSION", "MAX_MESSAGE", "one_line", "pick_case", "read_scenario"]

#: Bumped when a field of the JSON line changes meaning or disappears (additions keep it:
#: ``aad_token``, ``tenant_id`` and ``storage_ca_cert`` were added under version 1).
CONTRACT_VERSION = 1


#: Longest message shown for an unexpected error while loading a scenario (one line; the
#: exception's text could quote a whole file).
MAX_MESSAGE = 300


def read_scenario(path: Path, command: str, case: str | None = None) -> Scenario | None:
    """The file's scenario (its case ``case``), or None after telling on stderr why the user's
    file cannot be used.

    The CLI's safety net: the loader reports every broken rule as a ScenarioError (printed as
    is: its problems, one a line), but whatever else escapes it while reading the user's file
    (undecodable bytes, an unreadable path, a YAML error, a structure too deep or too big) is
    also the file's fault, not a crash: one line naming the file and the rule, never a
    traceback. Both are exit 2 (bad usage) for the caller.
    """
    from .._scenario.load import load_scenarios

    try:
        return pick_case(path, load_scenarios(path), case)
    except ScenarioError as error:
        print(error, file=sys.stderr)
    except Exception as error:
        # Any exception: see the docstring (the user's file, not a crash).
        print(f"pytest-cmg {command}: {unreadable_scenario(path, error)}", file=sys.stderr)
    return None


def pick_case(path: Path, scenarios: list[Scenario], case: str | None) -> Scenario:
    """The scenario of case ``case`` (None: the file's only one); a ScenarioError at the line
    of the file's cases otherwise, naming the IDs there are."""
    from .._errors import ScenarioProblem

    ids = [s.case_id for s in scenarios if s.case_id is not None]
    if case is None and not ids:
        return scenarios[0]
    chosen = [s for s in scenarios if case is not None and s.case_id == case]
    if chosen:
        return chosen[0]
    first = scenarios[0]
    listed = ", ".join(ids)
    if case is None:
        rule = f"this file is parametrised into {len(ids)} cases ({listed})"
        hint = "choose one with --case ID"
    elif not ids:
        rule = f"--case {case!r}: this file has no cases (no matrix, no cases list)"
        hint = "leave --case out"
    else:
        rule = f"--case {case!r}: no case has that ID; its cases are {listed}"
        hint = "give one of them, as pytest shows it in brackets"
    raise ScenarioError([ScenarioProblem(path, first.line(first.item_where), rule, hint)])


def unreadable_scenario(path: Path, error: Exception) -> str:
    """One line: which file, which rule it breaks, and the fix."""
    import yaml

    where = f"scenario {path}"
    if isinstance(error, UnicodeDecodeError):
        byte = error.object[error.start : error.start + 1].hex()
        return (
            f"{where} (or a file it includes) is not UTF-8 text: byte 0x{byte} at offset "
            f"{error.start} cannot be decoded; scenario files must be UTF-8: save it as UTF-8"
        )
    if isinstance(error, OSError):
        named = (
            f" ({error.filename})" if error.filename and str(error.filename) != str(path) else ""
        )
        fixes = {
            errno.ENOENT: "check the path",
            errno.EISDIR: "name a *.cmg.yaml file, not a folder",
            errno.EACCES: "make it readable by this user",
        }
        fix = fixes.get(error.errno or 0, "name a readable scenario file")
        return f"cannot read {where}{named}: {error.strerror or error}; {fix}"
    if isinstance(error, yaml.YAMLError):
        mark = getattr(error, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        return f"{where}{at} is not valid YAML ({one_line(str(problem))}); fix the YAML syntax"
    if isinstance(error, RecursionError):
        return (
            f"{where} nests too deeply to be read; a scenario needs only a few levels: flatten it"
        )
    if isinstance(error, MemoryError):
        return f"{where} is too large to be read into memory; scenario files are small: split it"
    return one_line(
        f"{where} could not be loaded ({type(error).__name__}: {error}); the loader should "
        "have named the broken rule: please report this with the file"
    )


def one_line(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MAX_MESSAGE else flat[: MAX_MESSAGE - 3] + "..."
