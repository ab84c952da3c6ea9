"""Restarts of a running task sequence: the state saved at a restart (``tsenv.py``) and the
run resumed from it, with Windows Setup's outcome after an Upgrade Operating System step, and
where a Restart Computer step restarts to (Windows PE or the installed operating system).
Functions of :class:`~pytest_cmg._client.engine.TaskSequenceEngine` (its methods).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .._errors import ContentError
from .._protocol.settings import LaunchContext
from . import tsenv
from .sequence import (
    RESTART_COMPUTER,
    PackageTransfer,
    ProviderRun,
    RestartTo,
    TaskSequence,
    TaskSequenceResult,
)
from .tscache import PACKAGES_FOLDER, WORKING_DIRECTORY
from .tsenv import SetupState, TsEnv

if TYPE_CHECKING:
    from .engine import TaskSequenceEngine


#: Variables the product sets when Windows Setup hands the machine back (Microsoft Learn: Task
#: sequence variables): Setup's exit code, in decimal, and TRUE after a rollback.
UPGRADE_RETURN_CODE = "_SMSTSOSUpgradeActionReturnCode"
SETUP_ROLLBACK = "_SMSTSSetupRollback"
#: Where Upgrade Operating System leaves the scripts Setup runs at its end (Microsoft Learn:
#: Upgrade Operating System step; docs/emulation.md, "Restarts").
_POST_UPGRADE = "C:\\Windows\\SMSTSPostUpgrade"
#: TRUE while the step runs in Windows PE, FALSE in the full OS (Microsoft Learn: Task sequence
#: variables); set at the start of the sequence and again at the start of every boot.
IN_WINPE = "_SMSTSInWinPE"
#: How the sequence was started (Microsoft Learn: Task sequence variables: SMS for the
#: client, PXE, UFD+FORMAT for USB media made on a current Windows, CD, DVD, HD). [G] Boot
#: media is USB media here (the media kind is not modelled); the value never changes in a run.
LAUNCH_MODE = "_SMSTSLaunchMode"
_LAUNCH_MODES = {
    LaunchContext.SOFTWARE_CENTER: "SMS",
    LaunchContext.BOOT_MEDIA: "UFD+FORMAT",
    LaunchContext.PXE: "PXE",
}
#: The kind of media the sequence started from (Microsoft Learn: Task sequence variables:
#: "Boot Media, Full Media, PXE, and Prestaged Media"; the values are written BootMedia,
#: FullMedia, PXE, OEMMedia). Not set for a sequence the client started (Software Center):
#: there was no media. [G] Boot media is boot media only: full and prestaged media are not
#: modelled.
MEDIA_TYPE = "_SMSTSMediaType"
_MEDIA_TYPES = {LaunchContext.BOOT_MEDIA: "BootMedia", LaunchContext.PXE: "PXE"}
#: E_FAIL: a restart to an installed operating system the disk does not have (emulation: the
#: product publishes no code for it).
_NO_INSTALLED_OS = 0x80004005


def _environment(self: TaskSequenceEngine) -> None:
    """Set the variables that say where the sequence runs (at its start)."""
    self._set(LAUNCH_MODE, _LAUNCH_MODES.get(self.launch, "SMS"))
    media = _MEDIA_TYPES.get(self.launch)
    if media is not None:
        self._set(MEDIA_TYPE, media)
    self._set(IN_WINPE, "TRUE" if self.in_windows_pe else "FALSE")


def _state(
    self: TaskSequenceEngine, sequence: TaskSequence, next_step: int, steps_run: list[str]
) -> TsEnv:
    return TsEnv(
        sequence=sequence.to_dict(),
        launch=self.launch,
        next_step=next_step,
        variables=dict(self.variables),
        steps_run=list(steps_run),
        transfers=[asdict(t) for t in self.transfers],
        provider_runs=[asdict(r) for r in self.provider_runs],
        downloaded=sorted(self._downloaded),
        pinned=sorted(self._pinned),
        kept=sorted(self._kept),
        reboots=self.reboots,
        in_windows_pe=self.in_windows_pe,
    )


def _save(
    self: TaskSequenceEngine,
    sequence: TaskSequence,
    next_step: int,
    steps_run: list[str],
    restarting: str = "",
    setup: SetupState | None = None,
) -> None:
    state = self._state(sequence, next_step, steps_run)
    state.restarting, state.setup = restarting, setup
    tsenv.save(self.system_drive / WORKING_DIRECTORY, state)


def _restart(
    self: TaskSequenceEngine,
    sequence: TaskSequence,
    next_step: int,
    steps_run: list[str],
    why: str,
    setup: SetupState | None = None,
) -> TaskSequenceResult:
    """Persist the state and end this boot: the computer restarts."""
    self._save(sequence, next_step, steps_run, why, setup)
    self.log.info(
        "TSManager",
        "Saved the task sequence environment to "
        + self.windows(self.system_drive / WORKING_DIRECTORY / tsenv.TSENV_FILE),
    )
    self.log.info("TSManager", "The computer is going to restart")
    return TaskSequenceResult(
        0,
        steps_run,
        list(self.transfers),
        provider_runs=list(self.provider_runs),
        restart=why,
    )


def _restart_computer(
    self: TaskSequenceEngine, sequence: TaskSequence, index: int, steps_run: list[str]
) -> TaskSequenceResult:
    """The Restart Computer step at ``index``: restart to what it says, or fail.

    [G] A sequence started in Windows PE (boot media, PXE) is taken to run on a computer
    with no operating system of its own (bare metal), so restarting to "the currently installed
    default operating system" before an Upgrade Operating System step ran in the sequence
    fails the step (docs/emulation.md, "Restarts").
    """
    ts = "TSManager"
    step = sequence.steps[index]
    to_pe = step.restart_to == RestartTo.WINPE
    if (
        not to_pe
        and self.launch in LaunchContext.IN_WINDOWS_PE
        and not sequence.applied_os(steps_run)
    ):
        reason = (
            f"the task sequence started in Windows PE from {self.launch} and has applied no "
            "operating system yet, so there is none to restart to"
        )
        self.log.error(
            ts,
            f"The action ({step.name}) cannot restart to the currently installed default "
            f"operating system: {reason}",
        )
        error = ContentError(
            _NO_INSTALLED_OS,
            f"step {step.name!r} restarts to the installed operating system, but {reason}: "
            "apply an operating system first, or restart to the boot image (restart_to: winpe)",
        )
        self._step_event(index, step.name, "end", "failed", error.hresult)
        return self._fail(step.name, error, steps_run)
    steps_run.append(step.name)
    self.log.info(ts, f"The action ({step.name}) initiated a reboot request")
    self._step_event(index, step.name, "end", "succeeded")
    where = (
        "the boot image assigned to this task sequence (Windows PE)"
        if to_pe
        else "the currently installed default operating system"
    )
    self.log.info(ts, f"The computer restarts to {where}")
    # Where the next boot runs: saved with the state (tsenv), read back by _resume.
    self.in_windows_pe = to_pe
    return self._restart(sequence, index + 1, steps_run, RESTART_COMPUTER)


def _resume(self: TaskSequenceEngine, state: TsEnv) -> TaskSequenceResult:
    """The next boot: read the state back and continue where the last boot stopped."""
    ts = "TSManager"
    sequence = TaskSequence.from_dict(state.sequence)
    self.launch = state.launch
    self.in_windows_pe = state.in_windows_pe
    self._sequence_content = sequence.content()
    self.variables = dict(state.variables)
    self.transfers = [PackageTransfer(**t) for t in state.transfers]
    self.provider_runs = [
        ProviderRun(**{**r, "left": tuple(r["left"])}) for r in state.provider_runs
    ]
    self._downloaded, self._pinned = set(state.downloaded), set(state.pinned)
    self._kept = set(state.kept)
    self.reboots = state.reboots + 1
    steps_run = list(state.steps_run)
    token = tsenv.load_ccm_token(self.system_drive)
    if token:
        self.client.restore_ccm_token(token)
    if (self.system_drive / WORKING_DIRECTORY / PACKAGES_FOLDER).is_dir():
        _ = self.ts_cache  # the working directory's content is this run's again
    how = "a restart" if state.restarting else "an unexpected restart (power cut)"
    self.log.info(
        ts,
        f"Resuming task sequence {sequence.name} ({sequence.package_id}) after {how}: "
        f"restart {self.reboots}, instruction pointer {state.next_step}",
    )
    self.log.info(
        ts,
        "The computer started in Windows PE (the boot image)"
        if self.in_windows_pe
        else "The computer started in the full operating system",
    )
    self._set(IN_WINPE, "TRUE" if self.in_windows_pe else "FALSE")
    setup = state.setup
    if setup is None:
        return self._steps(sequence, state.next_step, steps_run)
    step = sequence.steps[setup.step]
    if setup.restarts_left > 0:
        self.log.info(ts, "Windows Setup is restarting the computer")
        setup.restarts_left -= 1
        return self._restart(sequence, setup.step, steps_run, "setup", setup)
    self._set(UPGRADE_RETURN_CODE, str(setup.code))
    if setup.result == "rollback":
        self.log.info(
            "SetupRollback",
            f"{_POST_UPGRADE}\\SetupRollback.cmd: Windows Setup rolled back the upgrade "
            f"(0x{setup.code:08X}); starting TSMBootstrap to resume the task sequence",
        )
        self._set(SETUP_ROLLBACK, "TRUE")
        error = ContentError(
            setup.code, f"Windows Setup rolled back the upgrade with 0x{setup.code:08X}"
        )
        self._step_event(setup.step, step.name, "end", "failed", setup.code)
        return self._fail(step.name, error, steps_run)
    self.log.info(
        "SetupComplete",
        f"{_POST_UPGRADE}\\SetupComplete.cmd: Windows Setup completed the upgrade; "
        "starting TSMBootstrap to resume the task sequence",
    )
    steps_run.append(step.name)
    self.log.info(
        ts,
        f"Successfully completed the action ({step.name}) with the exit win32 code 0",
    )
    self._step_event(setup.step, step.name, "end", "succeeded")
    return self._steps(sequence, setup.step + 1, steps_run)
