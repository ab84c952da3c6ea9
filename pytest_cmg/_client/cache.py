"""The client cache (ccmcache): verified package versions, keyed by content ID and version.

Invariant, enforced here: a folder directly under the cache root whose name does not start with
a dot holds a complete, verified package version. Downloads happen in ``.staging/`` and reach the
root only through :meth:`ClientCache.commit`, one atomic ``rename`` after verification; a failed
download's staging folder is removed, so nothing unverified is ever visible as a cache entry.
"""

from __future__ import annotations

import shutil
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = ["DEFAULT_CACHE_MB", "CacheEntry", "ClientCache"]

#: The product's default cache size (protocol.md section 3.3).
DEFAULT_CACHE_MB = 5120
_STAGING = ".staging"


@dataclass(frozen=True)
class CacheEntry:
    package_id: str
    version: int
    path: Path

    @property
    def key(self) -> str:
        return f"{self.package_id}.{self.version}"


class ClientCache:
    """A cache folder of verified package versions."""

    def __init__(self, root: Path, size_mb: int = DEFAULT_CACHE_MB) -> None:
        self.root = root
        self.size_mb = size_mb
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(package_id: str, version: int) -> str:
        return f"{package_id}.{version}"

    def lookup(self, package_id: str, version: int) -> CacheEntry | None:
        path = self.root / self.key(package_id, version)
        return CacheEntry(package_id, version, path) if path.is_dir() else None

    def entries(self) -> list[CacheEntry]:
        found = []
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".") or not path.is_dir():
                continue
            package_id, _, version = path.name.rpartition(".")
            if package_id and version.isdigit():
                found.append(CacheEntry(package_id, int(version), path))
        return found

    @contextmanager
    def staging(self, package_id: str, version: int) -> Iterator[Path]:
        """A private folder to download into; removed on exit unless committed."""
        folder = self.root / _STAGING / f"{self.key(package_id, version)}.{uuid.uuid4().hex[:8]}"
        folder.mkdir(parents=True)
        try:
            yield folder
        finally:
            if folder.exists():
                shutil.rmtree(folder, ignore_errors=True)

    def commit(self, staged: Path, package_id: str, version: int) -> CacheEntry:
        """Publish a verified staging folder as the cache entry (atomic rename)."""
        target = self.root / self.key(package_id, version)
        staged.rename(target)
        return CacheEntry(package_id, version, target)

    def staging_leftovers(self) -> list[Path]:
        """Whatever is still in the staging area (should be empty between downloads)."""
        area = self.root / _STAGING
        return sorted(area.iterdir()) if area.exists() else []
