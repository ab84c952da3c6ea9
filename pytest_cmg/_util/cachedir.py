"""The per-user cache folder where provisioned tools live (Azurite, aria2), one per version.

Shared by storage (Azurite's npm install) and the benchmarks (aria2 from Debian packages), so it
sits on the ground floor rather than in either room.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "cache_dir"]

#: The environment variable that moves the cache folder (CI points it at a cached path).
CACHE_ENV = "PYTEST_CMG_CACHE_DIR"


def cache_dir() -> Path:
    """Folder where Azurite (and aria2) are installed once per user and version."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative values must be ignored.
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "pytest-cmg"
    return Path.home() / ".cache" / "pytest-cmg"
