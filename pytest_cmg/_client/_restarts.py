"""Restarts of a running task sequence: the state saved at a restart (``tsenv.py``) and the
run resumed from it, with Windows Setup's outcome after an Upgrade Operating System step.
Functions of :class:`~pytest_cmg._client.engine.TaskSequenceEngine` (its methods).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

from .._errors import ContentError
from . import tsenv
from .sequence import PackageTransfer, ProviderRun, TaskSequence, TaskSequenceResult
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
        ccm_token=self.client.cached_ccm_token,
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


def _resume(self: TaskSequenceEngine, state: TsEnv) -> TaskSequenceResult:
    """The next boot: read the state back and continue where the last boot stopped."""
    ts = "TSManager"
    sequence = TaskSequence.from_dict(state.sequence)
    self.launch = state.launch
    self.variables = dict(state.variables)
    self.transfers = [PackageTransfer(**t) for t in state.transfers]
    self.provider_runs = [
        ProviderRun(**{**r, "left": tuple(r["left"])}) for r in state.provider_runs
    ]
    self._downloaded, self._pinned = set(state.downloaded), set(state.pinned)
    self._kept = set(state.kept)
    self.reboots = state.reboots + 1
    steps_run = list(state.steps_run)
    if state.ccm_token:
        self.client.restore_ccm_token(state.ccm_token)
    if (self.system_drive / WORKING_DIRECTORY / PACKAGES_FOLDER).is_dir():
        _ = self.ts_cache  # the working directory's content is this run's again
    how = "a restart" if state.restarting else "an unexpected restart (power cut)"
    self.log.info(
        ts,
        f"Resuming task sequence {sequence.name} ({sequence.package_id}) after {how}: "
        f"restart {self.reboots}, instruction pointer {state.next_step}",
    )
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
    return self._steps(sequence, setup.step + 1, steps_run)
