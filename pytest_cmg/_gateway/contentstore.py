"""What the gateway needs from the storage behind it, as a protocol the storage room satisfies.

The site reads manifests from a cloud DP and has their files signed; it names only these three
methods, so the gateway does not import the storage room (docs/architecture.md: ``_gateway``
and ``_storage`` stand side by side on the same floor). :class:`~pytest_cmg._storage.clouddp.
CloudDP` is the implementation the harness hands in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from datetime import datetime

    from .._protocol.manifest import ContentManifest

__all__ = ["ContentStore"]


class ContentStore(Protocol):
    """The content of a cloud DP as the site reads it."""

    def versions(self, package_id: str) -> list[int]:
        """Content versions of ``package_id`` present, lowest first."""
        ...

    def manifest(self, package_id: str, version: int) -> ContentManifest | None:
        """The manifest of a distributed package version, or None if it is not there."""
        ...

    def signed_manifest(
        self, manifest: ContentManifest, *, start: datetime, expiry: datetime
    ) -> ContentManifest:
        """``manifest`` with a signed URL for each file, all for the same window."""
        ...
