"""The content manifest returned by ``downloadrestservice.svc/getcontentxmlsecure``.

Its schema is not public; this is our emulation design (docs/emulation.md, "Content manifest")::

    <ContentManifest PackageID="PS100012" Version="1" HashAlgorithm="32780" Hash="<package hash>">
      <File RelPath="sources/install.wim" Size="16777216" Hash="<sha256 hex>" Url="<SAS URL>"/>
    </ContentManifest>

The package hash is SHA-256 over the canonical file list (see :func:`package_hash`), so a client can
check the whole package against the hash from the location reply, and each file on its own.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import lru_cache
from urllib.parse import unquote
from xml.etree import ElementTree as ET

from .._errors import InvalidValueError
from .location import CALG_SHA_256
from .xml import parse_untrusted

__all__ = ["ContentManifest", "ManifestFile", "package_hash", "sas_expiry"]


@dataclass(frozen=True)
class ManifestFile:
    """One file of a package: where it goes, how big it is, its SHA-256, and (in replies) its URL."""

    relpath: str
    size: int
    sha256: str
    url: str = ""


def sas_expiry(url: str) -> float | None:
    """When a file's SAS URL stops working: its ``se`` as a POSIX timestamp, None without one.

    Azure renders ``se`` as UTC, ``YYYY-MM-DDThh:mm:ssZ`` (or to the day, ``YYYY-MM-DD``); the
    client reads it to renew a SAS before it lapses (docs/emulation.md, "Client": ``sas_margin``).
    It runs before every storage request, so the value is found with one search and each
    distinct value parsed once (a manifest's files share it).
    """
    match = _SE.search(url)
    return _parse_se(unquote(match.group(1))) if match else None


_SE = re.compile(r"[?&]se=([^&#]+)")


@lru_cache(maxsize=64)
def _parse_se(value: str) -> float | None:
    for layout in ("%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%MZ", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, layout).replace(tzinfo=UTC).timestamp()
        except ValueError:
            continue
    return None


def package_hash(files: tuple[ManifestFile, ...] | list[ManifestFile]) -> str:
    """SHA-256 (upper-case hex, as the product prints hashes) over the sorted file list.

    Each file contributes ``relpath \\t size \\t sha256-lowercase \\n`` in UTF-8, sorted by the
    UTF-8 bytes of the relative path, so the value does not depend on upload or listing order.
    """
    digest = hashlib.sha256()
    for item in sorted(files, key=lambda f: f.relpath.encode("utf-8")):
        digest.update(f"{item.relpath}\t{item.size}\t{item.sha256.lower()}\n".encode())
    return digest.hexdigest().upper()


@dataclass(frozen=True)
class ContentManifest:
    """A package version's file list with the package hash."""

    package_id: str
    version: int
    files: tuple[ManifestFile, ...]
    hash: str = ""

    def __post_init__(self) -> None:
        if not self.hash:
            object.__setattr__(self, "hash", package_hash(self.files))

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    def with_urls(self, urls: dict[str, str]) -> ContentManifest:
        """A copy whose files carry the given URLs (keyed by relpath)."""
        files = tuple(replace(f, url=urls[f.relpath]) for f in self.files)
        return replace(self, files=files)

    def to_xml(self) -> str:
        root = ET.Element(
            "ContentManifest",
            PackageID=self.package_id,
            Version=str(self.version),
            HashAlgorithm=str(CALG_SHA_256),
            Hash=self.hash,
        )
        for item in self.files:
            attrs = {"RelPath": item.relpath, "Size": str(item.size), "Hash": item.sha256}
            if item.url:
                attrs["Url"] = item.url
            ET.SubElement(root, "File", attrs)
        return ET.tostring(root, encoding="unicode")

    @classmethod
    def from_xml(cls, text: str) -> ContentManifest:
        """Parse a manifest; ``ValueError`` for anything a client must not act on."""
        root = parse_untrusted(text, root="ContentManifest")
        if root.get("HashAlgorithm") != str(CALG_SHA_256):
            msg = f"HashAlgorithm {root.get('HashAlgorithm')!r} is not {CALG_SHA_256} (SHA-256)"
            raise InvalidValueError(msg)
        files = []
        for node in root.iterfind("File"):
            relpath = node.get("RelPath", "")
            _check_relpath(relpath)
            try:
                size = int(node.get("Size", ""))
            except ValueError as exc:
                msg = f"<File RelPath={relpath!r}> has no integer Size"
                raise InvalidValueError(msg) from exc
            files.append(
                ManifestFile(
                    relpath=relpath,
                    size=size,
                    sha256=node.get("Hash", "").lower(),
                    url=node.get("Url", ""),
                )
            )
        return cls(
            package_id=root.get("PackageID", ""),
            version=int(root.get("Version", "0")),
            files=tuple(files),
            hash=root.get("Hash", ""),
        )


def _check_relpath(relpath: str) -> None:
    # A manifest decides where bytes land on the client's disk: refuse anything that could
    # escape the package folder on either POSIX or Windows (a drive letter such as "C:/x" or
    # "D:x" would make pathlib discard the folder it is joined to; ":" also opens NTFS streams).
    parts = relpath.split("/")
    if (
        not relpath
        or relpath.startswith("/")
        or "\\" in relpath
        or ":" in relpath
        or ".." in parts
        or "" in parts
    ):
        msg = f"unsafe RelPath {relpath!r} in manifest"
        raise InvalidValueError(msg)
