"""A cloud distribution point: packages distributed into a private blob container.

Layout (emulation design, docs/emulation.md "Storage layout")::

    <container>/<PackageID>.<Version>/<relative/path>     one blob per file
    <container>/<PackageID>.<Version>.manifest.xml         the ContentManifest, without URLs

The container is private: clients only ever read through per-blob, read-only, short-lived SAS URLs
minted by the gateway. A public container would let Azurite's PublicAccess authenticator pass any
tampered SAS (docs/reliability.md rows 23 and 27), so :meth:`CloudDP.create` refuses to make one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import threading
from collections import deque
from collections.abc import Mapping
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from .._errors import InvalidValueError, ProvisioningError
from .._protocol.manifest import ContentManifest, ManifestFile

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from pathlib import Path
    from typing import BinaryIO

    from azure.storage.blob import BlobServiceClient, ContainerClient

    from .endpoint import BlobEndpoint

__all__ = ["DEFAULT_CONTAINER", "CloudDP", "PackageSource"]

DEFAULT_CONTAINER = "cmg-rg"
_READ_CHUNK = 1 << 20
#: Files uploaded at once by `distribute` (Azurite serves about 150 small uploads/s with 8).
_UPLOAD_WORKERS = 8
#: Uploads queued per worker: enough that a worker never idles waiting for the next file, few
#: enough that a package of 100,000 files is never queued whole (memory, and a cancellation
#: then has nothing to drain).
_QUEUED_PER_WORKER = 16
#: How long a cancelled `distribute` waits for the uploads already in flight. Each is at most one
#: request (or, for a file over the SDK's 64 MiB single-put size, the blocks already being
#: sent: the next block is not read once cancelled), so this is rarely reached; an upload still
#: running after it is left to end on its own.
_CANCEL_GRACE_SECONDS = 2.0


def _utc(name: str, value: datetime) -> datetime:
    """``value`` in UTC; a naive datetime is refused, naming the parameter and the fix."""
    if value.tzinfo is None or value.utcoffset() is None:
        msg = (
            f"signed_url: {name}={value.isoformat()} is a naive datetime, which could be UTC or "
            f"local time; pass a timezone-aware one, e.g. datetime.now(UTC) or "
            f"{name}.replace(tzinfo=UTC) if it was meant as UTC"
        )
        raise InvalidValueError(msg)
    return value.astimezone(UTC)


class _CancellableReader(io.RawIOBase):
    """A seekable byte stream for ``upload_blob`` whose ``read`` first calls ``check``.

    ``check`` raises to stop an upload between reads. Only what the SDK's block-blob upload
    uses (read, seek, tell, seekable) goes to ``raw``; closing it is left to its owner.
    """

    def __init__(self, raw: BinaryIO, check: Callable[[], None]) -> None:
        super().__init__()
        self._raw = raw
        self._check = check

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1, /) -> bytes:
        self._check()
        return self._raw.read(-1 if size is None else size)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()

    def seekable(self) -> bool:
        return True


@dataclass(frozen=True)
class PackageSource:
    """One file to distribute: bytes in memory or a path on disk (streamed, never read whole)."""

    relpath: str
    data: bytes | Path


class CloudDP:
    """Distributes packages into one private container of a blob endpoint and signs URLs to them."""

    def __init__(
        self,
        endpoint: BlobEndpoint,
        container: str = DEFAULT_CONTAINER,
        *,
        cancel: threading.Event | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.container = container
        #: Once set, `distribute` uploads no further file and raises CancelledError (the owner,
        #: e.g. ``Harness.cancel`` on serve's SIGTERM, is stopping); only ever read here.
        self.cancel = cancel if cancel is not None else threading.Event()
        self._service: BlobServiceClient = endpoint.service_client()
        self._catalog: dict[tuple[str, int], ContentManifest] = {}
        self._lock = threading.Lock()
        self._rewrite: Callable[[str], str] | None = None

    @property
    def _container(self) -> ContainerClient:
        return self._service.get_container_client(self.container)

    def create(self) -> None:
        """Create the (private) container; idempotent."""
        with contextlib.suppress(ResourceExistsError):
            self._container.create_container()
        access = self._container.get_container_properties().public_access
        if access is not None:
            msg = (
                f"CloudDP.create: container {self.container!r} allows public access ({access}); "
                "cloud DP content must be private, or a tampered SAS would still be served: turn "
                "the container's public access off, or give CloudDP another container name"
            )
            raise ProvisioningError(msg)

    def delete(self) -> None:
        """Remove the container and everything in it (frees Azurite's memory between tests)."""
        with contextlib.suppress(ResourceNotFoundError):
            self._container.delete_container()
        with self._lock:
            self._catalog.clear()

    def close(self) -> None:
        """Close the connections to storage kept alive for reuse.

        Azurite, asked to stop, may wait for open keep-alive connections to close
        (``AzuriteProcess.stop`` gives it 5 s for that before killing it): closing ours first
        takes the harness's own connections out of that wait. The DP stays usable; a later call
        opens new connections.
        """
        self._service.close()

    @staticmethod
    def blob_name(package_id: str, version: int, relpath: str) -> str:
        return f"{package_id}.{version}/{relpath}"

    @staticmethod
    def manifest_blob_name(package_id: str, version: int) -> str:
        return f"{package_id}.{version}.manifest.xml"

    def distribute(
        self, package_id: str, version: int, files: Iterable[PackageSource] | Mapping[str, bytes]
    ) -> ContentManifest:
        """Upload every file of a package version and its manifest; return the manifest.

        If :attr:`cancel` is set meanwhile, no further file is started, the files under way are
        waited for (at most ``_CANCEL_GRACE_SECONDS``), no manifest is published (clients never
        see a partial package) and :class:`concurrent.futures.CancelledError` is raised. When
        the calling thread is interrupted instead (KeyboardInterrupt, serve's stop), or an
        upload fails, the queue is dropped the same way and that exception goes on.
        """
        sources = (
            [PackageSource(k, v) for k, v in files.items()] if isinstance(files, Mapping) else files
        )
        sources = list(sources)

        def upload(source: PackageSource) -> ManifestFile:
            # Checked before each file, in the worker: a cancellation stops the queue between
            # uploads even while the caller's thread is blocked waiting for a result.
            self._check_cancel(package_id, version)
            name = self.blob_name(package_id, version, source.relpath)
            sha, size = self._upload(name, source)
            return ManifestFile(relpath=source.relpath, size=size, sha256=sha)

        # A driver package of thousands of small files costs one round trip each: upload them
        # side by side (Azurite answers them in parallel), keeping the manifest in source order.
        if len(sources) > 1:
            entries = self._upload_side_by_side(upload, sources)
        else:
            entries = [upload(source) for source in sources]
        self._check_cancel(package_id, version)
        manifest = ContentManifest(package_id=package_id, version=version, files=tuple(entries))
        self._container.upload_blob(
            self.manifest_blob_name(package_id, version),
            manifest.to_xml().encode("utf-8"),
            overwrite=True,
        )
        with self._lock:
            self._catalog[(package_id, version)] = manifest
        return manifest

    def _check_cancel(self, package_id: str, version: int) -> None:
        if self.cancel.is_set():
            msg = (
                f"distribution of {package_id}.{version} into container {self.container!r} was "
                "cancelled (CloudDP.cancel is set: its owner is stopping); no manifest was "
                "published, so clients cannot see the partial package: distribute it again on a "
                "DP whose cancel event is clear"
            )
            raise CancelledError(msg)

    @staticmethod
    def _upload_side_by_side(
        upload: Callable[[PackageSource], ManifestFile], sources: list[PackageSource]
    ) -> list[ManifestFile]:
        """``upload`` of every source on a few threads; the results in source order."""
        workers = min(_UPLOAD_WORKERS, len(sources))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="clouddp-upload")
        entries: list[ManifestFile] = []
        queued: deque[Future[ManifestFile]] = deque()
        try:
            for source in sources:
                if len(queued) >= workers * _QUEUED_PER_WORKER:
                    entries.append(queued.popleft().result())
                queued.append(pool.submit(upload, source))
            while queued:
                entries.append(queued.popleft().result())
        except BaseException:
            # A failed upload, a cancellation, or the caller's thread interrupted (serve's
            # SIGTERM arrives here as an exception): drop what is queued instead of draining it,
            # as ``with ThreadPoolExecutor`` would, and give the uploads in flight a short grace
            # so that none is cut off by the storage being stopped right after.
            running = [future for future in queued if not future.cancel()]
            pool.shutdown(wait=False, cancel_futures=True)
            # Only those: wait() would count a cancelled future as pending until a worker
            # notices it, which never happens once the pool is shut down.
            wait(running, timeout=_CANCEL_GRACE_SECONDS)
            raise
        pool.shutdown(wait=False)
        return entries

    def _upload(self, name: str, source: PackageSource) -> tuple[str, int]:
        digest = hashlib.sha256()
        if isinstance(source.data, bytes):
            digest.update(source.data)
            size = len(source.data)
            self._upload_stream(name, io.BytesIO(source.data), size)
            return digest.hexdigest(), size
        with source.data.open("rb") as handle:
            for chunk in iter(lambda: handle.read(_READ_CHUNK), b""):
                self._check_cancel_reading(name)
                digest.update(chunk)
            size = handle.tell()
            handle.seek(0)
            self._upload_stream(name, handle, size)
        return digest.hexdigest(), size

    def _upload_stream(self, name: str, stream: BinaryIO, size: int) -> None:
        # Through a reader that checks `cancel`: a file over the SDK's single-put size goes up
        # as blocks read one by one, so a cancelled multi-GiB upload stops at the next block
        # instead of sending the rest to a storage about to be stopped.
        self._container.upload_blob(
            name,
            _CancellableReader(stream, lambda: self._check_cancel_reading(name)),
            length=size,
            overwrite=True,
            max_concurrency=4,
        )

    def _check_cancel_reading(self, name: str) -> None:
        if self.cancel.is_set():
            msg = (
                f"upload of blob {name!r} into container {self.container!r} was cancelled "
                "(CloudDP.cancel is set: its owner is stopping)"
            )
            raise CancelledError(msg)

    def versions(self, package_id: str) -> list[int]:
        """Content versions of ``package_id`` present on this DP, lowest first."""
        prefix = f"{package_id}."
        found = set()
        for blob in self._container.list_blobs(name_starts_with=prefix):
            head = blob.name.removeprefix(prefix)
            if head.endswith(".manifest.xml"):
                number = head.removesuffix(".manifest.xml")
                if number.isdigit():
                    found.add(int(number))
        return sorted(found)

    def manifest(self, package_id: str, version: int) -> ContentManifest | None:
        """The manifest of a distributed package version, or ``None`` if it is not on this DP."""
        with self._lock:
            cached = self._catalog.get((package_id, version))
        if cached is not None:
            return cached
        try:
            raw = self._container.download_blob(self.manifest_blob_name(package_id, version))
        except ResourceNotFoundError:
            return None
        manifest = ContentManifest.from_xml(raw.readall().decode("utf-8"))
        with self._lock:
            self._catalog[(package_id, version)] = manifest
        return manifest

    def blob_url(self, package_id: str, version: int, relpath: str) -> str:
        """The unsigned URL of one file's blob (path-style, as Azurite serves it)."""
        name = quote(self.blob_name(package_id, version, relpath), safe="/")
        return f"{self.endpoint.url}/{self.container}/{name}"

    def route_through(self, rewrite: Callable[[str], str] | None) -> None:
        """Hand clients URLs rewritten by ``rewrite`` (e.g. a fault proxy's), or direct ones."""
        self._rewrite = rewrite

    def signed_url(
        self, package_id: str, version: int, relpath: str, *, start: datetime, expiry: datetime
    ) -> str:
        """A read-only service SAS URL scoped to one blob (``sr=b``, ``sp=r``).

        ``start`` and ``expiry`` must be timezone-aware. Any offset is accepted and converted
        to UTC, so ``st``/``se`` are always rendered ``YYYY-MM-DDTHH:MM:SSZ`` for the same
        instant (sub-second digits are dropped: the SAS format has none). A naive datetime is
        refused with :class:`ValueError` rather than guessed: the storage SDK would read it as
        UTC while Python's ``astimezone`` reads it as local time, so ``datetime.now()`` on a
        machine off UTC would silently shift the SAS window by the machine's offset (the bug
        class of docs/reliability.md row 22). Pass ``datetime.now(UTC)``, or attach the zone the value
        was meant in with ``.replace(tzinfo=...)``.
        """
        start, expiry = _utc("start", start), _utc("expiry", expiry)
        https_only = self.endpoint.url.startswith("https://")
        sas = generate_blob_sas(
            account_name=self.endpoint.account_name,
            container_name=self.container,
            blob_name=self.blob_name(package_id, version, relpath),
            account_key=self.endpoint.account_key,
            permission=BlobSasPermissions(read=True),
            start=start,
            expiry=expiry,
            protocol="https" if https_only else "https,http",
        )
        url = f"{self.blob_url(package_id, version, relpath)}?{sas}"
        return self._rewrite(url) if self._rewrite else url

    def signed_manifest(
        self, manifest: ContentManifest, *, start: datetime, expiry: datetime
    ) -> ContentManifest:
        """``manifest`` with a :meth:`signed_url` for each file, all for the same window."""
        return manifest.with_urls(
            {
                f.relpath: self.signed_url(
                    manifest.package_id, manifest.version, f.relpath, start=start, expiry=expiry
                )
                for f in manifest.files
            }
        )
