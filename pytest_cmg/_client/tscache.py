"""The task sequence cache: the packages folder of the task sequence working directory.

The product keeps content it downloads for a running task sequence in its working directory
(``_SMSTaskSequence``), apart from the client cache ``%WinDir%\\ccmcache`` (docs/emulation.md,
"Task sequence content locations"). In
Windows PE there is no ccmexec and so no client cache: every package goes there. Layout::

    <working directory>/                 _SMSTaskSequence (the engine's default)
        Packages/<PKG>.<ver>/            content verified for this run
        Packages/.staging/ .leases/      as in the client cache (``cache.py``)

:class:`TaskSequenceCache` is a :class:`~.cache.ClientCache` (the same staging, atomic commit,
leases and one-download-per-content rules, so a folder there is always verified content), with
what the working directory differs in:

* it has **no size of its own**: only the disk limits it, so :meth:`make_room` never evicts and
  never refuses (a full disk still fails the write, which the engine reports as 0x87D01201);
* content leaves it by :meth:`remove` (after the step that used it, unless
  ``SMSTSPersistContent``), by :meth:`take` (Download Package Content to a custom path moves it
  out) and by :meth:`clear` when the task sequence ends; nothing is ever evicted.
"""

from __future__ import annotations

import fcntl
import shutil
import time
import uuid
from typing import TYPE_CHECKING

from .._util.filelock import unlock as _unlock
from .cache import ClientCache, SpaceReport

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .cache import CacheEntry

__all__ = ["PACKAGES_FOLDER", "WORKING_DIRECTORY", "TaskSequenceCache"]

#: The product's name for the task sequence working directory (on the system drive).
WORKING_DIRECTORY = "_SMSTaskSequence"
#: Where the working directory keeps downloaded packages (product: ``Packages\\<PackageID>``).
PACKAGES_FOLDER = "Packages"
#: Room no download can exceed: the working directory is bounded by the disk, not by a setting.
_UNBOUNDED_MB = 1 << 40


class TaskSequenceCache(ClientCache):
    """Packages of one task sequence run, under ``<working_directory>/Packages``.

    :param working_directory: the task sequence working directory (``_SMSTaskSequence``).
    """

    def __init__(
        self,
        working_directory: Path,
        *,
        clock: Callable[[], float] = time.time,
        lock_timeout: float = 3600.0,
    ) -> None:
        self.working_directory = working_directory
        super().__init__(
            working_directory / PACKAGES_FOLDER,
            _UNBOUNDED_MB,
            keep_minutes=0,
            clock=clock,
            lock_timeout=lock_timeout,
        )

    def make_room(self, package_id: str, version: int, size: int) -> SpaceReport:
        """Nothing to make: the working directory has no size limit and evicts nothing."""
        return SpaceReport(size, self.capacity, 0, len(self.entries()))

    def remove(self, entry: CacheEntry) -> bool:
        """Delete ``entry`` once nobody holds it (waiting up to ``lock_timeout``).

        Returns whether it was there. The entry is renamed out before it is deleted, so a
        half-deleted package is never seen as content.
        """
        fd = self._wait_lock(
            self._lease_path(entry.key), fcntl.LOCK_EX, f"the lease on {entry.key}"
        )
        try:
            if not entry.path.is_dir():
                return False
            self._remove(entry.path)
            return True
        finally:
            _unlock(fd)

    def take(self, entry: CacheEntry, destination: Path) -> None:
        """Move ``entry`` out of the cache to ``destination`` (replaced if it exists).

        The move ends with one rename onto ``destination``, so it is whole or absent; across file
        systems the content is copied next to it first.
        """
        fd = self._wait_lock(
            self._lease_path(entry.key), fcntl.LOCK_EX, f"the lease on {entry.key}"
        )
        try:
            place(entry.path, destination, move=True)
        finally:
            _unlock(fd)

    def clear(self) -> list[CacheEntry]:
        """Delete every package (the task sequence has ended); return those that were there."""
        removed = [entry for entry in self.entries() if self.remove(entry)]
        self._empty_trash()
        return removed


def place(source: Path, destination: Path, *, move: bool) -> None:
    """Put a copy of folder ``source`` (or ``source`` itself, ``move``) at ``destination``.

    A temporary sibling of ``destination`` receives it, then one rename publishes it: a reader
    sees the old folder or the complete new one. An existing ``destination`` is replaced.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex[:8]}")
    try:
        if move:
            shutil.move(str(source), str(temporary))
        else:
            shutil.copytree(source, temporary)
        if destination.exists():
            old = destination.with_name(f".{destination.name}.old.{uuid.uuid4().hex[:8]}")
            destination.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        temporary.rename(destination)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
