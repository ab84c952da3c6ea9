"""What an earlier run left in the staging folder, and what a failed try leaves for the next.

``download()`` called again on a staging folder re-hashes each file already at its final name
(:func:`take_leftover`) and keeps it only if its SHA-256 matches the manifest, except a file this
core verified and renamed itself in a try that failed and that is still the same file
(:class:`Carried`); with ``fsync=True`` the renames and folders of a download are made durable
at its end (:func:`sync_folders`). The rules are in :mod:`pytest_cmg._client.download`'s
docstring; the emulation choice in docs/emulation.md, "Leftovers in the staging folder".
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from . import _journal
from ._job import PART, Identity, identity

if TYPE_CHECKING:
    from .._protocol.manifest import ManifestFile
    from ._job import Run
    from .download import DownloadCore

__all__ = ["Carried", "discard", "rehash", "sync_folders", "take_leftover"]

#: Failed downloads (folders) whose verified files a core remembers for the next try.
_MAX_CARRIED = 16


class Carried:
    """Files of failed downloads that this core verified and renamed, by staging folder.

    The engine retries a download given up on transient errors into the same staging folder
    (SMSTSDownloadRetryCount): the files finished in a try that failed were hashed by this
    process, so the next try trusts their digest as long as the file is, by inode, size and
    times, the one this core renamed. Anything else (another process, a power cut) is re-hashed.
    """

    def __init__(self) -> None:
        #: dest -> relpath -> (digest computed then, identity of the file right after).
        self._folders: dict[str, dict[str, tuple[str, Identity]]] = {}
        self._lock = threading.Lock()

    def take(self, dest: str) -> dict[str, tuple[str, Identity]]:
        """What a failed try into ``dest`` left (forgotten here: a new failure keeps anew)."""
        with self._lock:
            return self._folders.pop(dest, {})

    def keep(self, run: Run) -> None:
        """Keep what this failed download verified, for the next try into the same folder."""
        kept: dict[str, tuple[str, Identity]] = {}
        with run.lock:
            digests = dict(run.digests)
        for relpath, digest in digests.items():
            try:
                st = os.lstat(f"{run.dest_str}/{relpath}")
            except OSError:
                continue
            kept[relpath] = (digest, identity(st))
        with self._lock:
            self._folders.pop(run.dest_str, None)
            if kept:
                self._folders[run.dest_str] = kept
            # Bounded: only the latest few failed folders are worth remembering (the oldest go).
            while len(self._folders) > _MAX_CARRIED:
                del self._folders[next(iter(self._folders))]


def sync_folders(run: Run) -> None:
    """Make every rename and every new folder of the download durable (``fsync=True``)."""
    folders = set()
    for folder in run.dirs:
        path = Path(folder)
        while path != run.dest and run.dest in path.parents:
            folders.add(path)
            path = path.parent
    folders.add(run.dest)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        _journal.fsync_dir(path)


def take_leftover(core: DownloadCore, run: Run, item: ManifestFile, buf: memoryview) -> bool:
    """Whether ``item`` is already at its final name, verified from its bytes here.

    A final name left by an earlier run proves nothing by itself: that run may have been
    killed, the power may have gone before the kernel wrote the pages (``fsync=False``), or
    anything may have written there since. So the file is read back and re-hashed, and only
    a SHA-256 that matches the manifest lets it stay; any other file there (wrong size,
    other bytes, a link) is deleted and fetched again. The exception is a file this core
    verified and renamed itself in a try that failed (``run.carried``), still the same file.
    """
    target = f"{run.dest_str}/{item.relpath}"
    part = target + PART
    try:
        # O_NOFOLLOW: a link at a final name is not a file this core wrote.
        fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            discard(core, item, target, "is a symbolic link")
        return False  # a folder, say: not ours, and the rename will fail and say so
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return False  # not ours: the rename will fail and say so
        if st.st_size != item.size:
            os.close(fd)
            fd = -1
            discard(core, item, target, f"has {st.st_size} bytes, the manifest {item.size}")
            return False
        carried = run.carried.get(item.relpath)
        reused = carried is not None and carried[1] == identity(st)
        actual: str | None
        if carried is not None and reused:
            actual = carried[0]  # computed by this process when it renamed this very file
            how = "computed by this process in an earlier try"
        else:
            began = time.perf_counter()
            actual = rehash(fd, item.size, buf)
            how = "re-computed from disk"
            with run.lock:
                run.rehashed += item.size
                run.rehash_seconds += time.perf_counter() - began
    finally:
        if fd >= 0:
            os.close(fd)
    if actual is None:
        discard(core, item, target, "changed size while it was re-hashed")
        return False
    if actual != item.sha256.lower():
        discard(core, item, target, f"has SHA-256 {actual} ({how}), the manifest {item.sha256}")
        return False
    # A journal left between an earlier run's rename and its deletion (and any .part beside
    # a verified file) has nothing more to give.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(part)  # noqa: PTH108
    _journal.remove(Path(part + _journal.SUFFIX))
    run.verified(item.relpath, actual)
    with run.lock:
        run.skipped += 1
        run.reused += reused
    if core.on_progress is not None:
        core.on_progress(item.size, 0)
        core.on_progress(0, 1)
    return True


def rehash(fd: int, size: int, buf: memoryview) -> str | None:
    """SHA-256 of the ``size`` bytes of ``fd``; None if it holds fewer or more bytes."""
    digest = hashlib.sha256()
    position = 0
    # Reads up to one byte past ``size``: enough to see a file longer than it should be.
    while position <= size:
        n = os.preadv(fd, [buf[: min(len(buf), size + 1 - position)]], position)
        if n <= 0:
            break
        digest.update(buf[:n])
        position += n
    # The size was checked just before; a file that changed meanwhile cannot match.
    return digest.hexdigest() if position == size else None


def discard(core: DownloadCore, item: ManifestFile, target: str, why: str) -> None:
    core.on_event(
        f"{item.relpath}: found at its final name from an earlier run but {why}: "
        "deleted, fetching it again"
    )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)  # noqa: PTH108
