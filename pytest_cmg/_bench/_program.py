"""The ``program`` case: a download program (``--download-program``) run as the task sequence
runs an alternate content provider (``SMSTSDownloadProgram``).

Per workload and round the program is handed the workload's package exactly as the engine hands
it: :class:`~pytest_cmg._client.acp.ProgramProvider` writes the INI (``render_ini``) and runs
``<program> <ini> <PackageID> <destination>`` in its own process group. The INI's location is a
real fake CMG (``FakeCMG``, HTTPS on 127.0.0.1) in front of the bench's Azurite, whose workload
containers are laid out as a cloud DP's (``_workloads.py``): the program fetches the manifest
through the gateway with the content access token, then the blobs the other cases read. The
location request that gives that token is made before the clock starts, as the engine makes it
before it starts the program.

Timed: from just before the program is started (its INI written) to its exit, taken from
SIGCHLD rather than from ``ProgramProvider``'s polling, which notices an exit up to 50 ms late.
CPU is the program's (and its reaped children's) from ``RUSAGE_CHILDREN``. The destination is
then read as the engine reads what a provider delivered (:func:`read_folder`: links and special
files are never content) and compared file by file with the workload's manifest, untimed. A
program that exits non-zero, times out, or delivers anything else fails the run.
"""

from __future__ import annotations

import resource
import shlex
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

from .._client.acp import (
    TOKEN_AUTH_FOR_ACP_SINCE,
    ProgramProvider,
    ProviderRequest,
    ProviderTimeout,
    locate_program,
    read_folder,
)
from .._errors import InvalidValueError, PytestCmgError
from .._util.service import Service
from ._cases import Sample, server_cpu_seconds
from ._workloads import VERSION, package_id

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import FrameType
    from typing import Any, Self

    from .._client.cmg import CMGClient
    from .._gateway.server import FakeCMG
    from .._storage.azurite import BlobEndpoint
    from .._storage.clouddp import CloudDP
    from ._cases import CaseContext
    from ._workloads import Dataset

__all__ = ["PROGRAM_TIMEOUT", "ProgramFailed", "ProgramGateway", "check_program"]

#: Seconds one run may take before its process group is killed: the memory probe's bound (the
#: engine's hour would leave a hung program holding the bench for that long).
PROGRAM_TIMEOUT = 600.0
#: The client the gateway issues the CCM token to.
_CLIENT_ID = "GUID:pytest-cmg-bench"
#: Lines of the program's output kept to explain a failure.
_OUTPUT_TAIL = 20
#: Files named in a failure message, of each kind.
_SHOWN = 5


class ProgramFailed(PytestCmgError):
    """The download program did not deliver the workload: the benchmark cannot go on."""


def check_program(text: str) -> str:
    """``--download-program``: ``text``, checked; ``ValueError`` saying the fix (argparse puts
    the option's name before it).

    The rules of conformance mode's ``--cmg-download-program``: split as a POSIX shell would
    (as ``ProgramProvider`` splits it), and the first word an executable file when it is a path
    or else found on PATH. The text is run as given, from the current folder (the bench does
    not change it): a path is not resolved, so a virtual environment's ``python`` link stays
    the environment's interpreter.
    """
    try:
        argv = shlex.split(text)
    except ValueError as error:
        msg = f"{text!r} cannot be split into arguments ({error}); quote it as a POSIX shell would"
        raise InvalidValueError(msg) from None
    if not argv:
        msg = 'no program given; name one, e.g. "python3 examples/acp/acp.py"'
        raise InvalidValueError(msg)
    try:
        # Run from the current folder (the bench does not change it), so checked against it.
        locate_program(argv[0], Path.cwd())
    except ValueError as error:
        msg = f"{text!r}: {error}"
        raise InvalidValueError(msg) from None
    ProgramProvider(text)  # what the engine accepts, whatever is checked above
    return text


class _ExitClock(Service):
    """When a child of this process exited, from SIGCHLD, over a ``with`` block.

    The handler runs in the main thread, which waits in ``ProgramProvider``'s polling sleep:
    the signal cuts that sleep short, so the time is the exit's, not the next poll's. Outside
    the main thread no handler can be set, and :meth:`exited` gives ``None``.
    """

    def __init__(self) -> None:
        self._times: list[float] = []
        self._previous: Callable[[int, FrameType | None], Any] | int | signal.Handlers | None = None
        self._installed = False

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self._times.append(time.perf_counter())

    def start(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGCHLD, self._note)
            self._installed = True

    def stop(self) -> None:
        if self._installed:
            # None: the previous handler was not set from Python; the default is what it was.
            previous = signal.SIG_DFL if self._previous is None else self._previous
            signal.signal(signal.SIGCHLD, previous)
            self._installed = False

    def exited(self) -> float | None:
        """The last child exit seen (the program is the only child that exits meanwhile)."""
        return self._times[-1] if self._times else None


class ProgramGateway(Service):
    """A fake CMG serving the workloads to a download program, and the program's runs.

    :meth:`start` starts the gateway (a site at the version from which token-authentication
    sources are offered to an ACP) and the client that asks it for content locations;
    :meth:`serve` attaches a workload's container as the cloud DP; :meth:`run` is the case.
    """

    def __init__(self, program: str, endpoint: BlobEndpoint, workdir: Path) -> None:
        self.program = program
        self.endpoint = endpoint
        self.workdir = workdir
        self._cmg: FakeCMG | None = None
        self._client: CMGClient | None = None
        self._dp: CloudDP | None = None

    def start(self) -> Self:
        from .._client.cmg import CMGClient
        from .._client.factory import connection_for
        from .._client.log import SmstsLog
        from .._gateway.server import FakeCMG
        from .._protocol.settings import CmgSettings

        cmg = FakeCMG(workdir=self.workdir / "gateway")
        (self.workdir / "gateway").mkdir(parents=True, exist_ok=True)
        cmg.start()
        self._cmg = cmg
        # SMSTSAllowTokenAuthURLForACP=true is honoured from 2203: the site says it is one.
        cmg.configure(settings=CmgSettings(site_version=TOKEN_AUTH_FOR_ACP_SINCE))
        # A token client, as the engine is when it runs a program with token authentication.
        connection = connection_for(cmg, _CLIENT_ID, "token")
        self._client = CMGClient(connection, SmstsLog(self.workdir / "smsts.log"))
        return self

    @property
    def url(self) -> str:
        assert self._cmg is not None
        return self._cmg.url

    def serve(self, dataset: Dataset) -> None:
        """Attach the workload's container as the gateway's cloud DP."""
        from .._storage.clouddp import CloudDP

        assert self._cmg is not None
        self.release()
        self._dp = CloudDP(self.endpoint, dataset.container)
        self._cmg.configure(cloud_dp=self._dp)

    def release(self) -> None:
        """Close the connections of the current workload's cloud DP (its blobs stay)."""
        if self._dp is not None:
            self._dp.close()
            self._dp = None

    def stop(self) -> None:
        self.release()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._cmg is not None:
            self._cmg.stop()
            self._cmg = None

    # --- one run -------------------------------------------------------------------------

    def request(self, dataset: Dataset, destination: Path) -> ProviderRequest:
        """The engine's request for the workload's package (``TaskSequenceEngine._provide``
        with ``SMSTSAllowTokenAuthURLForACP=true``): a location request through the gateway,
        and every record offered, the cloud one with what fetching its manifest takes."""
        from .._client.cmg import offered_location

        assert self._client is not None
        client = self._client
        package = package_id(dataset.workload)
        reply = client.locate(package, VERSION)
        locations = [offered_location(client, record) for record in reply.records]
        if not any(location.token_auth for location in locations):
            msg = f"the fake CMG offered no cloud location for {package}: {self._service_log()}"
            raise ProgramFailed(msg)
        return ProviderRequest(
            package_id=package,
            version=VERSION,
            package_hash=reply.package_hash.upper(),
            destination=destination,
            locations=tuple(locations),
            site_code=client.connection.site_code,
            client_id=client.connection.client_id,
            site_version=TOKEN_AUTH_FOR_ACP_SINCE,
            storage_ca_file=self.endpoint.ca_cert
            if self.endpoint.url.startswith("https:")
            else None,
        )

    def _service_log(self) -> str:
        lines = self._cmg.service_lines if self._cmg is not None else []
        return lines[-1] if lines else "no service log line"

    def run(self, ctx: CaseContext) -> Sample:
        """The ``program`` case: run the program on ``ctx.dest``, time it, check what it wrote."""
        workload = ctx.dataset.workload.name
        request = self.request(ctx.dataset, ctx.dest)
        tail: deque[str] = deque(maxlen=_OUTPUT_TAIL)
        provider = ProgramProvider(self.program, timeout=PROGRAM_TIMEOUT, on_output=tail.append)
        named = f"the download program {self.program!r} on workload {workload}"

        def output() -> str:
            return "; its last output: " + " | ".join(tail) if tail else "; it printed nothing"

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        server = server_cpu_seconds(ctx.server_pid)
        with _ExitClock() as clock:
            started = time.perf_counter()
            try:
                code = provider.fetch(request)
            except ProviderTimeout:
                msg = f"{named} did not exit within {PROGRAM_TIMEOUT:g} s: killed{output()}"
                raise ProgramFailed(msg) from None
            except OSError as error:
                msg = f"{named} could not be started: {error}"
                raise ProgramFailed(msg) from None
            returned = time.perf_counter()
        exited = clock.exited()
        seconds = (exited if exited is not None and exited >= started else returned) - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_now = server_cpu_seconds(ctx.server_pid)
        if self._cmg is not None:
            self._cmg.check()  # a gateway handler's own failure is the bench's, not the program's
        if code != 0:
            ended = f"was ended by signal {-code}" if code < 0 else f"exited {code}"
            msg = f"{named} {ended}, not 0 with every file written{output()}"
            raise ProgramFailed(msg)
        self._verify(ctx, named)
        cpu = (after.ru_utime - children.ru_utime) + (after.ru_stime - children.ru_stime)
        return Sample(
            seconds,
            cpu,
            None if server is None or server_now is None else server_now - server,
        )

    @staticmethod
    def _verify(ctx: CaseContext, named: str) -> None:
        """What the program left in the destination against the manifest, file by file."""
        content = read_folder(ctx.dest)
        expected = {f.relpath: (f.size, f.sha256.lower()) for f in ctx.dataset.manifest.files}
        missing = sorted(set(expected) - set(content.files))
        extra = sorted(set(content.files) - set(expected))
        wrong = sorted(
            r for r in set(expected) & set(content.files) if content.files[r] != expected[r]
        )
        problems = [
            f"{len(found)} {kind} ({', '.join(found[:_SHOWN])}{', ...' if len(found) > _SHOWN else ''})"
            for kind, found in (
                ("missing", missing),
                ("unexpected", extra),
                ("with a wrong size or SHA-256", wrong),
                ("not regular files (links, special files)", content.refused),
            )
            if found
        ]
        if problems:
            msg = (
                f"{named} exited 0, but its destination is not the package's "
                f"{len(expected)} file(s): {'; '.join(problems)}. A download program must write "
                "exactly the package's files, byte for byte, and nothing else"
            )
            raise ProgramFailed(msg)
