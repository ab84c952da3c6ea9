"""What a task sequence keeps across a restart: the emulation's TSEnv.dat.

The product keeps the task sequence environment (its variables, the sequence and the next
instruction) in ``_SMSTaskSequence\\TSEnv.dat`` on the system drive while the computer restarts,
and TSManager reads it back on the next boot to continue (docs/emulation.md, "Restarts"). The
emulation keeps the same facts as JSON in ``<system drive>/_SMSTaskSequence/tsenv.json``:

* the sequence and the index of the next step, the launch context, whether the next boot runs
  in Windows PE (a Restart Computer step's "restart to" chose it), the variables;
* what the run did so far (steps run, transfers, content provider runs, the reboot count);
* the content bookkeeping (client cache entries it downloaded and pinned, task sequence cache
  content kept for the run); the packages themselves stay where they are on disk;
* what Windows Setup is doing when the Upgrade Operating System step handed it the machine;
* for an Azure AD client, the CCM token it got at CCM_STS, as the product caches its token.

It never holds a SAS URL, a manifest or a content access token: after a restart the client asks
the CMG for fresh ones. :func:`save` refuses a state that carries ``sig=`` anywhere. The file is
written atomically (temporary file, ``fsync``, rename, ``fsync`` of the folder), so a power cut
leaves the old state or the new one.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._errors import PytestCmgError
from ._journal import fsync_dir

__all__ = [
    "CCM_TOKEN_FILE",
    "TSENV_FILE",
    "SetupState",
    "TsEnv",
    "TsEnvError",
    "load",
    "load_ccm_token",
    "remove",
    "save",
    "save_ccm_token",
]

#: The state file in the task sequence working directory (the product's is TSEnv.dat).
TSENV_FILE = "tsenv.json"
#: 2: ``in_windows_pe`` (a state without it cannot say where the next boot runs).
_FORMAT = 2
#: What a SAS URL or a content access token carries, and what must never reach the disk here.
_SIGNATURE = "sig="


class TsEnvError(PytestCmgError):
    """The persisted task sequence state cannot be written or read."""


@dataclass
class SetupState:
    """Windows Setup at work after Upgrade Operating System handed it the machine.

    ``restarts_left`` are Setup's own restarts still to come; ``result`` is how Setup ends
    (``success``: SetupComplete.cmd resumes the sequence; ``rollback``: SetupRollback.cmd does)
    and ``code`` is Setup's exit code.
    """

    step: int
    restarts_left: int
    result: str
    code: int


@dataclass
class TsEnv:
    """The task sequence state one boot hands to the next (see the module's docstring)."""

    sequence: dict[str, Any]
    launch: str
    next_step: int
    variables: dict[str, str]
    steps_run: list[str] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    provider_runs: list[dict[str, Any]] = field(default_factory=list)
    downloaded: list[str] = field(default_factory=list)
    pinned: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    #: Restarts so far (Restart Computer steps, Setup's restarts, power cuts).
    reboots: int = 0
    #: Why the last boot ended: ``restart_computer``, ``setup`` or ``""`` (cut at a step).
    restarting: str = ""
    setup: SetupState | None = None
    #: Whether the next boot runs in Windows PE (the boot image) rather than the installed OS:
    #: where the last boot ran, unless a Restart Computer step chose the other.
    in_windows_pe: bool = False

    def to_json(self) -> str:
        return json.dumps({"format": _FORMAT, **asdict(self)}, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: Path) -> TsEnv:
        try:
            raw = json.loads(text)
            if raw.get("format") != _FORMAT:
                msg = f"format {raw.get('format')!r} is not {_FORMAT}"
                raise ValueError(msg)
            del raw["format"]
            setup = raw.pop("setup")
            return cls(**raw, setup=SetupState(**setup) if setup else None)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            msg = (
                f"{where}: not a task sequence state this emulator wrote ({exc}); the state of "
                "a restarted sequence is written by the engine only: delete the file to start "
                "the sequence over"
            )
            raise TsEnvError(msg) from exc


def save(working_directory: Path, state: TsEnv) -> Path:
    """Write ``state`` to ``working_directory/tsenv.json`` atomically and durably."""
    text = state.to_json()
    path = working_directory / TSENV_FILE
    if _SIGNATURE in text:
        msg = (
            f"{path}: the task sequence state would carry a signature ({_SIGNATURE!r}); a SAS "
            "or an access token never outlives a boot: keep only what the product keeps in "
            "TSEnv.dat and ask the CMG again after the restart"
        )
        raise TsEnvError(msg)
    _write_durably(path, text)
    return path


def _write_durably(path: Path, text: str) -> None:
    """``text`` into ``path``: a temporary file, ``fsync``, rename, ``fsync`` of the folder, so a
    power cut leaves the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


#: Where the client keeps its CCM token, under the system drive. The product keeps it, encrypted,
#: in the client's own store ("Cached encrypted token for 'S-1-5-18'"), not in the task
#: sequence's state: it is written the moment CCM_STS issues it, so a power cut in the middle
#: of the step that got it does not lose it (docs/emulation.md, "Restarts").
CCM_TOKEN_FILE = Path("Windows", "CCM", "ccm_token")


def save_ccm_token(system_drive: Path, token: str) -> None:
    """Keep ``token`` where the next boot of this client finds it."""
    _write_durably(system_drive / CCM_TOKEN_FILE, token)


def load_ccm_token(system_drive: Path) -> str | None:
    """The CCM token this client kept, if any."""
    try:
        return (system_drive / CCM_TOKEN_FILE).read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


def load(working_directory: Path) -> TsEnv | None:
    """The state a previous boot left, or None when the sequence was not restarted."""
    path = working_directory / TSENV_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return TsEnv.from_json(text, path)


def remove(working_directory: Path) -> None:
    """The sequence ended: its state goes (the product deletes TSEnv.dat)."""
    (working_directory / TSENV_FILE).unlink(missing_ok=True)
