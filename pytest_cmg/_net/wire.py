"""HTTP/1.1 framing for the fault proxy, written by hand: heads, bodies, chunks.

The proxy forwards bytes, not messages: each head is passed on byte-for-byte (only the headers
``ignore_range`` removes are dropped), and a chunked body's framing (size lines, extensions,
trailers) is forwarded unchanged while fault offsets count only its payload. That is why h11,
which the gateway's front door uses, does not serve here: h11 hands over a body as de-framed
``Data`` events and writes framing of its own, so the exact bytes upstream sent, and where the
payload sits among them, are gone, while the faults act on that exact stream (a flip at a
payload offset, a cut between two framing lines). What is needed is small: split a head from
the bytes behind it, read ``Content-Length`` or chunked framing, and tell payload from framing;
that is all this module does.

Limits: heads must use CRLF line ends and be at most 64 KiB (:data:`MAX_HEAD`); obsolete line
folding and a ``Transfer-Encoding`` that does not end in ``chunked`` are refused
(:class:`BadMessageError`).
"""

from __future__ import annotations

import http
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import PytestCmgError

if TYPE_CHECKING:
    import socket
    from collections.abc import Iterator

__all__ = [
    "IO_CHUNK",
    "MAX_HEAD",
    "BadMessageError",
    "Head",
    "Reader",
    "chunked_pieces",
    "content_length",
    "describe",
    "is_chunked",
    "length_pieces",
    "parse_head",
    "path_of",
    "reason_phrase",
    "until_close_pieces",
    "wants_close",
]

#: The longest message head read, in bytes.
MAX_HEAD = 64 * 1024
#: How much is read from or written to a socket at once.
IO_CHUNK = 64 * 1024


class BadMessageError(PytestCmgError):
    """The peer sent something this proxy cannot parse as HTTP/1.1."""


class Reader:
    """Buffered reads from a socket, so heads can be split from the body bytes behind them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(IO_CHUNK)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The head including its blank line; None on EOF before any byte."""
        searched = 0
        while True:
            end = self.buf.find(b"\r\n\r\n", max(searched - 3, 0))
            if end >= 0:
                head = bytes(self.buf[: end + 4])
                del self.buf[: end + 4]
                return head
            searched = len(self.buf)
            if searched > MAX_HEAD:
                msg = f"message head longer than {MAX_HEAD} bytes"
                raise BadMessageError(msg)
            if not self._fill():
                if not self.buf:
                    return None
                msg = "connection closed inside a message head"
                raise BadMessageError(msg)

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > MAX_HEAD:
                msg = "line too long"
                raise BadMessageError(msg)
            if not self._fill():
                msg = "connection closed inside a line"
                raise BadMessageError(msg)

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (buffered ones first); b"" only at EOF."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return self.sock.recv(min(n, IO_CHUNK))

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.read_some(n - len(out))
            if not data:
                msg = f"connection closed after {len(out)} of {n} body bytes"
                raise BadMessageError(msg)
            out += data
        return bytes(out)


@dataclass
class Head:
    raw: bytes
    first_line: str
    lines: list[bytes]
    headers: list[tuple[str, str]]

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def get(self, name: str) -> str | None:
        found = self.values(name)
        return found[0] if found else None

    def tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for v in self.values(name) for t in v.split(",") if t.strip()}


def parse_head(raw: bytes) -> Head:
    lines = raw[:-4].split(b"\r\n")
    first = lines[0].decode("latin-1")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            msg = "obsolete header line folding"
            raise BadMessageError(msg)
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            msg = "malformed header line"
            raise BadMessageError(msg)
        headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))
    return Head(raw=raw, first_line=first, lines=lines[1:], headers=headers)


def content_length(head: Head) -> int | None:
    values = {v.strip() for raw in head.values("content-length") for v in raw.split(",")}
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        msg = "invalid Content-Length"
        raise BadMessageError(msg)
    return int(next(iter(values)))


def is_chunked(head: Head) -> bool:
    codings = [t.strip().lower() for v in head.values("transfer-encoding") for t in v.split(",")]
    codings = [c for c in codings if c]
    if not codings:
        return False
    if codings[-1] != "chunked":
        msg = f"unsupported Transfer-Encoding {', '.join(codings)}"
        raise BadMessageError(msg)
    return True


def chunked_pieces(reader: Reader) -> Iterator[tuple[bool, bytes]]:
    """(is_payload, bytes) pieces of a chunked body; framing pieces are forwarded verbatim."""
    while True:
        line = reader.read_line()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            msg = "malformed chunk size line"
            raise BadMessageError(msg) from None
        yield False, line
        if size == 0:
            while True:
                trailer = reader.read_line()
                yield False, trailer
                if trailer in (b"\r\n", b"\n"):
                    return
        remaining = size
        while remaining:
            data = reader.read_some(min(remaining, IO_CHUNK))
            if not data:
                msg = "connection closed inside a chunk"
                raise BadMessageError(msg)
            remaining -= len(data)
            yield True, data
        crlf = reader.read_line()
        if crlf not in (b"\r\n", b"\n"):
            msg = "chunk not followed by CRLF"
            raise BadMessageError(msg)
        yield False, crlf


def length_pieces(reader: Reader, length: int) -> Iterator[tuple[bool, bytes]]:
    remaining = length
    while remaining:
        data = reader.read_some(min(remaining, IO_CHUNK))
        if not data:
            msg = f"upstream closed after {length - remaining} of {length} body bytes"
            raise BadMessageError(msg)
        remaining -= len(data)
        yield True, data


def until_close_pieces(reader: Reader) -> Iterator[tuple[bool, bytes]]:
    while data := reader.read_some(IO_CHUNK):
        yield True, data


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def path_of(target: str) -> str:
    """The request target without query or fragment (the query carries the SAS signature)."""
    if "://" in target:
        target = urlsplit(target.partition("?")[0]).path or "/"
    return target.partition("?")[0].partition("#")[0]


def wants_close(version: str, head: Head) -> bool:
    tokens = head.tokens("connection")
    if "close" in tokens:
        return True
    return version == "HTTP/1.0" and "keep-alive" not in tokens


def reason_phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"
