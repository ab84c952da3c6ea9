"""Azurite, the real Azure blob emulator, as the storage behind the fake CMG: the backends.

Three backends hand out the same :class:`BlobEndpoint`:

* ``process`` (default): Azurite's blob service as a child process of this Python process,
  in memory, on 127.0.0.1 and an OS-chosen port. Node and the pinned npm package are provisioned
  on first use into a per-user cache (:func:`~pytest_cmg._storage.provision.ensure_azurite`).
* ``container``: testcontainers' Azurite module, for machines that have a Docker engine.
* ``external``: an Azurite or a real storage account somebody else runs, given by a
  connection string.

The process backend serves plain HTTP by default: the storage fault proxy and the egress meter
speak HTTP only, and TLS would cost every download CPU for nothing the tests check. With
``https=True`` it serves HTTPS (Azurite's ``--cert``/``--key``) with a server certificate from a
test CA of :mod:`pytest_cmg._net.pki`; the endpoint's ``ca_cert`` is that CA, which clients
must trust, and SAS URLs then carry ``spr=https`` (docs/reliability.md row 25).

Provisioning Node and the npm package is :mod:`pytest_cmg._storage.provision`; the endpoint
the backends hand out is :mod:`pytest_cmg._storage.endpoint`.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import InvalidValueError, ProvisioningError, ServiceStartError
from .._util.process import spawn_text
from .._util.service import Service
from .endpoint import (
    DEV_ACCOUNT_KEY,
    DEV_ACCOUNT_NAME,
    BlobEndpoint,
    endpoint_from_base,
    parse_connection_string,
)
from .provision import AZURITE_VERSION, NodeRuntime, ensure_azurite, find_node

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import IO

__all__ = [
    # Re-exported: what a backend hands out and the version it runs are asked for here too.
    "AZURITE_VERSION",
    "BACKENDS",
    "AzuriteContainer",
    "AzuriteProcess",
    "BlobEndpoint",
    "ExternalStorage",
    "make_backend",
]

BACKENDS = ("process", "container", "external")

_log = logging.getLogger(__name__)
_SERVICE = "Azurite"

_READY_RE = re.compile(
    r"Azurite Blob service (?:is )?successfully list\w+ (?:on|at) (https?://\S+)"
)
_OUTPUT_KEPT_LINES = 200
_STOP_GRACE_SECONDS = 5.0
_DOCKER_PING_TIMEOUT = 3


# --------------------------------------------------------------------------------------------
# Process backend
# --------------------------------------------------------------------------------------------

# A strong set on purpose: an AzuriteProcess dropped without stop() must still be stopped.
_running: set[AzuriteProcess] = set()


@atexit.register
def _stop_leftovers() -> None:
    # A forgotten stop() would otherwise leave a node process listening after Python exits:
    # with --silent it never writes, so it never notices the closed pipe.
    for proc in list(_running):
        with contextlib.suppress(Exception):
            proc.stop()


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: ask Linux to SIGTERM Azurite when its parent dies.

    atexit does not run when Python is killed (SIGKILL, or SIGTERM with no handler, as when a CI
    job or an xdist worker is cancelled), and Azurite started with --silent never writes, so it
    never notices the closed pipe: without this it would stay listening as an orphan. The signal
    is tied to the spawning *thread*, so start() must be called from a long-lived thread (the
    pytest main thread, or the ``serve`` command's).
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class AzuriteProcess(Service):
    """Azurite blob service as a subprocess: in-memory, 127.0.0.1, OS-chosen port.

    ``https=True`` serves HTTPS with a certificate for 127.0.0.1 and ``localhost`` from a fresh
    test CA (``endpoint.ca_cert``), kept in a temporary folder removed by :meth:`stop`.
    """

    def __init__(
        self,
        *,
        startup_timeout: float = 60.0,
        extra_args: Sequence[str] = (),
        node: NodeRuntime | None = None,
        main_js: Path | None = None,
        https: bool = False,
    ) -> None:
        self.startup_timeout = startup_timeout
        self.https = https
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None
        self._ca_cert: Path | None = None
        self.extra_args = list(extra_args)
        self._node = node
        self._main_js = main_js
        self._command: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=_OUTPUT_KEPT_LINES)
        self._lines_lock = threading.Lock()
        self._ready = threading.Event()
        self._ready_url: str | None = None
        self._endpoint: BlobEndpoint | None = None

    @property
    def pid(self) -> int | None:
        """Pid of the running Azurite, None before start() and after stop()."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    @property
    def command(self) -> list[str]:
        """The command line of the last start() (empty before the first one)."""
        return list(self._command)

    @property
    def endpoint(self) -> BlobEndpoint | None:
        return self._endpoint

    def output_tail(self, n: int = 50) -> str:
        with self._lines_lock:
            lines = list(self._lines)
        return "\n".join(lines[-n:]) if n > 0 else ""

    def _build_command(self) -> list[str]:
        node = self._node or find_node()
        main_js = self._main_js or ensure_azurite(node)
        return [
            str(node.node),
            str(main_js),
            "--inMemoryPersistence",
            "--silent",
            "--loose",
            # New azure-storage-blob releases send an x-ms-version Azurite does not know yet.
            "--skipApiVersionCheck",
            # Telemetry is on by default since 3.34 and would phone home from CI.
            "--disableTelemetry",
            "--blobHost",
            "127.0.0.1",
            # Port 0: parallel workers and other emulators never collide on 10000.
            "--blobPort",
            "0",
            *self._tls_args(),
            *self.extra_args,
        ]

    def _tls_args(self) -> list[str]:
        if not self.https:
            return []
        import ipaddress

        from pytest_cmg._net.pki import CertificateAuthority

        if self._tls_dir is None:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="pytest-cmg-azurite-tls-")
        folder = Path(self._tls_dir.name)
        ca = CertificateAuthority("pytest-cmg storage CA")
        server = ca.issue(
            folder,
            "127.0.0.1",
            usage="server",
            dns_names=("localhost",),
            ip_addresses=(ipaddress.IPv4Address("127.0.0.1"),),
            file_stem="azurite",
        )
        self._ca_cert = ca.write_pem(folder / "storage-ca.pem")
        return ["--cert", str(server.cert), "--key", str(server.key)]

    def _read_output(self, stream: IO[str]) -> None:
        # Keeps draining after readiness too, so Azurite never blocks on a full pipe.
        for raw in stream:
            line = raw.rstrip("\r\n")
            with self._lines_lock:
                self._lines.append(line)
            if not self._ready.is_set():
                match = _READY_RE.search(line)
                if match:
                    self._ready_url = match.group(1)
                    self._ready.set()
        stream.close()

    def start(self) -> BlobEndpoint:
        if self._endpoint is not None and self.pid is not None:
            return self._endpoint
        self._command = self._build_command()
        self._lines.clear()
        self._ready.clear()
        self._ready_url = None
        env = dict(os.environ)
        # It would replace devstoreaccount1, whose key is what the endpoint hands out.
        env.pop("AZURITE_ACCOUNTS", None)
        try:
            proc = spawn_text(
                self._command,
                env=env,
                line_buffered=True,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        except OSError as exc:
            reason = f"could not spawn: {exc}"
            raise ServiceStartError(_SERVICE, self._command, reason, "") from exc
        self._proc = proc
        _running.add(self)
        self._reader = threading.Thread(
            target=self._read_output,
            args=(proc.stdout,),
            name=f"azurite-output-{proc.pid}",
            daemon=True,
        )
        self._reader.start()

        deadline = time.monotonic() + self.startup_timeout
        while not self._ready.wait(0.05):
            code = proc.poll()
            if code is not None:
                # Let the reader collect what the process printed on its way out.
                self._reader.join(timeout=2.0)
                reason = f"it exited with code {code} before reporting that it listens"
                break
            if time.monotonic() >= deadline:
                reason = (
                    f"no readiness line within the startup timeout of {self.startup_timeout:g} s"
                )
                break
        else:
            assert self._ready_url is not None
            self._endpoint = endpoint_from_base(self._ready_url, "process", self._ca_cert)
            return self._endpoint

        self._kill()
        raise ServiceStartError(_SERVICE, self._command, reason, self.output_tail())

    def _kill(self) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        self._join_reader()
        _running.discard(self)

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=2.0)
            self._reader = None

    def stop(self) -> None:
        proc = self._proc
        self._endpoint = None
        try:
            self._stop_process(proc)
        finally:
            if self._tls_dir is not None:
                self._tls_dir.cleanup()
                self._tls_dir = None
                self._ca_cert = None

    def _stop_process(self, proc: subprocess.Popen[str] | None) -> None:
        if proc is None:
            return
        # Popen.send_signal/kill do nothing once the child is reaped, so a recycled pid is
        # never signalled.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                # Azurite waits for idle keep-alive connections to close before exiting.
                _log.debug("Azurite pid %s ignored SIGTERM for %s s", proc.pid, _STOP_GRACE_SECONDS)
                proc.kill()
                proc.wait()
        self._join_reader()
        _running.discard(self)


# --------------------------------------------------------------------------------------------
# Container backend
# --------------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _no_docker(detail: str) -> ProvisioningError:
    return ProvisioningError(
        f"the container backend cannot run Azurite because no Docker engine answers: {detail}. "
        "Start a Docker engine (or point DOCKER_HOST at one), or use --cmg-azurite=process "
        "(the default), which needs only Node, or --cmg-azurite=external with a connection string."
    )


def _not_installed(detail: str) -> ProvisioningError:
    return ProvisioningError(
        f"the container backend needs testcontainers and the Docker SDK, which are not "
        f'installed ({detail}): install them with `pip install "pytest-cmg[container]"`, or use '
        "--cmg-azurite=process (the default), which needs only Node."
    )


class AzuriteContainer(Service):
    """Azurite in a Docker container through testcontainers' Azurite module."""

    def __init__(
        self,
        *,
        image: str = f"mcr.microsoft.com/azure-storage/azurite:{AZURITE_VERSION}",
        startup_timeout: float = 60.0,
    ) -> None:
        self.image = image
        self.startup_timeout = startup_timeout
        self._container: Any = None
        self._endpoint: BlobEndpoint | None = None

    def _check_docker(self) -> None:
        """Two different problems, two messages: the packages are missing (a pip install fixes
        it) or no engine answers (starting Docker, or another backend, fixes it)."""
        try:
            import docker.errors
            from testcontainers.core.docker_client import DockerClient
        except ImportError as exc:
            raise _not_installed(_describe(exc)) from exc
        try:
            # Goes through testcontainers so DOCKER_HOST and ~/.testcontainers.properties are
            # honoured; a short timeout because a missing engine should fail fast.
            client = DockerClient(timeout=_DOCKER_PING_TIMEOUT)
        except (docker.errors.DockerException, OSError, ValueError) as exc:
            # ValueError: a DOCKER_HOST the SDK cannot parse.
            raise _no_docker(_describe(exc)) from exc
        try:
            client.client.ping()
        except (docker.errors.DockerException, OSError) as exc:
            raise _no_docker(_describe(exc)) from exc
        finally:
            with contextlib.suppress(Exception):
                client.client.close()

    def start(self) -> BlobEndpoint:
        if self._endpoint is not None:
            return self._endpoint
        self._check_docker()
        from testcontainers.community.azurite import AzuriteContainer as _TcAzurite
        from testcontainers.core.wait_strategies import LogMessageWaitStrategy

        container = _TcAzurite(
            self.image, account_name=DEV_ACCOUNT_NAME, account_key=DEV_ACCOUNT_KEY
        )
        container.waiting_for(
            LogMessageWaitStrategy(_READY_RE).with_startup_timeout(
                max(int(self.startup_timeout), 1)
            )
        )
        try:
            container.start()
            conn = container.get_connection_string()
        except Exception as exc:
            logs = ""
            with contextlib.suppress(Exception):
                out, err = container.get_logs()
                logs = (out + err).decode("utf-8", "replace")
            with contextlib.suppress(Exception):
                container.stop()
            raise ServiceStartError(
                _SERVICE,
                ["docker", "run", self.image],
                f"{type(exc).__name__}: {exc}",
                "\n".join(logs.splitlines()[-50:]),
            ) from exc
        self._container = container
        blob_url = parse_connection_string(conn).get("blobendpoint", "")
        self._endpoint = BlobEndpoint(
            url=blob_url.rstrip("/"),
            account_name=DEV_ACCOUNT_NAME,
            account_key=DEV_ACCOUNT_KEY,
            backend="container",
        )
        return self._endpoint

    def stop(self) -> None:
        container, self._container, self._endpoint = self._container, None, None
        if container is not None:
            container.stop()


# --------------------------------------------------------------------------------------------
# External backend
# --------------------------------------------------------------------------------------------


class ExternalStorage(Service):
    """A blob service somebody else runs (shared Azurite, real account), by connection string."""

    def __init__(self, connection_string: str) -> None:
        parts = parse_connection_string(connection_string)
        if parts.get("usedevelopmentstorage", "").lower() == "true":
            # The well-known shorthand means the fixed default port of a local Azurite.
            parts.setdefault("accountname", DEV_ACCOUNT_NAME)
            parts.setdefault("accountkey", DEV_ACCOUNT_KEY)
            parts.setdefault("blobendpoint", f"http://127.0.0.1:10000/{DEV_ACCOUNT_NAME}")
        for needed, name in (("accountname", "AccountName"), ("accountkey", "AccountKey")):
            if not parts.get(needed):
                msg = (
                    f"the storage connection string has no {name}, which the fake CMG needs to "
                    "sign SAS URLs (SAS-only connection strings cannot be used)"
                )
                raise ProvisioningError(msg)
        url = parts.get("blobendpoint")
        if not url:
            suffix = parts.get("endpointsuffix")
            if not suffix:
                msg = "the storage connection string has neither BlobEndpoint nor EndpointSuffix"
                raise ProvisioningError(msg)
            protocol = parts.get("defaultendpointsprotocol") or "https"
            url = f"{protocol}://{parts['accountname']}.blob.{suffix}"
        self._endpoint = BlobEndpoint(
            url=url.rstrip("/"),
            account_name=parts["accountname"],
            account_key=parts["accountkey"],
            backend="external",
        )

    def start(self) -> BlobEndpoint:
        return self._endpoint

    def stop(self) -> None:
        """Nothing to stop: the service belongs to someone else."""


def make_backend(
    name: str,
    *,
    connection_string: str | None = None,
    startup_timeout: float = 60.0,
    https: bool = False,
) -> AzuriteProcess | AzuriteContainer | ExternalStorage:
    """The storage backend called ``name`` (one of :data:`BACKENDS`), not yet started.

    ``https`` (process backend only) serves storage over HTTPS with a test CA's certificate;
    an external endpoint is HTTPS when its connection string says so.
    """
    if https and name != "process":
        msg = f"https=True is for the process backend; the {name} backend cannot serve it"
        raise InvalidValueError(msg)
    if name == "process":
        return AzuriteProcess(startup_timeout=startup_timeout, https=https)
    if name == "container":
        return AzuriteContainer(startup_timeout=startup_timeout)
    if name == "external":
        if not connection_string:
            msg = "the external storage backend needs a connection string"
            raise InvalidValueError(msg)
        return ExternalStorage(connection_string)
    msg = f"unknown storage backend {name!r}; choose one of {', '.join(BACKENDS)}"
    raise InvalidValueError(msg)
