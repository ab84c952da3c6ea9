"""The workloads of the benchmark and the blobs behind them.

Sizes follow the pre-project measurements: one 256 MiB blob (uploaded in 8 MiB blocks), 200 x 1 MiB
and 2000 x 16 KiB. ``--quick`` shrinks each to seconds so the machinery can be tested in CI.

Each workload's container is laid out as a cloud DP's (``<PackageID>.1/<relpath>`` and the
URL-less manifest blob, ``clouddp.py``), so the fake CMG of ``--download-program`` serves it as
is: the program reads the very blobs the other cases read, uploaded once.
"""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING
from urllib.parse import quote

from .._errors import InvalidValueError
from .._protocol.manifest import ContentManifest, ManifestFile

if TYPE_CHECKING:
    from collections.abc import Iterable

    from .._storage.azurite import BlobEndpoint

__all__ = [
    "FULL",
    "QUICK",
    "VERSION",
    "Dataset",
    "Workload",
    "delete",
    "package_id",
    "parse_names",
    "parse_workloads",
    "upload",
]

KIB = 1 << 10
MIB = 1 << 20
_BLOCK = 8 * MIB
_UPLOAD_THREADS = 8
#: The SAS outlives any benchmark; start in the past so a clock a little ahead is no problem.
_SAS_LIFETIME = timedelta(hours=6)
_SAS_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Workload:
    name: str
    files: int
    file_size: int

    @property
    def total(self) -> int:
        return self.files * self.file_size

    @property
    def many(self) -> bool:
        """A many-file workload: files/s is reported and clients run files in parallel."""
        return self.files > 1

    def describe(self) -> str:
        return f"{self.files} x {_size(self.file_size)}"


def _size(n: int) -> str:
    if n % MIB == 0:
        return f"{n // MIB} MiB"
    return f"{n // KIB} KiB"


FULL: dict[str, Workload] = {
    "big": Workload("big", 1, 256 * MIB),
    "m1": Workload("m1", 200, MIB),
    "k16": Workload("k16", 2000, 16 * KIB),
}
QUICK: dict[str, Workload] = {
    "big": Workload("big", 1, 32 * MIB),
    "m1": Workload("m1", 16, MIB),
    "k16": Workload("k16", 200, 16 * KIB),
}


def parse_names(text: str, choices: Iterable[str], kind: str) -> tuple[str, ...]:
    """A comma-separated list of ``kind`` names among ``choices``, each once, in the order
    given: ``"big,k16,big"`` -> ``("big", "k16")``; ``ValueError`` naming the unknown ones (the
    command's option parser and the plugin's ``UsageError`` put the option's name before it)."""
    allowed = tuple(choices)
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        shown = ", ".join(unknown) if unknown else "(none)"
        msg = f"unknown {kind} {shown}; choose among {', '.join(allowed)} (comma-separated)"
        raise InvalidValueError(msg)
    return names


def parse_workloads(text: str) -> tuple[str, ...]:
    """``"big,k16"`` -> ``("big", "k16")``; ``ValueError`` naming the unknown ones."""
    return parse_names(text, FULL, "workload")


@dataclass(frozen=True)
class Dataset:
    """A workload's blobs as uploaded: the bytes (for the hashlib ceiling) and a signed manifest."""

    workload: Workload
    container: str
    data: bytes
    manifest: ContentManifest

    @property
    def urls(self) -> list[str]:
        return [f.url for f in self.manifest.files]


#: The content version every workload's package is uploaded as.
VERSION = 1


def package_id(workload: Workload) -> str:
    """The workload's package ID (``BENCH-BIG``): what a gateway and a download program see."""
    return f"BENCH-{workload.name.upper()}"


def _relpaths(workload: Workload) -> list[str]:
    if not workload.many:
        return [f"blob{workload.file_size // MIB}"]
    width = len(str(workload.files - 1))
    return [f"f{i:0{width}d}" for i in range(workload.files)]


def upload(endpoint: BlobEndpoint, workload: Workload, container: str, seed: int = 0) -> Dataset:
    """Upload the workload's random bytes into a new private container (not timed)."""
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobSasPermissions, BlobServiceClient, generate_blob_sas

    from .._storage.clouddp import CloudDP

    package = package_id(workload)
    rng = random.Random(f"{workload.name}-{seed}")
    # randbytes(n) needs 8n bits in a C int: 256 MiB at once overflows it.
    pieces = (rng.randbytes(min(MIB, workload.total - o)) for o in range(0, workload.total, MIB))
    data = b"".join(pieces)
    service = BlobServiceClient.from_connection_string(
        endpoint.connection_string,
        max_block_size=_BLOCK,
        max_single_put_size=_BLOCK,
        # The machine's proxy and CA variables have no business on a loopback benchmark.
        transport=RequestsTransport(use_env_settings=False),
    )
    relpaths = _relpaths(workload)
    names = [CloudDP.blob_name(package, VERSION, relpath) for relpath in relpaths]
    view = memoryview(data)
    files = [
        ManifestFile(
            relpath,
            workload.file_size,
            hashlib.sha256(view[i * workload.file_size : (i + 1) * workload.file_size]).hexdigest(),
        )
        for i, relpath in enumerate(relpaths)
    ]
    unsigned = ContentManifest(package, VERSION, tuple(files))
    try:
        client = service.get_container_client(container)
        client.create_container()  # private: no public_access

        def put(index: int) -> None:
            piece = view[index * workload.file_size : (index + 1) * workload.file_size]
            client.upload_blob(names[index], bytes(piece), overwrite=True, max_concurrency=4)

        with ThreadPoolExecutor(max_workers=min(_UPLOAD_THREADS, len(names))) as pool:
            list(pool.map(put, range(len(names))))
        # Last, as CloudDP.distribute does: a gateway finds the package only once it is whole.
        client.upload_blob(
            CloudDP.manifest_blob_name(package, VERSION),
            unsigned.to_xml().encode("utf-8"),
            overwrite=True,
        )
    finally:
        service.close()

    now = datetime.now(UTC)
    urls = {}
    for relpath, name in zip(relpaths, names, strict=True):
        sas = generate_blob_sas(
            account_name=endpoint.account_name,
            container_name=container,
            blob_name=name,
            account_key=endpoint.account_key,
            permission=BlobSasPermissions(read=True),
            start=now - _SAS_SKEW,
            expiry=now + _SAS_LIFETIME,
        )
        urls[relpath] = f"{endpoint.url}/{container}/{quote(name, safe='/')}?{sas}"
    return Dataset(workload, container, data, unsigned.with_urls(urls))


def delete(endpoint: BlobEndpoint, container: str) -> None:
    """Drop a workload's container: Azurite holds blobs in memory."""
    from azure.core.exceptions import ResourceNotFoundError
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(
        endpoint.connection_string, transport=RequestsTransport(use_env_settings=False)
    )
    try:
        service.delete_container(container)
    except ResourceNotFoundError:
        pass
    finally:
        service.close()
