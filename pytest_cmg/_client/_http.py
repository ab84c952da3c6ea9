"""A thin HTTP/1.1 client for storage GETs: kept-alive sockets, bodies read into the caller's buffer.

Why not ``requests``: the download core spends most of its client CPU on SHA-256 (docs/benchmarks.md),
so everything else must cost as little as possible. ``requests``/``urllib3`` build a response
object, an ``HTTPMessage`` and a ``bytes`` object per chunk; for 16 KiB files the per-request cost
dominates, and for large files each 1 MiB chunk is allocated and copied once more than needed.
Here a request is one ``sendall`` of a preformatted head, the response head is parsed from the
first ``recv`` (which usually holds the whole head and, for small blobs, the whole body), and the
body goes straight from ``recv_into`` into a reusable buffer that is then hashed and written.

Scope is what blob GETs need, no more: ``GET`` only, ``Content-Length``, ``chunked`` (Azurite
sends its error answers chunked) and read-until-close bodies, keep-alive with one silent retry of a
request that found its reused connection closed by the server (Azurite closes idle connections
after 5 s), ``http`` and ``https`` (certificate verification on by default; pass an
``ssl.SSLContext`` for a private CA). No proxies (storage is reached directly, as ``CMGClient``
does with ``trust_env = False``), no redirects, no compression (``Accept-Encoding: identity``: the
hash is over the stored bytes).
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from .._errors import InvalidValueError, PytestCmgError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Connection", "ConnectionPool", "Origin", "Response", "TransportError", "split_url"]

_RECV = 64 * 1024
_MAX_HEAD = 64 * 1024
_MAX_DRAIN = 256 * 1024


class TransportError(PytestCmgError):
    """The connection failed (refused, reset, timed out, closed early, or not HTTP).

    ``stale`` is true when a *reused* connection failed before a single response byte arrived:
    the server had closed it while idle, and the request can be sent again on a new one.
    """

    def __init__(self, reason: str, *, stale: bool = False, received: int = 0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.stale = stale
        #: Body bytes placed in the caller's buffer by the failed read (still good to keep).
        self.received = received


@dataclass(frozen=True)
class Origin:
    scheme: str
    host: str
    port: int
    #: The ``Host`` header value, as the URL spelled it.
    netloc: str


@functools.lru_cache(maxsize=64)
def _origin(scheme: str, netloc: str) -> Origin:
    parts = urlsplit(f"{scheme}://{netloc}/")
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        msg = f"not an http(s) URL: {parts.scheme}://{parts.netloc}"
        raise InvalidValueError(msg)
    port = parts.port or (443 if scheme == "https" else 80)
    return Origin(scheme, parts.hostname, port, netloc.rpartition("@")[2])


def split_url(url: str) -> tuple[Origin, str]:
    """The origin of ``url`` and its request target (path and query, byte for byte)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        msg = f"not an http(s) URL: {url.split('?', 1)[0]!r}"
        raise InvalidValueError(msg)
    netloc = rest.split("/", 1)[0].split("?", 1)[0]
    # The target is kept exactly as given: re-encoding a SAS would break its signature.
    target = rest[len(netloc) :].partition("#")[0]
    if not target.startswith("/"):
        target = "/" + target
    return _origin(scheme.lower(), netloc), target


class Response:
    """A response whose body is read with :meth:`read_into` (and nothing else)."""

    def __init__(
        self,
        conn: Connection,
        status: int,
        headers: dict[str, str],
        *,
        length: int | None,
        chunked: bool,
        keep_alive: bool,
    ) -> None:
        self.status = status
        #: Header names in lower case; repeated headers joined with ", ".
        self.headers = headers
        #: ``Content-Length`` (None for chunked or read-until-close bodies).
        self.length = length
        self._conn = conn
        self._chunked = chunked
        self._remaining = length  # body bytes still to come (Content-Length bodies)
        self._chunk_left = 0  # bytes left in the current chunk (chunked bodies)
        self._filled = 0  # bytes of the current read_into call already in the buffer
        self._done = length == 0
        self._keep_alive = keep_alive

    @property
    def connection(self) -> Connection:
        return self._conn

    @property
    def complete(self) -> bool:
        """The whole body was read."""
        return self._done

    @property
    def reusable(self) -> bool:
        """The connection can carry another request (body read, no ``Connection: close``)."""
        return self._done and self._keep_alive

    def read_into(self, buf: memoryview) -> int:
        """Fill ``buf`` from the body; fewer bytes only at the body's end, 0 once it is over.

        Raises :class:`TransportError` if the connection ends before the body does.
        """
        if self._done:
            return 0
        if self._chunked:
            return self._read_chunked(buf)
        want = len(buf)
        if self._remaining is not None:
            want = min(want, self._remaining)
        try:
            got = self._conn.fill(buf[:want], until_close=self._remaining is None)
        except TransportError as exc:
            if self._remaining is not None:
                self._remaining -= exc.received
            raise
        if self._remaining is not None:
            self._remaining -= got
            if self._remaining == 0:
                self._done = True
            elif got < want:
                msg = f"connection closed with {self._remaining} body bytes still expected"
                raise TransportError(msg, received=got)
        elif got < want:
            self._done = True
        return got

    def _read_chunked(self, buf: memoryview) -> int:
        try:
            return self._read_chunks(buf)
        except TransportError as exc:
            raise TransportError(exc.reason, received=self._filled) from None

    def _read_chunks(self, buf: memoryview) -> int:
        filled = self._filled = 0
        while filled < len(buf):
            if self._chunk_left == 0:
                size_line = self._conn.read_line()
                try:
                    size = int(size_line.split(b";", 1)[0].strip(), 16)
                except ValueError:
                    msg = f"bad chunk size line {size_line[:40]!r}"
                    raise TransportError(msg) from None
                if size == 0:
                    # Trailers, then the blank line that ends the message.
                    while self._conn.read_line() not in (b"\r\n", b"\n"):
                        pass
                    self._done = True
                    return filled
                self._chunk_left = size
            part = buf[filled : filled + self._chunk_left]
            try:
                got = self._conn.fill(part, until_close=False)
            except TransportError as exc:
                self._filled = filled + exc.received
                raise
            filled += got
            self._filled = filled
            self._chunk_left -= got
            if got < len(part):
                msg = "connection closed inside a chunk"
                raise TransportError(msg)
            if self._chunk_left == 0 and self._conn.read_line() not in (b"\r\n", b"\n"):
                msg = "chunk not followed by CRLF"
                raise TransportError(msg)
        return filled

    def drain(self, limit: int = _MAX_DRAIN) -> None:
        """Read and discard the rest of a short body so the connection can be reused."""
        scratch = memoryview(bytearray(min(limit, _RECV)))
        total = 0
        while not self._done and total < limit:
            total += self.read_into(scratch)


class Connection:
    """One kept-alive connection to an origin; one request at a time."""

    def __init__(
        self, origin: Origin, *, timeout: float, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.origin = origin
        self.requests = 0
        try:
            sock = socket.create_connection((origin.host, origin.port), timeout=timeout)
        except OSError as exc:
            msg = f"cannot connect to {origin.netloc}: {_describe(exc)}"
            raise TransportError(msg) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if origin.scheme == "https":
                context = ssl_context or ssl.create_default_context()
                sock = context.wrap_socket(sock, server_hostname=origin.host)
        except (OSError, ssl.SSLError) as exc:
            sock.close()
            msg = f"TLS handshake with {origin.netloc} failed: {_describe(exc)}"
            raise TransportError(msg) from None
        self._sock = sock
        # Bytes received but not consumed yet: the rest of a head's recv is the body's start.
        self._rbuf = bytearray()
        self._rpos = 0
        self.closed = False

    def abort(self) -> None:
        """Wake a thread blocked on this connection (called from another thread)."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self._sock.close()

    def get(self, target: str, headers: Mapping[str, str]) -> Response:
        """Send ``GET target`` and read the response head."""
        reused = self.requests > 0
        self.requests += 1
        lines = [f"GET {target} HTTP/1.1", f"Host: {self.origin.netloc}"]
        lines.extend(f"{name}: {value}" for name, value in headers.items())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            self._sock.sendall(head)
        except OSError as exc:
            self.close()
            msg = f"send failed: {_describe(exc)}"
            raise TransportError(msg, stale=reused) from None
        return self._read_response(reused)

    def _read_response(self, reused: bool) -> Response:
        while True:
            status, headers, version = self._read_head(reused)
            if status >= 200:
                break
            if status == 101:
                msg = "unexpected 101 Switching Protocols"
                raise TransportError(msg)
            reused = False  # a 1xx arrived: the connection is alive
        connection = headers.get("connection", "").lower()
        keep_alive = version != "HTTP/1.0" and "close" not in connection
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length: int | None = None
        if not chunked:
            raw = headers.get("content-length")
            if raw is not None:
                if not raw.strip().isdigit():
                    msg = f"bad Content-Length {raw!r}"
                    raise TransportError(msg)
                length = int(raw)
            elif status in (204, 304):
                length = 0
            else:
                keep_alive = False  # the body ends when the server closes
        return Response(
            self, status, headers, length=length, chunked=chunked, keep_alive=keep_alive
        )

    def _read_head(self, reused: bool) -> tuple[int, dict[str, str], str]:
        if self._rpos:
            # Offsets below stay valid while more bytes are appended.
            del self._rbuf[: self._rpos]
            self._rpos = 0
        searched = 0
        while True:
            end = self._rbuf.find(b"\r\n\r\n", max(searched - 3, 0))
            if end >= 0:
                break
            searched = len(self._rbuf)
            if searched > _MAX_HEAD:
                msg = f"response head longer than {_MAX_HEAD} bytes"
                raise TransportError(msg)
            nothing = searched == 0
            try:
                more = self._recv_more()
            except TransportError as exc:
                raise TransportError(exc.reason, stale=reused and nothing) from None
            if not more:
                msg = "connection closed before a response" if nothing else "head cut short"
                raise TransportError(msg, stale=reused and nothing)
            reused = reused and nothing
        raw = self._rbuf[:end].decode("latin-1")
        self._rpos = end + 4
        status_line, _, rest = raw.partition("\r\n")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
            msg = f"not an HTTP response: {status_line[:40]!r}"
            raise TransportError(msg)
        headers: dict[str, str] = {}
        for line in rest.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                key = name.strip().lower()
                text = value.strip()
                headers[key] = f"{headers[key]}, {text}" if key in headers else text
        return int(parts[1]), headers, parts[0]

    def _recv_more(self) -> bool:
        """Append one ``recv`` to the read buffer; False at EOF."""
        if self._rpos and self._rpos == len(self._rbuf):
            self._rbuf.clear()
            self._rpos = 0
        try:
            data = self._sock.recv(_RECV)
        except OSError as exc:
            self.close()
            msg = f"receive failed: {_describe(exc)}"
            raise TransportError(msg) from None
        if not data:
            return False
        self._rbuf += data
        return True

    def read_line(self) -> bytes:
        while True:
            end = self._rbuf.find(b"\n", self._rpos)
            if end >= 0:
                line = bytes(self._rbuf[self._rpos : end + 1])
                self._rpos = end + 1
                return line
            if len(self._rbuf) - self._rpos > _MAX_HEAD:
                msg = "line too long"
                raise TransportError(msg)
            if not self._recv_more():
                msg = "connection closed inside a chunked body"
                raise TransportError(msg)

    def fill(self, buf: memoryview, *, until_close: bool) -> int:
        """Fill ``buf`` (buffered bytes first); short only at EOF (an error unless ``until_close``)."""
        filled = 0
        buffered = len(self._rbuf) - self._rpos
        if buffered:
            n = min(buffered, len(buf))
            buf[:n] = self._rbuf[self._rpos : self._rpos + n]
            self._rpos += n
            filled = n
            if self._rpos == len(self._rbuf):
                self._rbuf.clear()
                self._rpos = 0
        recv_into = self._sock.recv_into
        try:
            while filled < len(buf):
                got = recv_into(buf[filled:])
                if not got:
                    break
                filled += got
        except OSError as exc:
            self.close()
            msg = f"receive failed: {_describe(exc)}"
            raise TransportError(msg, received=filled) from None
        if filled < len(buf) and not until_close:
            self.close()
        return filled


class ConnectionPool:
    """Idle kept-alive connections per origin, shared by the download threads.

    A connection is taken for one request and given back only if its response was read to the
    end; anything else is closed, so a half-read body never reaches the next request.
    """

    def __init__(self, *, timeout: float, ssl_context: ssl.SSLContext | None = None) -> None:
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._idle: dict[Origin, list[Connection]] = {}
        self._lock = threading.Lock()
        self._closed = False
        #: Connections opened so far (tests assert on keep-alive with it).
        self.opened = 0

    def acquire(self, origin: Origin) -> Connection:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                return idle.pop()
            self.opened += 1
        return Connection(origin, timeout=self.timeout, ssl_context=self.ssl_context)

    def release(self, conn: Connection, response: Response | None) -> None:
        """Give ``conn`` back if ``response`` left it clean, else close it."""
        if conn.closed or response is None or not response.reusable:
            conn.close()
            return
        with self._lock:
            if not self._closed:
                self._idle.setdefault(conn.origin, []).append(conn)
                return
        conn.close()

    def get(self, url_origin: Origin, target: str, headers: Mapping[str, str]) -> Response:
        """``GET`` on a pooled connection; a stale kept-alive one is replaced once, silently.

        The caller must :meth:`release` ``response.connection`` with the response.
        """
        conn = self.acquire(url_origin)
        try:
            response = conn.get(target, headers)
        except TransportError as exc:
            conn.close()
            if not exc.stale:
                raise
            conn = self.acquire_new(url_origin)
            try:
                response = conn.get(target, headers)
            except TransportError:
                conn.close()
                raise
        return response

    def acquire_new(self, origin: Origin) -> Connection:
        with self._lock:
            self.opened += 1
        return Connection(origin, timeout=self.timeout, ssl_context=self.ssl_context)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__
