"""aria2c for the big-blob comparison: found on PATH or in the cache, or provisioned from Debian.

aria2 is not a dependency of the project and is not on PATH on the machines it was written on.
When asked to (``bench`` does by default, ``pytest --cmg-bench-with-aria2``), its Debian
packages are fetched with ``apt-get download`` and unpacked with ``dpkg-deb -x`` into the
per-user cache (``aria2-<version>`` beside Azurite), with whatever shared libraries they need that
the system lacks; aria2c then runs with ``LD_LIBRARY_PATH``. Nothing is installed system-wide.
When aria2c cannot be had, callers get a reason instead: the case is reported as not available.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .._errors import BenchError
from .._util.cachedir import cache_dir
from .._util.filelock import exclusive_lock

__all__ = ["ARIA2_MODES", "Aria2", "find_aria2", "provision_aria2", "resolve_aria2"]

#: ``auto``: use one found, else provision; ``cached``: use one found, never provision.
ARIA2_MODES = ("auto", "cached", "never")
_PACKAGES = ("aria2", "libaria2-0")
_MARKER = ".pytest-cmg-complete"
#: Bounds the dependency walk: aria2 needs two or three packages beyond a usual Debian.
_MAX_PACKAGES = 25
_STEP_TIMEOUT = 120.0
_VERSION_RE = re.compile(r"aria2 version (\S+)")
#: aria2c honours these; a loopback benchmark must not go through a proxy.
_PROXY_VARS = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")


@dataclass(frozen=True)
class Aria2:
    """An aria2c executable and the library folders it needs."""

    exe: Path
    lib_dirs: tuple[Path, ...]
    version: str
    source: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARS}
        if self.lib_dirs:
            extra = os.pathsep.join(str(d) for d in self.lib_dirs)
            current = env.get("LD_LIBRARY_PATH")
            env["LD_LIBRARY_PATH"] = f"{extra}{os.pathsep}{current}" if current else extra
        return env

    def command(self, folder: Path, name: str, url: str) -> list[str]:
        """The pre-project measurements' ``aria2c -x 8 -s 8`` line; ``--no-conf`` keeps ~/.aria2 out."""
        return [
            str(self.exe),
            "--no-conf",
            "-q",
            "-x",
            "8",
            "-s",
            "8",
            "-k",
            "1M",
            "--file-allocation=falloc",
            "--allow-overwrite=true",
            "--auto-file-renaming=false",
            "--summary-interval=0",
            "-d",
            str(folder),
            "-o",
            name,
            url,
        ]


def _run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """stdout of a command; ``RuntimeError`` with its last output when it fails."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=_STEP_TIMEOUT,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        msg = f"`{' '.join(argv)}` could not run: {exc}"
        raise BenchError(msg) from exc
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        msg = f"`{' '.join(argv)}` exited {proc.returncode}: {tail}"
        raise BenchError(msg)
    return proc.stdout


def _version(exe: Path, lib_dirs: tuple[Path, ...]) -> str:
    probe = Aria2(exe, lib_dirs, "", "")
    out = _run([str(exe), "--version"], env=probe.env())
    match = _VERSION_RE.search(out)
    if match is None:
        msg = f"{exe} --version printed no version"
        raise BenchError(msg)
    return match.group(1)


def find_aria2() -> Aria2 | str:
    """An aria2c on PATH or provisioned in the cache, else why there is none."""
    on_path = shutil.which("aria2c")
    if on_path is not None:
        try:
            return Aria2(Path(on_path), (), _version(Path(on_path), ()), "PATH")
        except RuntimeError as exc:
            return f"aria2c on PATH does not run: {exc}"
    for folder in sorted(cache_dir().glob("aria2-*"), reverse=True):
        marker = folder / _MARKER
        if not marker.is_file():
            continue
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            exe = folder / info["exe"]
            libs = tuple(folder / d for d in info["lib_dirs"])
            version = str(info["version"])
        except (OSError, ValueError, KeyError, TypeError):
            # A marker cut short or edited by hand: not a provisioned aria2, whose marker is
            # written whole before its folder is renamed into place. Passed over, as a folder
            # without one is, rather than a JSON error out of the benchmark.
            continue
        if exe.is_file():
            return Aria2(exe, libs, version, f"cache {folder}")
    return f"aria2c is not on PATH nor provisioned in {cache_dir()}"


def _installed(package: str) -> bool:
    try:
        status = _run(["dpkg-query", "-W", "-f=${Status}", package])
    except RuntimeError:
        return False
    return status.strip().endswith("installed") and "not-installed" not in status


def _depends(deb: Path) -> list[str]:
    field = _run(["dpkg-deb", "-f", str(deb), "Depends"]).strip()
    names = []
    for clause in filter(None, (c.strip() for c in field.split(","))):
        # The first alternative, without its version constraint or architecture qualifier.
        first = clause.split("|", 1)[0].strip()
        names.append(first.split(" ", 1)[0].split(":", 1)[0])
    return names


def provision_aria2(timeout: float = 300.0) -> Aria2 | str:
    """Fetch and unpack aria2 from Debian's packages into the cache; a reason when it cannot."""
    for tool in ("apt-get", "dpkg-deb", "dpkg-query", "ldd"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not available, so aria2 cannot be fetched from Debian packages"
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = root / ".aria2.lock"
        with exclusive_lock(
            lock,
            deadline=time.monotonic() + timeout,
            timed_out=lambda: RuntimeError(f"timed out waiting for {lock}"),
        ):
            found = find_aria2()
            if isinstance(found, Aria2):
                return found
            return _provision(root)
    except (OSError, RuntimeError) as exc:
        return f"provisioning from Debian packages failed: {exc}"


def _provision(root: Path) -> Aria2:
    for stale in root.glob(".aria2.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=".aria2.tmp-", dir=root))
    try:
        debs, tree = staging / "debs", staging / "tree"
        debs.mkdir()
        tree.mkdir()
        queue, seen = list(_PACKAGES), set(_PACKAGES)
        while queue:
            if len(seen) > _MAX_PACKAGES:
                msg = f"aria2 pulls more than {_MAX_PACKAGES} missing packages: {sorted(seen)}"
                raise BenchError(msg)
            package = queue.pop(0)
            before = set(debs.iterdir())
            try:
                _run(["apt-get", "download", "-q", package], cwd=debs)
            except RuntimeError as exc:
                msg = f"{exc} (the package lists may need `apt-get update`)"
                raise BenchError(msg) from exc
            for deb in set(debs.iterdir()) - before:
                _run(["dpkg-deb", "-x", str(deb), str(tree)])
                for dep in _depends(deb):
                    if dep not in seen and not _installed(dep):
                        seen.add(dep)
                        queue.append(dep)
        exe = tree / "usr" / "bin" / "aria2c"
        if not exe.is_file():
            msg = "the aria2 package holds no usr/bin/aria2c"
            raise BenchError(msg)
        lib_dirs = tuple(
            sorted({p.parent for p in tree.rglob("*.so*") if p.is_file() or p.is_symlink()})
        )
        probe = Aria2(exe, lib_dirs, "", "")
        missing = [
            line.strip()
            for line in _run(["ldd", str(exe)], env=probe.env()).splitlines()
            if "not found" in line
        ]
        if missing:
            msg = f"aria2c still lacks shared libraries: {'; '.join(missing)}"
            raise BenchError(msg)
        version = _version(exe, lib_dirs)
        target = root / f"aria2-{version}"
        (tree / _MARKER).write_text(
            json.dumps(
                {
                    "version": version,
                    "exe": str(exe.relative_to(tree)),
                    "lib_dirs": [str(d.relative_to(tree)) for d in lib_dirs],
                    "packages": sorted(seen),
                }
            )
            + "\n",
            encoding="utf-8",
        )
        if target.exists():
            shutil.rmtree(target)
        tree.rename(target)
        libs = tuple(target / d.relative_to(tree) for d in lib_dirs)
        return Aria2(target / exe.relative_to(tree), libs, version, f"cache {target}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def resolve_aria2(mode: str) -> Aria2 | str:
    """aria2c according to ``mode`` (one of :data:`ARIA2_MODES`), or "not available" reason."""
    if mode == "never":
        return "not available: disabled"
    found = find_aria2()
    if isinstance(found, Aria2):
        return found
    if mode == "cached":
        return f"not available: {found} (pass --with-aria2 to fetch it from Debian packages)"
    provisioned = provision_aria2()
    if isinstance(provisioned, Aria2):
        return provisioned
    return f"not available: {provisioned}"
