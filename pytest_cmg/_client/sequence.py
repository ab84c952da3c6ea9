"""The task sequence model: steps, their conditions and content destinations, Windows Setup's
outcome, and what a run returns (packages transferred, content provider runs, the result).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .._errors import InvalidValueError
from .._protocol.winpath import disk_path

if TYPE_CHECKING:
    from .._errors import ContentError


#: The files a provider left behind that the log and :class:`ProviderRun` name.
_LEFT_SHOWN = 20
_Outcome = Literal["delivered", "refused", "aborted", "fell back"]

_DRIVE = re.compile(r"^[A-Za-z]:")


def _true(variables: dict[str, str], name: str) -> bool:
    return variables.get(name, "").strip().casefold() == "true"


def _int_variable(variables: dict[str, str], name: str, default: int) -> int:
    try:
        return max(0, int(variables.get(name, default)))
    except ValueError:
        return default


DOWNLOAD_PACKAGE_CONTENT = "download_package_content"
UPGRADE_OS = "upgrade_os"
RESTART_COMPUTER = "restart_computer"
STEP_ACTIONS = (
    "run_command_line",
    UPGRADE_OS,
    DOWNLOAD_PACKAGE_CONTENT,
    "apply_driver_package",
    RESTART_COMPUTER,
)


class RestartTo:
    """Restart Computer's "Specify what to run after restart" (Microsoft Learn: Task sequence
    steps, "Restart Computer"; docs/emulation.md, "Restarts")."""

    #: "The boot image assigned to this task sequence": the next boot runs in Windows PE.
    WINPE = "winpe"
    #: "The currently installed default operating system" (the step's default).
    OS = "os"
    ALL = (WINPE, OS)


class ContentDestination:
    """Download Package Content's "Place into the following location" (Microsoft Learn: Task
    sequence steps, "Download Package Content"; docs/emulation.md, "Task sequence content
    locations")."""

    #: The task sequence working directory: kept there until the task sequence ends.
    TS_CACHE = "ts_cache"
    #: The client cache (ccmcache); in Windows PE, which has none, the task sequence directory.
    CLIENT_CACHE = "client_cache"
    #: A folder of the step's choice: the package lands in ``<path>/<PackageID>``.
    CUSTOM = "custom"
    ALL = (TS_CACHE, CLIENT_CACHE, CUSTOM)


def custom_path_parts(path: str) -> tuple[str, ...]:
    """The folders of a custom download path, below the system drive.

    ``C:\\Drivers\\HP``, ``\\Drivers\\HP``, ``Drivers/HP`` all give ``("Drivers", "HP")``: the
    emulation maps the system drive to a folder of its own, so no path can leave it. ``..`` and
    an empty path are refused (``ValueError``). Any drive letter is read as ``C:`` (the one drive
    emulated), and the folders are then read by the one path rule (``winpath.disk_path``).
    """
    parts = tuple(p for p in _DRIVE.sub("", path.strip()).replace("\\", "/").split("/") if p)
    if not parts or any(p in (".", "..") for p in parts):
        msg = f"custom download path {path!r}: give folders below the system drive, without '..'"
        raise InvalidValueError(msg)
    root = Path("/")
    return disk_path("C:\\" + "\\".join(parts), root).relative_to(root).parts


@dataclass(frozen=True)
class Condition:
    """A step condition on a task sequence variable (the "Options" tab's variable test).

    ``operator`` is ``equals``, ``not_equals`` or ``exists``.
    """

    variable: str
    operator: str = "equals"
    value: str = ""

    OPERATORS = ("equals", "not_equals", "exists")

    def holds(self, variables: dict[str, str]) -> bool:
        if self.operator == "exists":
            return self.variable in variables
        actual = variables.get(self.variable)
        if self.operator == "equals":
            return actual is not None and actual.casefold() == self.value.casefold()
        return actual is None or actual.casefold() != self.value.casefold()

    def __str__(self) -> str:
        if self.operator == "exists":
            return f"{self.variable} exists"
        sign = "=" if self.operator == "equals" else "<>"
        return f'{self.variable} {sign} "{self.value}"'


@dataclass(frozen=True)
class Setup:
    """What Windows Setup does after Upgrade Operating System hands it the machine.

    It restarts the computer ``restarts`` times, then ends with ``result``: ``success`` gives
    control back to the task sequence through SetupComplete.cmd, ``rollback`` restores the old
    OS and resumes it through SetupRollback.cmd. ``code`` is Setup's exit code, which the step
    fails with after a rollback (docs/emulation.md, "Restarts").
    """

    restarts: int = 1
    result: Literal["success", "rollback"] = "success"
    code: int = 0

    RESULTS = ("success", "rollback")

    def __post_init__(self) -> None:
        if self.restarts < 1 or self.result not in self.RESULTS or not 0 <= self.code < 2**32:
            msg = (
                f"setup {self}: Windows Setup restarts the computer at least once, ends with "
                f"one of {', '.join(self.RESULTS)}, and its code is a 32-bit unsigned value"
            )
            raise InvalidValueError(msg)


@dataclass(frozen=True)
class Step:
    """One task sequence step; ``package`` is the ID of the content it needs, if any.

    A step runs only when every one of its ``conditions`` holds. A Download Package Content step
    may take several packages (the product's step takes a list): ``package`` is the first and
    ``extra_packages`` the rest, downloaded in that order; :attr:`packages` is all of them.
    """

    name: str
    action: str
    package: str | None = None
    conditions: tuple[Condition, ...] = ()
    #: Download Package Content only: where the package goes (:class:`ContentDestination`);
    #: ``None`` is where any step's content goes (the client cache; in Windows PE the task
    #: sequence directory).
    destination: str | None = None
    #: With ``destination`` ``custom``: the folder the package folder is put in.
    path: str | None = None
    #: Download Package Content only: "Save path as a variable": ``<variable>01`` gets the
    #: first package's location, ``<variable>02`` the second's... (the product numbers one
    #: variable per package of the step).
    variable: str | None = None
    #: Download Package Content only: the step's packages after ``package``, in order.
    extra_packages: tuple[str, ...] = ()
    #: Upgrade Operating System only: Windows Setup's restarts and result. ``None``: the
    #: upgrade is simulated without restarts (the step ends when its content was used).
    setup: Setup | None = None
    #: Restart Computer only: what the computer restarts to (:class:`RestartTo`); ``None`` is
    #: the step's default, the installed operating system.
    restart_to: str | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        """Every package the step needs, in the order it obtains them."""
        return ((self.package,) if self.package else ()) + self.extra_packages

    def __post_init__(self) -> None:
        problems = []
        content_step = self.action == DOWNLOAD_PACKAGE_CONTENT
        if self.destination is not None and self.destination not in ContentDestination.ALL:
            problems.append(f"destination must be one of {', '.join(ContentDestination.ALL)}")
        if (
            self.destination is not None or self.variable is not None or self.extra_packages
        ) and not content_step:
            problems.append(
                f"destination, variable and extra_packages belong to {DOWNLOAD_PACKAGE_CONTENT} "
                "steps"
            )
        if self.extra_packages and not self.package:
            problems.append("extra_packages come after a first package")
        if len(set(self.packages)) != len(self.packages):
            problems.append("a package is listed twice")
        if (self.destination == ContentDestination.CUSTOM) != (self.path is not None):
            problems.append("a custom destination needs a path, and only it takes one")
        if self.setup is not None and self.action != UPGRADE_OS:
            problems.append(f"setup belongs to {UPGRADE_OS} steps")
        if self.action == RESTART_COMPUTER and self.packages:
            problems.append(f"a {RESTART_COMPUTER} step uses no package")
        if self.restart_to is not None and self.action != RESTART_COMPUTER:
            problems.append(f"restart_to belongs to {RESTART_COMPUTER} steps")
        if self.restart_to is not None and self.restart_to not in RestartTo.ALL:
            problems.append(f"restart_to must be one of {', '.join(RestartTo.ALL)}")
        if problems:
            msg = f"step {self.name!r}: " + "; ".join(problems)
            raise InvalidValueError(msg)
        if self.path is not None:
            custom_path_parts(self.path)


@dataclass(frozen=True)
class TaskSequence:
    """A task sequence: its steps and the version of each package it references.

    ``boot_image`` says whether the task sequence references a boot image (an OS deployment
    rather than an in-place upgrade), which gates starting it over a CMG before 2006.
    """

    package_id: str
    name: str
    steps: tuple[Step, ...]
    package_versions: dict[str, int] = field(default_factory=dict)
    boot_image: bool = False
    #: Task sequence variables set before the first step (collection or device variables).
    variables: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        back_to_pe = [s.name for s in self.steps if s.restart_to == RestartTo.WINPE]
        if back_to_pe and not self.boot_image:
            msg = (
                f"task sequence {self.package_id}: step {back_to_pe[0]!r} restarts to the boot "
                "image assigned to this task sequence, and it has none: set boot_image=True, or "
                f"restart to the installed operating system (restart_to={RestartTo.OS!r})"
            )
            raise InvalidValueError(msg)

    def version_of(self, package_id: str) -> int:
        return self.package_versions.get(package_id, 1)

    def content(self) -> set[tuple[str, int]]:
        """Every ``(package ID, version)`` a step of the sequence uses."""
        return {(p, self.version_of(p)) for step in self.steps for p in step.packages}

    def applied_os(self, steps_run: list[str]) -> bool:
        """Whether an operating system was applied (an Upgrade Operating System step ran to
        its end) among ``steps_run``, the names of the steps run so far."""
        done = set(steps_run)
        return any(s.action == UPGRADE_OS and s.name in done for s in self.steps)

    @property
    def restarts(self) -> bool:
        """Whether a step restarts the computer (Restart Computer, or an upgrade with Setup)."""
        return any(s.action == RESTART_COMPUTER or s.setup is not None for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The sequence as JSON data (what the persisted state keeps of it): lists, not tuples,
        so it reads back equal."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSequence:
        """The sequence :meth:`to_dict` gave."""
        steps = tuple(
            Step(
                **{
                    **step,
                    "conditions": tuple(Condition(**c) for c in step["conditions"]),
                    "extra_packages": tuple(step["extra_packages"]),
                    "setup": Setup(**step["setup"]) if step["setup"] else None,
                }
            )
            for step in data["steps"]
        )
        return cls(**{**data, "steps": steps})


@dataclass(frozen=True)
class PackageTransfer:
    """What obtaining one package cost: bytes read from storage (0 when the cache served it)."""

    package_id: str
    version: int
    files: int
    bytes: int
    seconds: float
    from_cache: bool
    #: The content provider that delivered it (``SMSTSDownloadProgram``'s program, or a Python
    #: provider's class name); ``None`` for the built-in download and the cache.
    provider: str | None = None


@dataclass(frozen=True)
class ProviderRun:
    """One package handed to a content provider, and how it ended.

    ``outcome`` is ``delivered`` (exit 0 and verified), ``refused`` (exit 0, but the folder
    did not verify: 0x80091007), ``aborted`` (the abort code), or ``fell back`` (any other exit,
    a timeout or an exception: the built-in download was tried next). ``exit_code`` is None
    when the provider raised or did not return an int. ``left`` is what a provider that fell
    back or aborted left in its destination (relative paths, at most :data:`_LEFT_SHOWN`): a
    failed download must leave nothing, and the engine removes it, so it is recorded before.
    """

    package_id: str
    version: int
    provider: str
    exit_code: int | None
    outcome: _Outcome
    left: tuple[str, ...] = ()
    #: When the provider was handed the package, and when it returned (``time.monotonic``):
    #: what a test matches against server logs to tell the provider's requests apart.
    started: float = 0.0
    ended: float = 0.0


@dataclass
class TaskSequenceResult:
    exit_code: int
    steps_run: list[str]
    transfers: list[PackageTransfer]
    failed_step: str | None = None
    error: ContentError | None = None
    #: Every package handed to a content provider (``SMSTSDownloadProgram``), in order.
    provider_runs: list[ProviderRun] = field(default_factory=list)
    #: Keys of the task sequence cache's content when the sequence ended, before the cache was
    #: emptied: what ``SMSTSPersistContent`` and Download Package Content kept for the run.
    ts_cache: list[str] = field(default_factory=list)
    #: Set when this boot ended because the computer restarts (``restart_computer``, ``setup``):
    #: the state is persisted and :meth:`TaskSequenceEngine.resume` continues the sequence.
    restart: str | None = None
    #: Restarts of the sequence so far.
    reboots: int = 0
    #: Where the run put things, as the Windows client names them (``C:\\...``): the client
    #: cache (``client_cache``) and the path variables the run set. Filled when the sequence
    #: ends, in the last boot: a reader in another process (the ``client`` command) gets them.
    paths: dict[str, str] = field(default_factory=dict)
    #: The task sequence variables when the sequence ended (filled with ``paths``).
    variables: dict[str, str] = field(default_factory=dict)

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0

    def bytes_from_storage(self, package_id: str) -> int:
        return sum(t.bytes for t in self.transfers if t.package_id == package_id)


StepPhase = Literal["start", "end"]
StepOutcome = Literal["succeeded", "failed", "skipped"]


@dataclass(frozen=True)
class StepEvent:
    """A step boundary of a running task sequence: what the engine's step hook (``on_step``)
    receives.

    ``start`` comes just before the step, before its condition is evaluated (where the engine
    logs ``Start executing an instruction``), so a step that is then skipped starts too.
    ``end`` comes when the step is over, with its ``outcome``: ``"succeeded"``, ``"failed"``
    (``exit_code`` is its error, e.g. ``0x80091007`` for a hash mismatch) or ``"skipped"`` (its
    condition was false; exit code 0). Each step that starts ends once, except that a boot cut
    off mid-step by a power cut never ends it (the next boot starts it again), and a step that
    hands over to Windows Setup ends in the boot where Setup hands the machine back. A Restart
    Computer step ends (succeeded) before the computer restarts.
    """

    #: The step's place in the task sequence, from 0 (the product's instruction pointer).
    index: int
    name: str
    phase: StepPhase
    #: At ``end``: how the step ended; None at ``start``.
    outcome: StepOutcome | None = None
    exit_code: int = 0
