"""The scripted client: locates content through the CMG and runs task sequences like TSManager.

Flow for one package (docs/emulation.md, "One on-demand download")::

    cache lookup -> [miss] CCM_POST ContentLocationRequest through the CMG (token auth)
    -> cloud location record + access token -> GET getcontentxmlsecure (manifest, SAS URLs)
    -> room in the cache (evict or fail) -> download core (streaming SHA-256 per file)
    -> package hash check -> cache commit

The lookup-to-commit part runs under the cache's download lock for that content, so concurrent
requests for it (threads or processes) make one download (``_client/cache.py``).

Where content goes (docs/emulation.md, "Task sequence content locations"): in the full OS a step's
package goes to the client cache (ccmcache); in Windows PE, where there is no ccmexec and so no
client cache, to the task sequence cache (``_SMSTaskSequence/Packages``, ``tscache.py``). A
Download Package Content step may name its destination (:class:`ContentDestination`): the task
sequence directory, the client cache (not in Windows PE) or a custom path (downloaded to the task
sequence directory, then moved to ``<path>/<PackageID>``). Content in the task sequence cache is
deleted after the step that used it unless ``SMSTSPersistContent`` is true, and the whole cache
when the sequence ends; client cache entries the sequence downloaded are released then (eligible
for deletion) unless ``SMSTSPreserveContent`` is true, which pins what the sequence uses.

With an alternate content provider (the task sequence variable ``SMSTSDownloadProgram``, or a
Python ``provider``), located content is handed to it first (``acp.py``): it writes into a hidden
folder of the store's staging area, and what it delivered with exit 0 is hashed from disk and its
package hash checked against the location reply before one rename commits it where the built-in
download would have put it. ``SMSTSDownloadAbortCode`` fails the download; any other failure falls
back to the built-in download.

Log lines reuse the product's wording (docs/emulation.md, "Failure codes and log lines") so
scenarios can match them the way administrators search smsts.log.

This module holds the engine and its run loop (steps, content resolution, the caches); the task
sequence model is ``sequence.py``, the gateway client ``cmg.py``, and three of the engine's jobs
are functions it takes as methods: restarts (``_restarts.py``), the content provider's turn
(``_providers.py``) and the built-in download (``_fetch.py``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .._errors import ContentError
from .._protocol import codes
from .._protocol.settings import (
    CURRENT_SITE_VERSION,
    DeploymentSettings,
    DownloadMode,
    LaunchContext,
    launch_refusal,
)
from .._protocol.winpath import windows_path
from . import _ending, _fetch, _providers, _restarts, tsenv
from ._ending import PRESERVE_CONTENT
from ._providers import PROGRAM_OUTPUT
from ._restarts import _POST_UPGRADE
from .acp import (
    DEFAULT_TIMEOUT,
    E_ABORT,
)
from .cache import CacheEntry
from .cmg import CMGClient, CMGConnection, offered_location
from .download import DownloadCore, redact
from .sequence import (
    DOWNLOAD_PACKAGE_CONTENT,
    RESTART_COMPUTER,
    Condition,
    ContentDestination,
    PackageTransfer,
    ProviderRun,
    Setup,
    Step,
    StepEvent,
    StepOutcome,
    StepPhase,
    TaskSequence,
    TaskSequenceResult,
    _int_variable,
    _true,
    custom_path_parts,
)
from .tscache import WORKING_DIRECTORY, TaskSequenceCache, place
from .tsenv import SetupState

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .._protocol.location import LocationRecord
    from .acp import ContentProvider
    from .cache import ClientCache, Lease
    from .log import SmstsLog
    from .retry import RetryPolicy

__all__ = [
    "PROGRAM_OUTPUT",
    "CMGClient",
    "CMGConnection",
    "Condition",
    "ContentDestination",
    "PackageTransfer",
    "ProviderRun",
    "Setup",
    "Step",
    "StepEvent",
    "TaskSequence",
    "TaskSequenceEngine",
    "TaskSequenceResult",
    "offered_location",
]

#: The program cannot run at this time because the client is on the internet.
_NOT_ALLOWED_ON_INTERNET = 0x87D01018
#: E_FAIL: what an unsupported launch over a CMG ends with (no code is published; emulation).
_UNSUPPORTED_LAUNCH = 0x80004005
#: E_FAIL again: a custom download path that cannot be written (emulation).
_E_FAIL = 0x80004005
#: REGDB_E_CLASSNOTREG: no ccmexec (and so no client cache) in Windows PE; benign, as public
#: smsts.log samples from boot media show it (docs/emulation.md, "Failure codes and log lines").
_NO_CACHE_MANAGER = 0x80040154
#: Variables the product defines with defaults (Microsoft Learn: Task sequence variables).
_DEFAULT_VARIABLES = {"SMSTSDownloadRetryCount": "2", "SMSTSDownloadRetryDelay": "15"}
#: Not retried by the task sequence: wrong or oversized content would come back the same, a
#: failed content location fails the step at once in the public smsts.log samples
#: (docs/emulation.md, "Failure codes and log lines"), and an
#: alternate content provider's abort code means "no other download method" (E_ABORT).
_NOT_RETRIED = frozenset(
    {codes.HASH_MISMATCH, codes.CACHE_TOO_SMALL, codes.CACHE_FULL, codes.NO_LOCATIONS, E_ABORT}
)
#: Writes that fail because the disk (or the user's quota) is full: "cache full" (0x87D01201).
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: ERROR_DISK_FULL as an HRESULT: what BITS reports when it cannot write a file.
_HR_DISK_FULL = 0x80070070
#: E_INVALIDARG: a custom download path that would land inside a cache.
_HR_INVALID_ARG = 0x80070057

PERSIST_CONTENT = "SMSTSPersistContent"
LAST_LOCATION = "_SMSTSLastContentDownloadLocation"
#: The task sequence working folder, as the client sees it (``C:\\_SMSTaskSequence``).
DATA_PATH = "_SMSTSMDataPath"
#: Variables whose values are client paths, whatever they hold (:meth:`client_paths`).
_PATH_VARIABLES = (DATA_PATH, LAST_LOCATION)


def _drive_of(cache_root: Path) -> Path:
    """The system drive of a client cache: ``C:`` holds ``C:\\Windows\\ccmcache``.

    A cache elsewhere (a test's own folder) keeps the older rule: its parent is the drive.
    """
    parent = cache_root.parent
    if cache_root.name.lower() == "ccmcache" and parent.name.lower() == "windows":
        return parent.parent
    return parent


class TaskSequenceEngine:
    """Runs a task sequence on a client on the internet, getting content through the CMG."""

    def __init__(
        self,
        client: CMGClient,
        cache: ClientCache,
        log: SmstsLog,
        deployment: DeploymentSettings | None = None,
        download_core: DownloadCore | None = None,
        *,
        retry: RetryPolicy | None = None,
        site_version: int = CURRENT_SITE_VERSION,
        ts_cache: TaskSequenceCache | None = None,
        system_drive: Path | None = None,
        provider: ContentProvider | None = None,
        download_program_timeout: float = DEFAULT_TIMEOUT,
        storage_ca_file: Path | None = None,
        on_step: Callable[[StepEvent], None] | None = None,
    ) -> None:
        """``ts_cache`` is the task sequence cache (default: ``_SMSTaskSequence`` beside the
        client cache, made on first use); ``system_drive`` is the folder custom download paths
        are below (default: the folder holding the client cache, as C: holds the product's).

        ``provider`` is a Python content provider (``acp.ContentProvider``) each package is
        handed to before the built-in download, as to the program of ``SMSTSDownloadProgram``;
        when a task sequence sets that variable, its program is used instead.
        ``download_program_timeout`` is the seconds that program may run before its process
        group is killed; ``storage_ca_file`` the private CA of HTTPS storage, named to providers.
        ``on_step`` is called at each step's start and end (:class:`StepEvent`), in the thread
        running the sequence, which waits for it: a scenario's timeline fires its ``before_step``
        entries there.
        """
        self.client = client
        #: The site's version, as the client knows it from policy; it gates launch contexts.
        self.site_version = site_version
        self.launch = LaunchContext.SOFTWARE_CENTER
        #: Whether this boot runs in Windows PE (``_SMSTSInWinPE``): from the launch at the
        #: start, then where each restart went (a Restart Computer step's ``restart_to``).
        self.in_windows_pe = False
        self.cache = cache
        self.log = log
        self.deployment = deployment or DeploymentSettings()
        self.core = download_core or DownloadCore(
            retry=retry, on_event=lambda line: log.info("DataTransferService", line)
        )
        self.variables: dict[str, str] = {}
        self.transfers: list[PackageTransfer] = []
        self.provider_runs: list[ProviderRun] = []
        #: Cache entries this engine holds (in use: never evicted), one lease per entry: keyed
        #: by (in the task sequence cache, entry key).
        self._leases: dict[tuple[bool, str], Lease] = {}
        self.system_drive = system_drive if system_drive is not None else _drive_of(cache.root)
        # The client keeps each CCM token it gets the moment it gets it: a power cut in the
        # step that got it must not lose it (tsenv.CCM_TOKEN_FILE says why).
        drive = self.system_drive
        client.on_ccm_token = lambda token: tsenv.save_ccm_token(drive, token)
        self._ts_cache = ts_cache
        #: Of this run: client cache entries it downloaded (released at its end unless
        #: preserved), those it pinned, and task sequence cache content kept to its end.
        self._downloaded: set[str] = set()
        self._pinned: set[str] = set()
        self._kept: set[str] = set()
        #: Every (package ID, version) the running sequence uses (set when it starts or resumes).
        self._sequence_content: set[tuple[str, int]] = set()
        self.provider = provider
        self.download_program_timeout = download_program_timeout
        self.storage_ca_file = storage_ca_file
        #: ``on_job(package_id, version, files, total_bytes)``: a package download begins
        #: (with the core's ``on_progress``, enough to draw a progress bar).
        self.on_job: Callable[[str, int, int, int], None] | None = None
        #: Persist the state at every step boundary (``tsenv.py``), so a power cut at any
        #: moment resumes at the step it cut. Always on for a sequence with a restart step.
        self.persist = False
        #: Restarts of the running sequence so far.
        self.reboots = 0
        #: The step hook (see ``__init__``); may be set or replaced before a run.
        self.on_step = on_step

    def close(self) -> None:
        self.release_content()
        self.core.close()
        self.client.close()

    @property
    def ts_cache(self) -> TaskSequenceCache:
        """The task sequence cache (its folder is made on first use)."""
        if self._ts_cache is None:
            self._ts_cache = TaskSequenceCache(
                self.system_drive / WORKING_DIRECTORY, lock_timeout=self.cache.lock_timeout
            )
        return self._ts_cache

    def release_content(self, key: str | None = None) -> None:
        """Stop holding the cache entry ``key`` (every entry by default): it may be evicted again."""
        for held in [k for k in self._leases if key is None or k[1] == key]:
            self._leases.pop(held).release()

    def _keep(self, lease: Lease) -> CacheEntry:
        held = (lease.cache is self._ts_cache, lease.entry.key)
        if held in self._leases:
            lease.release()  # already held: one lease per entry is enough
        else:
            self._leases[held] = lease
        return lease.entry

    def _unhold(self, store: ClientCache, key: str) -> None:
        lease = self._leases.pop((store is self._ts_cache, key), None)
        if lease is not None:
            lease.release()

    def windows(self, path: Path) -> str:
        """``path`` as the client sees it (``C:\\...``): the one rule of ``winpath``."""
        return windows_path(path, self.system_drive)

    def _set(self, name: str, value: str) -> None:
        self.variables[name] = value
        self.log.info("TSManager", f"Set a global environment variable {name}={value}")

    def run(
        self, sequence: TaskSequence, launch: str = LaunchContext.SOFTWARE_CENTER
    ) -> TaskSequenceResult:
        """Run ``sequence``; the content it uses is held in the cache while it needs it.

        On demand, a step holds its package for the step; with "download all content locally
        before starting", every package is held from its download to the end of the sequence
        (eviction cannot take one package to make room for the next). When the sequence ends,
        however it ends, the task sequence cache is emptied and the client cache entries it
        downloaded are released, unless ``SMSTSPreserveContent`` pinned them.
        """
        return self._ended(lambda: self._run(sequence, launch))

    def resume(self) -> TaskSequenceResult | None:
        """Continue the sequence a previous boot left in the working directory (``tsenv.py``).

        Returns None when there is none: the computer was not restarted by a sequence. Whatever
        lived in the previous boot's memory is gone; what it persisted is read back, as
        TSManager reads TSEnv.dat when it starts after a restart.
        """
        state = tsenv.load(self.system_drive / WORKING_DIRECTORY)
        if state is None:
            return None
        return self._ended(lambda: self._resume(state))

    def _ended(self, body: Callable[[], TaskSequenceResult]) -> TaskSequenceResult:
        """``body``'s result, with the content work of the end of the sequence done, unless the
        computer restarts (then the state stays for the next boot and content stays on disk)."""
        try:
            result = body()
        except BaseException:
            self._end_content()
            raise
        result.reboots = self.reboots
        if result.restart is not None:
            self.release_content()
            return result
        result.ts_cache = self._end_content()
        result.paths = self.client_paths()
        result.variables = dict(self.variables)
        tsenv.remove(self.system_drive / WORKING_DIRECTORY)
        return result

    def client_paths(self) -> dict[str, str]:
        """Where the run put things, as the Windows client names them: the client cache and
        the path variables set (those that name a ``C:\\`` path, and the two below, whatever
        they hold)."""
        paths = {"client_cache": self.windows(self.cache.root)}
        paths.update(
            (name, value)
            for name, value in self.variables.items()
            if name in _PATH_VARIABLES or value.startswith("C:\\")
        )
        return paths

    _end_content = _ending._end_content

    def _run(self, sequence: TaskSequence, launch: str) -> TaskSequenceResult:
        self.transfers = []
        self.provider_runs = []
        self.reboots = 0
        steps_run: list[str] = []
        ts = "TSManager"
        self.log.info(
            ts, f"Starting task sequence {sequence.name} ({sequence.package_id}) from {launch}"
        )
        self.launch = launch
        self.in_windows_pe = launch in LaunchContext.IN_WINDOWS_PE
        self._sequence_content = sequence.content()
        refusal = launch_refusal(self.site_version, launch, boot_image=sequence.boot_image)
        if refusal:
            self.log.error(ts, f"This task sequence cannot run from {launch}: {refusal}")
            return self._fail(None, ContentError(_UNSUPPORTED_LAUNCH, refusal), steps_run)
        if not self.deployment.allow_internet:
            error = ContentError(
                _NOT_ALLOWED_ON_INTERNET,
                "The program cannot run at this time because the client is on the internet",
            )
            return self._fail(None, error, steps_run)
        self.variables = {**_DEFAULT_VARIABLES, **sequence.variables}
        on_demand = self.deployment.download_mode == DownloadMode.ON_DEMAND
        self._set("_SMSTSDownloadOnDemand", "true" if on_demand else "false")
        self._set(DATA_PATH, self.windows(self.system_drive / WORKING_DIRECTORY))
        self._environment()
        if not on_demand:
            # "Download all content locally before starting": every referenced package, before
            # the first step, whatever the steps' conditions (docs/emulation.md, "Settings and
            # task sequence variables").
            first = {p: s for s in reversed(sequence.steps) for p in s.packages}
            for package_id in dict.fromkeys(p for s in sequence.steps for p in s.packages):
                try:
                    self._resolve_with_retries(
                        package_id,
                        sequence.version_of(package_id),
                        self._store_for(first[package_id], quiet=True),
                    )
                except ContentError as error:
                    return self._fail(None, error, steps_run)
        return self._steps(sequence, 0, steps_run)

    def _steps(
        self, sequence: TaskSequence, start: int, steps_run: list[str]
    ) -> TaskSequenceResult:
        """Run the steps from the ``start``-th on; ``steps_run`` has those run before."""
        ts = "TSManager"
        on_demand = self.deployment.download_mode == DownloadMode.ON_DEMAND
        for index in range(start, len(sequence.steps)):
            step = sequence.steps[index]
            if self.persist or sequence.restarts:
                # Before the step: a power cut while it runs starts it again on the next boot.
                self._save(sequence, index, steps_run)
            self.log.info(
                ts,
                f"Start executing an instruction. Instruction name: {step.name}. "
                f"Instruction pointer: {index}",
            )
            self._step_event(index, step.name, "start")
            failing = next((c for c in step.conditions if not c.holds(self.variables)), None)
            if failing is not None:
                self.log.info(
                    ts,
                    f"The condition for the action ({step.name}) is evaluated to be false "
                    f"({failing})",
                )
                self._step_event(index, step.name, "end", "skipped")
                continue
            if step.action == RESTART_COMPUTER:
                return self._restart_computer(sequence, index, steps_run)
            try:
                for number, package_id in enumerate(step.packages, start=1):
                    self._step_content(
                        step, package_id, sequence.version_of(package_id), on_demand, number
                    )
            except ContentError as error:
                self._step_event(index, step.name, "end", "failed", error.hresult)
                return self._fail(step.name, error, steps_run)
            if step.setup is not None:
                self.log.info(
                    ts,
                    f"{step.name}: Windows Setup takes over the upgrade; it runs "
                    f"{_POST_UPGRADE}\\SetupComplete.cmd when it succeeds and "
                    f"{_POST_UPGRADE}\\SetupRollback.cmd when it rolls back",
                )
                setup = SetupState(
                    index, step.setup.restarts - 1, step.setup.result, step.setup.code
                )
                return self._restart(sequence, index, steps_run, "setup", setup)
            steps_run.append(step.name)
            self.log.info(
                ts, f"Successfully completed the action ({step.name}) with the exit win32 code 0"
            )
            self._step_event(index, step.name, "end", "succeeded")
        self.log.info(ts, "Task sequence completed 0x00000000")
        return TaskSequenceResult(
            0, steps_run, list(self.transfers), provider_runs=list(self.provider_runs)
        )

    def _step_event(
        self,
        index: int,
        name: str,
        phase: StepPhase,
        outcome: StepOutcome | None = None,
        exit_code: int = 0,
    ) -> None:
        """Tell the step hook, if there is one (also called from ``_restarts.py``)."""
        if self.on_step is not None:
            self.on_step(StepEvent(index, name, phase, outcome, exit_code))

    # --- restarts (_restarts.py) ---------------------------------------------------------------

    _state = _restarts._state
    _save = _restarts._save
    _restart = _restarts._restart
    _restart_computer = _restarts._restart_computer
    _resume = _restarts._resume
    _environment = _restarts._environment

    def _step_content(
        self, step: Step, package_id: str, version: int, on_demand: bool, number: int
    ) -> None:
        """Obtain one of a step's packages (the ``number``-th) where the step wants it, run the
        step with it, then let it go."""
        key = f"{package_id}.{version}"
        store = self._store_for(step)
        # Checked before any byte is fetched: a path the step cannot use fails it at once.
        target = self._custom_destination(step, package_id)
        # Content the task sequence cache held before this step is not this step's to move.
        was_there = target is not None and self.ts_cache.lookup(package_id, version) is not None
        entry = self._resolve_with_retries(package_id, version, store)
        from_ts = self._ts_cache is not None and entry.path.parent == self._ts_cache.root
        used = entry
        if target is not None:
            used = self._place(entry, target, move=not was_there)
        elif from_ts and step.action == DOWNLOAD_PACKAGE_CONTENT:
            # Placed there on purpose, for later steps: it stays until the sequence ends.
            self._kept.add(key)
        self._execute(step, used)
        if step.variable:
            self._set(f"{step.variable}{number:02d}", self.windows(used.path))
        if on_demand or from_ts:
            self._unhold(self.ts_cache if from_ts else self.cache, key)
        if from_ts and (target is None or was_there):
            self._after_step(package_id, version)

    def _after_step(self, package_id: str, version: int) -> None:
        """Content a step used from the task sequence cache goes, unless it is kept for the run."""
        key = f"{package_id}.{version}"
        if key in self._kept:
            return
        ts = "TSManager"
        if _true(self.variables, PERSIST_CONTENT):
            self._kept.add(key)
            self.log.info(
                ts, f"{PERSIST_CONTENT} is set: content {key} stays in the task sequence cache"
            )
            return
        self._unhold(self.ts_cache, key)
        entry = self.ts_cache.lookup(package_id, version)
        if entry is not None and self.ts_cache.remove(entry):
            self.log.info(
                ts,
                f"Deleting content {key} from the task sequence cache: the step that used it "
                f"is done ({PERSIST_CONTENT} is not set)",
            )

    def _store_for(self, step: Step, *, quiet: bool = False) -> ClientCache:
        """Where ``step``'s package is downloaded to: the client cache or the task sequence's."""
        destination = step.destination if step.action == DOWNLOAD_PACKAGE_CONTENT else None
        if destination in (ContentDestination.TS_CACHE, ContentDestination.CUSTOM):
            return self.ts_cache
        if self.in_windows_pe:
            if destination == ContentDestination.CLIENT_CACHE and not quiet:
                self.log.info(
                    "TSManager",
                    f"{step.name}: the client cache is not available in Windows PE; the content "
                    "goes to the task sequence working directory",
                )
            return self.ts_cache
        return self.cache

    def _custom_destination(self, step: Step, package_id: str) -> Path | None:
        """``<system drive>/<path>/<PackageID>`` for a custom destination, else ``None``."""
        if step.destination != ContentDestination.CUSTOM or step.path is None:
            return None
        destination = self.system_drive.joinpath(*custom_path_parts(step.path), package_id)
        for inside in (self.cache.root, self.ts_cache.working_directory):
            if destination.resolve().is_relative_to(inside.resolve()):
                self.log.error(
                    "TSManager",
                    f"{step.name}: the custom path {step.path} is inside a cache "
                    f"({self.windows(inside)})",
                )
                raise ContentError(
                    _HR_INVALID_ARG,
                    f"custom download path {step.path!r} is inside a cache ({self.windows(inside)})",
                )
        return destination

    def _place(self, entry: CacheEntry, destination: Path, *, move: bool) -> CacheEntry:
        """Download Package Content to a custom path: the package folder goes to
        ``destination``, moved out of the task sequence cache (copied when it was there before
        this step, for another use)."""
        how = "Moved" if move else "Copied"
        try:
            if move:
                self._unhold(self.ts_cache, entry.key)
                self.ts_cache.take(entry, destination)
            else:
                place(entry.path, destination, move=False)
        except OSError as error:
            hr = codes.CACHE_FULL if error.errno in _DISK_FULL else _E_FAIL
            self.log.error(
                "TSManager",
                f"Failed to place content {entry.key} at {self.windows(destination)}: "
                f"{error.strerror} "
                f"(0x{hr:08X})",
            )
            where = self.windows(destination)
            raise ContentError(hr, f"{entry.key} could not be placed at {where}") from error
        self.log.info(
            "TSManager",
            f"{how} content {entry.key} from the task sequence working directory to "
            f"{self.windows(destination)}",
        )
        return CacheEntry(entry.package_id, entry.version, destination)

    def _resolve_with_retries(
        self, package_id: str, version: int, into: ClientCache | None = None
    ) -> CacheEntry:
        """``resolve`` repeated as ``SMSTSDownloadRetryCount`` and ``SMSTSDownloadRetryDelay`` say.

        Content that is wrong (hash mismatch) or cannot fit is not retried: another try would
        fetch the same bytes into the same cache. A try that gave up on transient errors leaves
        its verified prefix in staging, so the next try continues from it (as a BITS job keeps
        its progress); after the last try, staging is emptied (no partial outlives a terminal
        failure, docs/reliability.md row 18).
        """
        count = _int_variable(self.variables, "SMSTSDownloadRetryCount", 2)
        delay = _int_variable(self.variables, "SMSTSDownloadRetryDelay", 15)
        store = into if into is not None else self._default_store()
        attempt = 0
        while True:
            try:
                return self._resolve_on_disk(package_id, version, store)
            except ContentError as error:
                if attempt >= count or error.hresult in _NOT_RETRIED:
                    if error.resumable:
                        store.discard_staging(package_id, version)
                    raise
                attempt += 1
                self.log.info(
                    "TSManager",
                    f"Content download for {package_id}:{version} failed "
                    f"(0x{error.hresult:08X}); retry {attempt} of {count} in {delay} seconds",
                )
                self.core.retry.sleep(float(delay))

    def _resolve_on_disk(
        self, package_id: str, version: int, into: ClientCache | None
    ) -> CacheEntry:
        """``resolve``, with a full disk (ENOSPC at any write) reported as "cache full"."""
        store = into if into is not None else self._default_store()
        try:
            return self.resolve(package_id, version, into=store)
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            # By now ClientCache.staging has removed the partial download; committed entries
            # were never written to and stay as they were.
            self.log.error(
                "DataTransferService",
                f"Failed to write content {package_id}.{version} under {self.windows(store.root)}: "
                f"There is not enough space on the disk. (0x{_HR_DISK_FULL:08X})",
            )
            self._download_failed(package_id, version, codes.CACHE_FULL)
            raise ContentError(
                codes.CACHE_FULL, f"{package_id}.{version}: the disk is full ({error.strerror})"
            ) from error

    def _fail(
        self, step: str | None, error: ContentError, steps_run: list[str]
    ) -> TaskSequenceResult:
        ts = "TSManager"
        if step is not None:
            self.log.error(ts, f"Failed to run the action: {step}. Error 0x{error.hresult:08X}")
        self.log.error(ts, f"Task sequence execution failed with error code 0x{error.hresult:08X}")
        return TaskSequenceResult(
            error.hresult,
            steps_run,
            list(self.transfers),
            step,
            error,
            provider_runs=list(self.provider_runs),
        )

    def _execute(self, step: Step, entry: CacheEntry) -> None:
        # Steps are simulated: what the harness checks is that the verified content was there,
        # at the location the product would hand the step.
        files = sum(1 for p in entry.path.rglob("*") if p.is_file())
        self.log.info(
            "TSManager",
            f"{step.action}: using content {entry.key} at {self.windows(entry.path)} "
            f"({files} files)",
        )
        self._set(LAST_LOCATION, self.windows(entry.path))

    def _default_store(self) -> ClientCache:
        in_pe = self.in_windows_pe
        return self.ts_cache if in_pe else self.cache

    def resolve(
        self, package_id: str, version: int, *, into: ClientCache | None = None
    ) -> CacheEntry:
        """Return the verified cache entry for a package version, downloading it if needed.

        Content already in the task sequence cache is used from there; the client cache is looked
        up (outside Windows PE) when it is where the content would go. Otherwise the content is
        downloaded ``into`` the client cache (the default; the task sequence cache in Windows PE)
        or the task sequence cache.

        The engine holds the entry (a cache lease: it cannot be evicted) until
        :meth:`release_content`; ``run`` releases what it resolved. A write that finds the disk
        full raises ``OSError`` here; ``run`` reports it as 0x87D01201. A download given up on
        transient errors raises a ``resumable`` :class:`ContentError` and keeps its verified
        prefix in the store's staging: calling ``resolve`` again continues from it, and
        ``ClientCache.discard_staging`` drops it.
        """
        store = into if into is not None else self._default_store()
        cm = "CacheManager"
        self.log.info("TSManager", f"Resolving local content for {package_id}:{version}")
        self.log.info(cm, f"Getting cached content information for {package_id}.{version}")
        in_pe = self.in_windows_pe
        if in_pe:
            # No ccmexec in Windows PE: the product logs this and goes on to locate the content
            # (and there is no client cache to look in, or to download to).
            self.log.info(
                "TSManager",
                "Failed to create instance of of ICacheManager. Is ccmexec running?, "
                f"hr=0x{_NO_CACHE_MANAGER:08x}",
            )
        cached = self._from_ts_cache(package_id, version)
        if cached is None and store is self.cache and not in_pe:
            cached = self._from_cache(package_id, version)
        if cached is not None:
            return cached

        def waiting() -> None:
            self.log.info(
                cm,
                f"Content {package_id}.{version} is being downloaded by another request; "
                "waiting for it to finish",
            )

        # One download per content, across threads and processes (docs/reliability.md row 41): the
        # others wait here, then find the entry it committed without touching the network.
        with store.download_lock(package_id, version, on_wait=waiting):
            cached = (
                self._from_cache(package_id, version)
                if store is self.cache
                else self._from_ts_cache(package_id, version)
            )
            if cached is not None:
                return cached
            return self._locate_and_download(package_id, version, store)

    def _from_cache(self, package_id: str, version: int) -> CacheEntry | None:
        lease = self.cache.acquire(package_id, version)
        if lease is None:
            return None
        entry = self._keep(lease)
        self.log.info(
            "CacheManager",
            f"Content {package_id}.{version} found in cache at {self.windows(entry.path)}",
        )
        self._preserve(entry)
        self.transfers.append(PackageTransfer(package_id, version, 0, 0, 0.0, from_cache=True))
        return entry

    def _from_ts_cache(self, package_id: str, version: int) -> CacheEntry | None:
        # Looked up only once something made the cache: a full-OS run that never needed it
        # leaves no folder behind.
        if self._ts_cache is None:
            return None
        lease = self._ts_cache.acquire(package_id, version)
        if lease is None:
            return None
        entry = self._keep(lease)
        self.log.info(
            "TSManager",
            f"Content {package_id}.{version} found in the task sequence cache at "
            f"{self.windows(entry.path)}",
        )
        self.transfers.append(PackageTransfer(package_id, version, 0, 0, 0.0, from_cache=True))
        return entry

    def _preserve(self, entry: CacheEntry) -> None:
        """With ``SMSTSPreserveContent``, pin client cache content the sequence uses."""
        if entry.key in self._pinned or not _true(self.variables, PRESERVE_CONTENT):
            return
        self.cache.pin(entry)
        self._pinned.add(entry.key)
        self.log.info(
            "CacheManager",
            f"Pinned content {entry.key} in the cache: it is kept after the task sequence "
            f"({PRESERVE_CONTENT})",
        )

    def _locate_and_download(self, package_id: str, version: int, store: ClientCache) -> CacheEntry:
        try:
            reply = self.client.locate(package_id, version)
        except ContentError as error:
            self._no_location(package_id, version, error)
        self.log.info("TSManager", f"Processing {len(reply.records)} locations.")
        usable: LocationRecord | None = None
        for record in reply.records:
            self.log.info(
                "LocationServices",
                f"Distribution Point='{redact(record.url)}', Locality='{record.locality}', "
                f"Version='{record.version}', DPType='{record.dp_type}'",
            )
            # In reply order; on the internet only the cloud source is reachable: an intranet
            # DP is skipped without a connection attempt (emulation, docs/emulation.md).
            if usable is None and record.is_cloud:
                usable = record
            elif not record.is_cloud:
                self.log.info(
                    "LocationServices",
                    f"Skipping distribution point '{record.server_remote_name}': the client is "
                    "on the internet and cannot reach an intranet distribution point",
                )
        chosen = self._content_provider()
        if chosen is not None:
            provided = self._provide(*chosen, package_id, version, reply, store)
            if provided is not None:
                return provided
        if usable is None:
            self.log.info("TSManager", "No static content server.")
            self._no_location(package_id, version, None)
        return self._download(package_id, version, reply, usable, store)

    # --- the alternate content provider (acp.py) ----------------------------------------------

    _content_provider = _providers._content_provider
    _abort_code = _providers._abort_code
    _offered = _providers._offered
    _provide = _providers._provide
    _verify_provided = _providers._verify_provided

    # --- the built-in download (_fetch.py) -----------------------------------------------------

    _no_location = _fetch._no_location
    _download = _fetch._download
    _committed = _fetch._committed
    _computed_package_hash = _fetch._computed_package_hash
    _hashes_match = _fetch._hashes_match
    _hash_verified = _fetch._hash_verified
    _hash_mismatch = _fetch._hash_mismatch
    _publish = _fetch._publish
    _make_room = _fetch._make_room
    _no_room = _fetch._no_room
    _log_usage = _fetch._log_usage
    _log_evictions = _fetch._log_evictions
    _download_failed = _fetch._download_failed
