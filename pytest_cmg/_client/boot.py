"""Every boot of a restarting computer as a process of its own (docs/emulation.md, "Restarts").

A task sequence that restarts the computer (a Restart Computer step, Windows Setup's restarts,
a power cut scripted in a scenario's timeline) must not keep anything in memory from one boot to
the next: what survives is what the engine persisted on disk (``tsenv.py``, the download
journal, the caches). So each boot runs the engine in a new process (``multiprocessing``'s
``spawn``: a fresh interpreter), built by the one factory (:func:`.factory.build_engine`).

What stays in the parent, the machine's "outside world", is served to the boot over a pipe:

* the clock and the waits (``clock``, ``sleep``, ``pass_time``), so retry waits, token lifetimes
  and the log's times stay on one virtual time across boots;
* the engine's step hook (``on_step``: each :class:`~.engine.StepEvent` is sent to the parent,
  which calls its own hook and answers when it returns), so timeline entries at a step boundary
  fire in the parent, before the boot goes on.

:class:`BootHost` starts the boots one after the other, passes the time a restart takes between
them, and can cut the power (:meth:`BootHost.power_cut`: the boot is killed by its pid, and
nothing it did not persist survives). The last boot sends its result over the pipe.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import signal
import threading
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ContentError, PytestCmgError
from .log import SmstsLog, wall_clock
from .retry import RetryPolicy, SiteClock
from .sequence import PackageTransfer, ProviderRun, TaskSequenceResult

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess

    from .._protocol.settings import ClientSettings, DeploymentSettings
    from .cmg import CMGConnection
    from .engine import StepEvent
    from .sequence import TaskSequence

__all__ = ["MAX_BOOTS", "BootError", "BootHost", "BootSpec"]

#: Boots of one run at most: Setup's restarts and Restart Computer steps are few; a loop is a bug.
MAX_BOOTS = 32


class BootError(PytestCmgError):
    """A boot process failed, hung, or the boots never ended."""


@dataclass(frozen=True)
class BootSpec:
    """What every boot of one client is built from (picklable: it crosses to the process)."""

    connection: CMGConnection
    folder: Path
    sequence: TaskSequence
    launch: str
    cache_mb: int
    settings: ClientSettings | None = None
    deployment: DeploymentSettings | None = None
    site_version: int | None = None
    storage_ca_file: Path | None = None
    #: The site clock's origin: log lines carry ``start + virtual seconds``.
    start: datetime | None = None
    #: Seeds the retry jitter, as a scenario's seed does in-process.
    seed: int = 0
    #: The download core's checkpoint spacing (``DownloadCore``); None: the core's defaults.
    journal_bytes: int | None = None
    journal_seconds: float | None = None
    #: The client cache's folder and the log file; None: ``folder/ccmcache``, ``folder/smsts.log``.
    cache_root: Path | None = None
    log_path: Path | None = None
    #: The download core's ``fsync`` (durable against a power cut, not only a killed process).
    fsync: bool = False

    @property
    def log_file(self) -> Path:
        return self.log_path if self.log_path is not None else self.folder / "smsts.log"


class _Remote:
    """The boot's side of the pipe: each call is answered by the parent, one at a time."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    def call(self, kind: str, *args: Any) -> Any:  # noqa: ANN401 - the parent's answer
        with self._lock:
            self._conn.send((kind, *args))
            status, value = self._conn.recv()
        if status != "ok":
            msg = f"the parent refused {kind}{args}: {value}"
            raise BootError(msg)
        return value

    def clock(self) -> float:
        return float(self.call("clock"))

    def sleep(self, seconds: float) -> None:
        self.call("sleep", seconds)

    def on_step(self, event: StepEvent) -> None:
        self.call("on_step", event)


def _boot(spec: BootSpec, conn: Connection) -> None:
    """One boot (the child process): resume the persisted sequence, or start it."""
    from .cache import ClientCache
    from .factory import build_engine

    remote = _Remote(conn)
    try:
        clock: Callable[[], datetime] = (
            wall_clock if spec.start is None else SiteClock(spec.start, remote.clock).now
        )
        log = SmstsLog(spec.log_file, clock)
        retry = RetryPolicy(sleep=remote.sleep, clock=remote.clock, rng=random.Random(spec.seed))
        extra: dict[str, Any] = {}
        if spec.site_version is not None:
            extra["site_version"] = spec.site_version
        if spec.cache_root is not None:
            extra["cache"] = ClientCache(spec.cache_root, spec.cache_mb)
        engine = build_engine(
            spec.connection,
            spec.folder,
            log=log,
            cache_mb=spec.cache_mb,
            settings=spec.settings,
            deployment=spec.deployment,
            retry=retry,
            storage_ca_file=spec.storage_ca_file,
            journal_bytes=spec.journal_bytes,
            journal_seconds=spec.journal_seconds,
            fsync=spec.fsync,
            on_step=remote.on_step,
            **extra,
        )
        engine.persist = True
        engine.client.clock = clock
        try:
            result = engine.resume() or engine.run(spec.sequence, spec.launch)
        finally:
            engine.close()
        with remote._lock:
            conn.send(("result", _to_wire(result)))
    except BaseException:
        with contextlib.suppress(OSError), remote._lock:
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _drop_torn_tail(log: Path) -> None:
    """After a power cut, the log line the boot was writing, if it was cut short, goes: each
    line is written whole with its line end, so text after the last line end is torn."""
    try:
        with log.open("rb+") as handle:
            data = handle.read()
            if data and not data.endswith(b"\n"):
                handle.truncate(data.rfind(b"\n") + 1)
    except FileNotFoundError:
        return


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (Linux ``/proc``; none found elsewhere), bounded in number."""
    found: list[int] = []
    todo = [pid]
    while todo and len(found) < 1000:
        parent = todo.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                if child not in found:
                    found.append(child)
                    todo.append(child)
    return found


def _to_wire(result: TaskSequenceResult) -> dict[str, Any]:
    error = result.error
    # Not through asdict: an exception does not deep-copy; its code and text cross instead.
    wire = asdict(replace(result, error=None))
    wire["error"] = None if error is None else (error.hresult, str(error), error.resumable)
    return wire


def _from_wire(wire: dict[str, Any]) -> TaskSequenceResult:
    error = wire.pop("error")
    result = TaskSequenceResult(**wire)
    result.transfers = [PackageTransfer(**t) for t in wire["transfers"]]
    result.provider_runs = [
        ProviderRun(**{**r, "left": tuple(r["left"])}) for r in wire["provider_runs"]
    ]
    if error is not None:
        hresult, text, resumable = error
        # The text already starts with the code; ContentError adds it again otherwise.
        result.error = ContentError(hresult, text.partition(": ")[2], resumable=resumable)
    return result


def _ignore(event: StepEvent) -> None:
    """No hook in the parent: the boot's step events are answered and dropped."""


class BootHost:
    """Runs the boots of one computer, each a process, and serves them the parent's time.

    ``clock``/``sleep``/``pass_time`` are the parent's virtual time, ``on_step`` the engine's
    step hook, called in the parent for every step event of every boot (a scenario's timeline);
    ``restart_takes`` the virtual seconds a restart takes. ``timeout`` is the wall-clock bound
    of one boot.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        pass_time: Callable[[float], None],
        on_step: Callable[[StepEvent], None] | None = None,
        restart_takes: float = 120.0,
        timeout: float = 600.0,
    ) -> None:
        self._calls: dict[str, Callable[..., Any]] = {
            "clock": clock,
            "sleep": sleep,
            "on_step": on_step if on_step is not None else _ignore,
        }
        self.pass_time = pass_time
        self.restart_takes = restart_takes
        self.timeout = timeout
        self._lock = threading.Lock()
        self._process: BaseProcess | None = None
        self._cut = False
        #: One line per boot: how it ended (what a failed scenario shows).
        self.boots: list[str] = []
        #: Power cuts made (:meth:`power_cut`).
        self.power_cuts = 0
        #: The process id of each boot, in order.
        self.pids: list[int] = []

    def run(
        self, spec: BootSpec, connection: Callable[[], CMGConnection] | None = None
    ) -> TaskSequenceResult:
        """Boot until the sequence ends; the last boot's result (reboots counted).

        ``connection``, when given, is asked for each boot after the first: what the device
        gets from outside the client at each start (an Azure AD device token at sign-in).
        """
        for number in range(1, MAX_BOOTS + 1):
            if number > 1 and connection is not None:
                spec = replace(spec, connection=connection())
            result = self._boot(spec, number)
            if result is not None and result.restart is None:
                return result
            # The machine is down: time passes (tokens may expire meanwhile).
            self.pass_time(self.restart_takes)
        msg = (
            f"client in {spec.folder}: the task sequence restarted the computer {MAX_BOOTS} "
            "times without ending (rule: a run ends after a bounded number of boots); fix the "
            "scenario's restarts, or the engine's resume"
        )
        raise BootError(msg)

    def power_cut(self) -> None:
        """Cut the power: kill the running boot by its pid (nothing unsaved survives), and the
        processes it started (an alternate content provider), as a power cut stops them all."""
        with self._lock:
            process = self._process
            if process is None or not process.is_alive() or process.pid is None:
                return
            self._cut = True
            self.power_cuts += 1
        pid = process.pid
        # Frozen first, so it starts nothing more while its descendants are found and killed.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        for child in _descendants(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        process.kill()
        process.join(10.0)

    def _boot(self, spec: BootSpec, number: int) -> TaskSequenceResult | None:
        """One boot; its result, or None when the power was cut."""
        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=_boot, args=(spec, theirs), name=f"boot-{number}", daemon=True
        )
        with self._lock:
            self._cut = False
            self._process = process
        process.start()
        assert process.pid is not None  # started
        self.pids.append(process.pid)
        theirs.close()
        wire: dict[str, Any] | None = None
        failure: str | None = None
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if not ours.poll(0.2):
                    if not process.is_alive() and not ours.poll(0):
                        break
                    continue
                try:
                    kind, *args = ours.recv()
                except (EOFError, OSError):
                    break  # the boot ended (or was killed)
                if kind == "result":
                    wire = args[0]
                elif kind == "error":
                    failure = str(args[0])
                else:
                    self._answer(ours, kind, args)
            else:
                process.kill()
                msg = (
                    f"boot {number} of the client in {spec.folder} ran longer than "
                    f"{self.timeout:g}s (rule: every boot is bounded in wall time); see its "
                    "smsts.log for where it stopped"
                )
                raise BootError(msg)
        finally:
            process.join(10.0)
            if process.is_alive():
                process.kill()
                process.join(10.0)
            ours.close()
            with self._lock:
                self._process = None
                cut = self._cut
        if failure is not None and not cut:
            msg = f"boot {number} of the client in {spec.folder} failed:\n{failure}"
            raise BootError(msg)
        if wire is not None:
            result = _from_wire(wire)
            self.boots.append(f"boot {number}: " + (result.restart or "ended"))
            return result
        if cut:
            _drop_torn_tail(spec.log_file)
            self.boots.append(f"boot {number}: power cut")
            return None
        msg = (
            f"boot {number} of the client in {spec.folder} ended with exit code "
            f"{process.exitcode} and no result (rule: a boot ends by a restart, the end of the "
            "sequence, or a scripted power cut); see its smsts.log"
        )
        raise BootError(msg)

    def _answer(self, conn: Connection, kind: str, args: list[Any]) -> None:
        call = self._calls.get(kind)
        try:
            if call is None:
                msg = f"no such call: {kind}"
                raise BootError(msg)
            reply: tuple[str, Any] = ("ok", call(*args))
        except Exception as exc:  # handed to the boot, which raises it
            reply = ("error", f"{type(exc).__name__}: {exc}")
        # A power cut while answering (a restart at this step) leaves nobody to answer.
        with contextlib.suppress(OSError):
            conn.send(reply)
