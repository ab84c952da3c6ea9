"""The task sequence cache: the packages folder of the task sequence working directory.

The product keeps content it downloads for a running task sequence in its working directory
(``_SMSTaskSequence``), apart from the client cache ``%WinDir%\\ccmcache`` (docs/emulation.md,
"Task sequence content locations"). In Windows PE there is no ccmexec and so no client cache:
every package goes there. The product names a package's folder after the package alone,
``C:\\_SMSTaskSequence\\Packages\\PS100012`` (Microsoft Learn: Task sequence steps, Download
Package Content), and so does this cache. Layout::

    <working directory>/                 _SMSTaskSequence (the engine's default)
        Packages/<PKG>/                  content verified for this run, one version per package
        Packages/.versions/<PKG>         the content version in Packages/<PKG> (ASCII digits)
        Packages/.versions/<PKG>.lock    flock'ed while that package's folder or record changes
        Packages/.staging/ .leases/      as in the client cache (``cache.py``), keyed <PKG>.<ver>

:class:`TaskSequenceCache` is a :class:`~.cache.ClientCache` (the same staging, atomic commit,
leases and one-download-per-content rules, so a folder there is always verified content), with
what the working directory differs in:

* **the folder is the package, the version is recorded beside it**: an entry of ``<PKG>``
  version ``v`` is the folder ``Packages/<PKG>`` while ``.versions/<PKG>`` says ``v``. The
  record is written (atomically) before the folder's rename and deleted after the folder went
  to the trash, and a version change replaces the folder in three steps: the old folder goes to
  the trash (under an exclusive lease on the old version: once nobody uses it), then the new
  record is written, then the new folder is renamed in. Versions are never mixed in one folder,
  and whoever holds a lease on ``<PKG>.<v>`` (:meth:`acquire`, and :meth:`remove` and
  :meth:`take` exclusively) reads the record, then the folder, and gets version ``v`` or
  nothing: the folder cannot change version under that lease;
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
from contextlib import contextmanager
from typing import TYPE_CHECKING

from .._util.filelock import unlock as _unlock
from .cache import CacheEntry, ClientCache, SpaceReport

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from .cache import Lease

__all__ = ["PACKAGES_FOLDER", "WORKING_DIRECTORY", "TaskSequenceCache"]

#: The product's name for the task sequence working directory (on the system drive).
WORKING_DIRECTORY = "_SMSTaskSequence"
#: Where the working directory keeps downloaded packages (product: ``Packages\\<PackageID>``).
PACKAGES_FOLDER = "Packages"
#: Beside the package folders: the content version each holds, and a lock per package.
_VERSIONS = ".versions"
_LOCK_SUFFIX = ".lock"
#: Room no download can exceed: the working directory is bounded by the disk, not by a setting.
_UNBOUNDED_MB = 1 << 40


class TaskSequenceCache(ClientCache):
    """Packages of one task sequence run, under ``<working_directory>/Packages/<PackageID>``.

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

    # --- the layout: one folder per package, its version recorded beside it -----------------

    def version_in(self, package_id: str) -> int | None:
        """The content version recorded for ``Packages/<package_id>``, or None."""
        try:
            text = (self.root / _VERSIONS / package_id).read_text(encoding="ascii").strip()
        except (FileNotFoundError, NotADirectoryError, UnicodeDecodeError):
            return None
        return int(text) if text.isdigit() else None

    def _record(self, package_id: str, version: int) -> None:
        # Atomic: a reader sees the old record or the new one, never a torn number.
        folder = self.root / _VERSIONS
        folder.mkdir(exist_ok=True)
        temporary = folder / f".{package_id}.{uuid.uuid4().hex[:8]}"
        temporary.write_text(f"{version}\n", encoding="ascii")
        temporary.replace(folder / package_id)

    def _forget(self, package_id: str) -> None:
        (self.root / _VERSIONS / package_id).unlink(missing_ok=True)

    @contextmanager
    def _changing(self, package_id: str) -> Iterator[None]:
        """Hold the one lock under which ``Packages/<package_id>`` or its record change."""
        folder = self.root / _VERSIONS
        folder.mkdir(exist_ok=True)
        fd = self._wait_lock(
            folder / f"{package_id}{_LOCK_SUFFIX}", fcntl.LOCK_EX, f"the folder of {package_id}"
        )
        try:
            yield
        finally:
            _unlock(fd)

    def lookup(self, package_id: str, version: int) -> CacheEntry | None:
        """``Packages/<package_id>`` if it holds ``version`` (exact under a lease on the entry)."""
        path = self.root / package_id
        # The record first, then the folder: a record names a version whose folder is there or
        # about to be renamed in, and under a lease on <PKG>.<version> no other version's folder
        # can take its place (the module's docstring).
        if self.version_in(package_id) == version and path.is_dir():
            return CacheEntry(package_id, version, path)
        return None

    def entries(self) -> list[CacheEntry]:
        """Every package folder with its recorded version, sorted by package ID."""
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            version = self.version_in(path.name)
            # A folder without a record is not content of this cache (never left by it).
            if version is not None:
                found.append(CacheEntry(path.name, version, path))
        return found

    def acquire(self, package_id: str, version: int) -> Lease | None:
        lease = self._lease(package_id, version)
        entry = self.lookup(package_id, version)
        if entry is None:
            lease.release()
            return None
        self.touch(entry)
        return lease

    def _lease(self, package_id: str, version: int) -> Lease:
        lease = super()._lease(package_id, version)
        lease.entry = CacheEntry(package_id, version, self.root / package_id)
        return lease

    def final_folders(self, package_id: str, version: int) -> tuple[Path, Path]:
        return self.root / package_id, self.provider_folder(package_id, version)

    def commit(self, staged: Path, package_id: str, version: int) -> CacheEntry:
        """Publish a verified staging folder as ``Packages/<package_id>`` (one rename).

        Another version's folder there is replaced: it goes to the trash once nobody holds it
        (waiting up to ``lock_timeout``, then 0x87D01203), then the new version is recorded and
        the folder renamed in.
        """
        entry = CacheEntry(package_id, version, self.root / package_id)
        with self._changing(package_id):
            current = self.version_in(package_id)
            if current == version and entry.path.is_dir():
                # Another writer already committed the same verified content: keep the first.
                shutil.rmtree(staged, ignore_errors=True)
            else:
                if entry.path.exists():
                    self._replace_out(package_id, current)
                self._record(package_id, version)
                staged.rename(entry.path)
        self.touch(entry)
        return entry

    def _replace_out(self, package_id: str, current: int | None) -> None:
        """Trash the folder of ``package_id`` that holds another version (under its lease)."""
        path = self.root / package_id
        if current is None:
            # No record: not content of this cache; nobody can hold a lease on it.
            self._remove(path)
            return
        key = self.key(package_id, current)
        fd = self._wait_lock(self._lease_path(key), fcntl.LOCK_EX, f"the lease on {key}")
        try:
            self._remove(path)
            self._forget(package_id)
        finally:
            _unlock(fd)

    # --- space and the ways content leaves ----------------------------------------------------

    def make_room(self, package_id: str, version: int, size: int) -> SpaceReport:
        """Nothing to make: the working directory has no size limit and evicts nothing."""
        return SpaceReport(size, self.capacity, 0, len(self.entries()))

    def remove(self, entry: CacheEntry) -> bool:
        """Delete ``entry`` once nobody holds it (waiting up to ``lock_timeout``).

        Returns whether it was there. The folder is renamed out before it is deleted, so a
        half-deleted package is never seen as content; its record goes after it.
        """
        with self._changing(entry.package_id):
            fd = self._wait_lock(
                self._lease_path(entry.key), fcntl.LOCK_EX, f"the lease on {entry.key}"
            )
            try:
                if self.lookup(entry.package_id, entry.version) is None:
                    return False
                self._remove(entry.path)
                self._forget(entry.package_id)
                return True
            finally:
                _unlock(fd)

    def take(self, entry: CacheEntry, destination: Path) -> None:
        """Move ``entry`` out of the cache to ``destination`` (replaced if it exists).

        The move ends with one rename onto ``destination``, so it is whole or absent; across file
        systems the content is copied next to it first.
        """
        with self._changing(entry.package_id):
            fd = self._wait_lock(
                self._lease_path(entry.key), fcntl.LOCK_EX, f"the lease on {entry.key}"
            )
            try:
                place(entry.path, destination, move=True)
                self._forget(entry.package_id)
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
