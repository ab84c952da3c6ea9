"""The built-in download of a located package: the download core's run, the package hash
check, room in the cache, the commit, and fresh SAS URLs when storage refuses one.
Functions of :class:`~pytest_cmg._client.engine.TaskSequenceEngine` (its methods).
"""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from .._errors import ContentError
from .._protocol import codes
from .._protocol.manifest import ContentManifest, ManifestFile, package_hash
from .cache import CacheEntry, CacheSpaceError
from .sequence import PackageTransfer

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

    from .._protocol.location import ContentLocationReply, LocationRecord
    from .cache import ClientCache, SpaceReport
    from .cmg import CMGClient

if TYPE_CHECKING:
    from .engine import TaskSequenceEngine


def _no_location(
    self: TaskSequenceEngine, package_id: str, version: int, cause: ContentError | None
) -> NoReturn:
    hr = codes.NO_LOCATIONS
    self.log.error(
        "TSManager",
        f"Content location request for {package_id}:{version} failed, hr=0x{hr:08X}",
    )
    detail = str(cause) if cause else "no content location"
    raise ContentError(hr, f"{package_id}:{version}: {detail}") from cause


def _download(
    self: TaskSequenceEngine,
    package_id: str,
    version: int,
    reply: ContentLocationReply,
    record: LocationRecord,
    store: ClientCache,
) -> CacheEntry:
    manifest = self.client.manifest(record)
    if manifest.package_id != package_id or manifest.version != version:
        raise ContentError(
            codes.HASH_MISMATCH,
            f"manifest is for {manifest.package_id}.{manifest.version}, "
            f"expected {package_id}.{version}",
        )
    total = manifest.total_size
    # Before any byte is fetched (docs/reliability.md row 38): fail at once, or evict to make
    # room.
    self._make_room(store, package_id, version, total)
    started = time.perf_counter()
    with store.staging(package_id, version) as staged:
        self.log.info(
            "DataTransferService",
            f"Job: {package_id}.{version}, Total Files: {len(manifest.files)}, "
            f"Total Bytes: {total}",
        )
        if self.on_job is not None:
            self.on_job(package_id, version, len(manifest.files), total)
        try:
            stats = self.core.download(manifest, staged, renew=_Renewer(self.client, record))
        except ContentError as error:
            if error.hresult == codes.HASH_MISMATCH:
                self.log.error("TSManager", "Hash could not be matched for the downloaded content")
            raise
        # The trust anchor is the hash from the location reply (signed policy in the product),
        # not the manifest's own Hash attribute; and it is checked against the SHA-256 values
        # the core computed from the bytes, never the manifest's claims about them.
        computed = self._computed_package_hash(package_id, version, manifest, stats.digests)
        if not self._hashes_match(reply, computed):
            detail = f"{package_id}.{version}: package hash {computed} != {reply.package_hash}"
            raise self._hash_mismatch(package_id, version, detail)
        # Only the files the core verified go into the entry: anything else in staging (left
        # by an earlier run of another file list, a link) was never hashed by this process.
        for stray in store.prune_unverified(staged, stats.digests):
            self.log.info(
                "CAS",
                f"Deleted {stray} from the download of {package_id}.{version}: not a file "
                "of the content",
            )
        self._hash_verified(f"{package_id}.{version}")
        entry = self._publish(store, staged, package_id, version)
    self._committed(entry, store, total)
    self.transfers.append(
        PackageTransfer(
            package_id,
            version,
            stats.files,
            stats.bytes,
            time.perf_counter() - started,
            from_cache=False,
        )
    )
    return entry


def _committed(self: TaskSequenceEngine, entry: CacheEntry, store: ClientCache, total: int) -> None:
    """Log (and track) content just committed to ``store``."""
    if store is self.cache:
        self.log.info(
            "CacheManager",
            f"ADD new cache entry for id:{entry.package_id} Version : {entry.version} "
            f"Size : {total // 1024}K RefCount:1 Location : {self.windows(entry.path)}",
        )
        self._downloaded.add(entry.key)
        self._preserve(entry)
    else:
        self.log.info(
            "TSManager",
            f"Saved content {entry.key} in the task sequence working directory: "
            f"{self.windows(entry.path)} (Size : {total // 1024}K)",
        )


def _computed_package_hash(
    self: TaskSequenceEngine,
    package_id: str,
    version: int,
    manifest: ContentManifest,
    digests: Mapping[str, str],
) -> str:
    """The package hash over the SHA-256 values computed from the downloaded bytes.

    ``digests`` comes from the download core, which records a file's digest only after
    hashing its bytes in this process. A file of the manifest without one was not verified,
    and that fails the package (0x80091007), whatever the manifest says about it.
    """
    missing = sorted(f.relpath for f in manifest.files if f.relpath not in digests)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        detail = (
            f"{package_id}.{version}: no SHA-256 computed from the bytes of {shown}; the "
            "package hash is checked only from digests the download core computed (it must "
            "return one for every file in DownloadStats.digests)"
        )
        raise self._hash_mismatch(package_id, version, detail)
    return package_hash([replace(f, sha256=digests[f.relpath]) for f in manifest.files])


def _hashes_match(self: TaskSequenceEngine, reply: ContentLocationReply, computed: str) -> bool:
    """CAS.log's two lines of the package hash check, and whether the hashes agree."""
    self.log.info("CAS", f"Using hash from LS Content Information: {reply.package_hash}")
    self.log.info("CAS", f"Computed hash: {computed}")
    return computed == reply.package_hash.upper()


def _hash_verified(self: TaskSequenceEngine, key: str) -> None:
    self.log.info("CAS", "Success hash verification with hash algorithm = 32780, preference : 4")
    self.log.info(
        "CAS", f"Hash verification succeeded for content {key} downloaded under context System"
    )


def _hash_mismatch(
    self: TaskSequenceEngine, package_id: str, version: int, detail: str
) -> ContentError:
    """The product's two log lines of a failed hash check, and the error to raise."""
    self.log.error("CAS", f"Hash does not match expected for content {package_id}.{version}")
    self.log.error("TSManager", "Hash could not be matched for the downloaded content")
    return ContentError(codes.HASH_MISMATCH, detail)


def _publish(
    self: TaskSequenceEngine, store: ClientCache, folder: Path, package_id: str, version: int
) -> CacheEntry:
    """Commit verified content as a cache entry, held before it is published so no
    eviction can take it before its step runs."""
    lease = store.hold(package_id, version)
    try:
        entry = store.commit(folder, package_id, version)
    except BaseException:
        lease.release()
        raise
    self._keep(lease)
    return entry


def _make_room(
    self: TaskSequenceEngine, store: ClientCache, package_id: str, version: int, total: int
) -> None:
    """Room for ``total`` bytes in ``store``, evicting what may go (logged), or the
    product's "cache full" lines and a :class:`CacheSpaceError`."""
    try:
        room = store.make_room(package_id, version, total)
    except CacheSpaceError as error:
        self._no_room(package_id, version, error)
        raise
    self._log_evictions(room)


def _no_room(
    self: TaskSequenceEngine, package_id: str, version: int, error: CacheSpaceError
) -> None:
    report, cm = error.report, "CacheManager"
    mb = 1024 * 1024
    if error.hresult == codes.CACHE_TOO_SMALL:
        # The wording of the product's status message 10050 (KB839513).
        self.log.error(
            cm,
            f"Content {package_id}.{version} requires package content to be downloaded, but "
            "the total cache size is smaller than the size of the package content. The "
            f"current cache size is {report.capacity // mb} MB, and {report.free // mb} MB "
            f"of cache space is available. This content requires {-(-report.needed // mb)} "
            "MB to be available in the cache.",
        )
    else:
        self._log_usage(report)
        # CAS.log's lines when only content in use is left (myitforum, 2013).
        self.log.error("CAS", "Not enough non-active cache to delete")
        self.log.error("CAS", "Not enough space in Cache")
        self.log.error("CAS", "CreateContentRequest failed")
    self._download_failed(package_id, version, error.hresult)


def _log_usage(self: TaskSequenceEngine, report: SpaceReport) -> None:
    self.log.info(
        "CacheManager",
        f"There are currently {report.used} bytes used for cached content items "
        f"({report.entries} total, {report.active} active, 0 tombstoned, "
        f"{report.expired} expired).",
    )


def _log_evictions(self: TaskSequenceEngine, report: SpaceReport) -> None:
    if not report.evicted:
        return
    cm = "CacheManager"
    self._log_usage(report)
    self.log.info(
        cm,
        f"Need {report.needed} bytes with {report.free} of {report.capacity} free: "
        f"deleting {len(report.evicted)} cache item(s), least recently used first",
    )
    for gone in report.evicted:
        if gone.partial:
            self.log.info(
                cm,
                f"DELETE abandoned partial download {gone.key} Size : {gone.size // 1024}K "
                f"Location : {self.windows(gone.path)}",
            )
            continue
        package_id, _, version = gone.key.rpartition(".")
        last = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(gone.last_used))
        self.log.info(
            cm,
            f"DELETE cache entry for id:{package_id} Version : {version} "
            f"Size : {gone.size // 1024}K Last used : {last} "
            f"Location : {self.windows(gone.path)}",
        )


def _download_failed(self: TaskSequenceEngine, package_id: str, version: int, hresult: int) -> None:
    self.log.error(
        "CAS",
        f"Download failed for content {package_id}.{version} under context System, "
        f"error 0x{hresult:08x}",
    )


class _Renewer:
    """Fresh SAS URLs after storage refused one: one manifest request per expiry, shared.

    Files downloading in parallel all hit an expired SAS at about the same time; the first asks
    the gateway for a new manifest and the others reuse it (reliability.md 21: "one call per
    expiry, not per chunk"). The SAS and its signature stay in memory, never on disk or in logs.
    """

    def __init__(self, client: CMGClient, record: LocationRecord) -> None:
        self.client = client
        self.record = record
        self._urls: dict[str, str] | None = None
        self._lock = threading.Lock()

    def __call__(self, item: ManifestFile) -> str:
        # Fetched once and shared: each file renews at most once per download, so one fresh
        # manifest serves them all. (Comparing URLs to spot a renewal already made does not
        # work: a manifest minted in the same second carries byte-identical SAS URLs.)
        with self._lock:
            if self._urls is None:
                fresh = self.client.manifest(self.record)
                self._urls = {f.relpath: f.url for f in fresh.files}
            if item.relpath not in self._urls:
                raise ContentError(
                    codes.BAD_HTTP_STATUS, f"renewed manifest no longer lists {item.relpath}"
                )
            return self._urls[item.relpath]
