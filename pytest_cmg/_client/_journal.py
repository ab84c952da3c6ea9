"""The resume journal: what a restarted client needs to continue a ``.part`` file, and nothing else.

One small JSON file sits next to each partial file in the staging folder
(``<name>.part`` and ``<name>.part.journal``). It names the content (package ID, version, relative
path), what the finished file must be (size, SHA-256), the ETag the bytes came from, and the last
recorded offset: bytes written to the ``.part`` file and hashed before the record was made. The
download core says how durable that is (its ``fsync`` option): against the process dying, or,
with ``fdatasync`` before each record, against a power cut too.

It never holds a URL, a SAS or a token (docs/reliability.md rows 11 and 28; azcopy strips the SAS from its
plan files for the same reason): a restarted client asks the gateway for fresh URLs, and only the
ETag, sent as ``If-Match``, ties the old bytes to the new request.

Writes are atomic: a temporary file is written and renamed over the journal, so a reader sees the
old record or the new one, never a torn one; ``durable=True`` also ``fsync``'s the temporary
file and then the folder, so the same holds after a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["SUFFIX", "JournalRecord", "fsync_dir", "journal_path", "read", "remove", "write"]

SUFFIX = ".journal"
_FORMAT = 1
_MAX_BYTES = 64 * 1024


@dataclass(frozen=True)
class JournalRecord:
    package_id: str
    version: int
    relpath: str
    size: int
    sha256: str
    etag: str
    #: Bytes at the start of the ``.part`` file that were written and hashed.
    offset: int

    def to_json(self) -> bytes:
        return json.dumps({"format": _FORMAT, **asdict(self)}, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> JournalRecord | None:
        """The record in ``data``; None for anything unreadable (the file then starts over)."""
        try:
            raw = json.loads(data)
        except ValueError:
            return None
        if not isinstance(raw, dict) or raw.get("format") != _FORMAT:
            return None
        texts = ("package_id", "relpath", "sha256", "etag")
        numbers = ("version", "size", "offset")
        if not all(isinstance(raw.get(k), str) for k in texts):
            return None
        if not all(type(raw.get(k)) is int and raw[k] >= 0 for k in numbers):
            return None
        if raw["offset"] > raw["size"]:
            return None
        return cls(**{k: raw[k] for k in (*texts, *numbers)})


def journal_path(part: Path) -> Path:
    return part.with_name(part.name + SUFFIX)


def read(path: Path) -> JournalRecord | None:
    try:
        with path.open("rb") as handle:
            data = handle.read(_MAX_BYTES + 1)
    except OSError:
        return None
    return None if len(data) > _MAX_BYTES else JournalRecord.from_json(data)


def write(path: Path, record: JournalRecord, *, durable: bool = True) -> None:
    """Replace the journal at ``path`` with ``record`` atomically (temp, rename); ``durable``
    adds an ``fsync`` of the temporary file and of the folder, for power cuts."""
    temp = path.with_name(path.name + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        data = record.to_json()
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    temp.replace(path)
    if durable:
        fsync_dir(path.parent)


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".tmp").unlink()


def fsync_dir(folder: Path) -> None:
    """Make renames and new names in ``folder`` durable (a rename is only as durable as its folder)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
