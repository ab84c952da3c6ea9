"""The CMG's HTTPS front door: TLS, HTTP/1.1 framing and the limits HTTP.sys enforces.

The real CMG runs IIS on Windows, so every request first meets HTTP.sys, the kernel HTTP
listener: it parses the request, refuses what is malformed with its own 400 page (``Server:
Microsoft-HTTPAPI/2.0``, never echoing what the client sent), caps header sizes and enforces
its timers (header wait, idle connection, entity body), and only then hands a well-formed
request to the web service. This module plays that part and nothing else; what the site decides
lives in ``site.py`` and never sees a socket.

Why h11 and not ``http.server``: ``http.server``'s parser answers HTTP/0.9 pages to odd request
lines, stops reading headers at the first line without a colon and keeps the rest as body, does
not frame chunked bodies on a GET, and has no limit on connections or on how long a client may
take to send its headers. h11 (maintained, used by httpcore/httpx and uvicorn) is a strict
sans-I/O HTTP/1.1 state machine: it refuses malformed request lines and header lines, frames
every body (Content-Length or chunked, on any method), caps the size of the header section, and
leaves the socket to us, so mutual TLS, the per-connection client certificate and the timers
stay in plain blocking code. What h11 does not do is written here by hand: the connection cap,
the three timers, the header-count cap, the request-target checks HTTP.sys makes (absolute form,
percent-decoding to UTF-8 without control characters), bounded reading of refused bodies, and a
lingering close so a refusal is not destroyed by a reset.

Whose fault: a client that sends garbage, stalls, sends a short body or disconnects early is
the client under test misbehaving. That is logged in the gateway's service log as the client's
doing and never recorded as a gateway error; only an exception in the site's own logic (or a
bug here) is, and the test then fails with it.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import TYPE_CHECKING
from urllib.parse import unquote_to_bytes, urlsplit

import h11

from .._errors import InvalidValueError, PytestCmgError
from .site import SiteRequest, SiteResponse

if TYPE_CHECKING:
    from .site import CmgSite

__all__ = ["FrontDoor", "FrontDoorLimits"]

#: The Server header IIS adds to the site's answers; HTTP.sys signs its own refusals.
_IIS = "Microsoft-IIS/10.0"
_HTTPAPI = "Microsoft-HTTPAPI/2.0"
_RECV = 65536


@dataclass(frozen=True)
class FrontDoorLimits:
    """The front door's caps and timers (seconds). Defaults follow HTTP.sys where it has one.

    :param max_connections: connections served at once; one more is closed at accept (each
        connection has a thread, so this also bounds the gateway's threads).
    :param handshake_timeout: for the TLS handshake.
    :param header_timeout: from a request's first byte to the end of its headers (HTTP.sys
        ``HeaderWait`` is 120 s; 30 s keeps a stalled test short).
    :param idle_timeout: a kept-alive connection waiting for its next request (HTTP.sys
        ``IdleConnectionTimeout``, 120 s).
    :param body_timeout: for the whole body of a request, once its headers arrived (HTTP.sys
        ``EntityBody`` is 120 s between bytes; bodies here are at most 64 KiB).
    :param max_header_bytes: request line and headers together (HTTP.sys ``MaxRequestBytes``,
        16 KiB by default).
    :param max_headers: header fields per request.
    :param drain_limit: body bytes read and thrown away after refusing a body, so the client
        still reads the refusal; past it the connection is closed.
    """

    max_connections: int = 256
    handshake_timeout: float = 10.0
    header_timeout: float = 30.0
    idle_timeout: float = 120.0
    body_timeout: float = 60.0
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    drain_limit: int = 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_header_bytes", "max_headers"):
            if getattr(self, name) < 1:
                msg = f"FakeCMG({name}={getattr(self, name)}): must be at least 1"
                raise InvalidValueError(msg)
        for name in ("handshake_timeout", "header_timeout", "idle_timeout", "body_timeout"):
            if not getattr(self, name) > 0:
                msg = f"FakeCMG({name}={getattr(self, name)}): a timeout must be above 0 seconds"
                raise InvalidValueError(msg)


class _ClientFault(PytestCmgError):
    """The client broke the exchange (timeout, disconnect, short body): log it, close."""


class _Malformed(PytestCmgError):
    """HTTP.sys refuses the request with its own page; ``detail`` is for the log only."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        self.status = status
        self.title = title
        self.detail = detail
        super().__init__(detail)


_REASONS = {400: "Bad Request", 413: "Request Entity Too Large", 505: "HTTP Version Not Supported"}


def _httpapi_page(status: int, title: str) -> bytes:
    """HTTP.sys's error page: fixed text only, so no request byte can come back."""
    reason = _REASONS.get(status, "Bad Request")
    return (
        '<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/html4/strict.dtd">'
        "\r\n<HTML><HEAD><TITLE>" + reason + "</TITLE>\r\n"
        '<META HTTP-EQUIV="Content-Type" Content="text/html; charset=us-ascii"></HEAD>\r\n'
        "<BODY><h2>" + title + '</h2>\r\n<hr><p>HTTP Error ' + str(status) + ". "
        "The request is badly formed.</p>\r\n</BODY></HTML>\r\n"
    ).encode("ascii")


def _classify_h11(exc: h11.RemoteProtocolError) -> _Malformed:
    """HTTP.sys's title for what h11 refused (h11's own message goes to the log only)."""
    text = str(exc).lower()
    if exc.error_status_hint == 431 or "too long" in text or "too large" in text:
        return _Malformed(400, "Bad Request - Request Too Long", str(exc))
    if exc.error_status_hint == 505 or "version" in text:
        return _Malformed(505, "HTTP Version Not Supported", str(exc))
    if "host" in text:
        return _Malformed(400, "Bad Request - Invalid Hostname", str(exc))
    if "request line" in text:
        return _Malformed(400, "Bad Request - Invalid URL", str(exc))
    if "header" in text:
        return _Malformed(400, "Bad Request - Invalid Header", str(exc))
    return _Malformed(400, "Bad Request", str(exc))


def origin_target(raw: bytes) -> str:
    """The request-target as path and query, checked as HTTP.sys checks it.

    The absolute form (``http://host/path``) is accepted, as RFC 9112 requires of servers, and
    reduced to its path; the asterisk and authority forms have no place here. The path must
    percent-decode to UTF-8 without control characters (HTTP.sys refuses others as an invalid
    URL). Raises :class:`_Malformed`.
    """
    target = raw.decode("ascii", "replace")  # h11 admits visible ASCII only
    if not target.startswith("/"):
        lowered = target.lower()
        if not (lowered.startswith(("http://", "https://"))):
            raise _Malformed(400, "Bad Request - Invalid URL", "request-target is not a path")
        try:
            parts = urlsplit(target)
            _ = parts.port  # a bad port is a ValueError here, not later
        except ValueError as exc:
            raise _Malformed(400, "Bad Request - Invalid URL", f"absolute URL: {exc}") from exc
        if not parts.hostname:
            raise _Malformed(400, "Bad Request - Invalid URL", "absolute URL without a host")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    path = target.partition("?")[0]
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Malformed(400, "Bad Request - Invalid URL", "path is not UTF-8") from exc
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded):
        raise _Malformed(400, "Bad Request - Invalid URL", "control character in the path")
    return target


class FrontDoor:
    """An HTTPS listener on 127.0.0.1 serving ``site`` with h11 and a thread per connection."""

    def __init__(self, site: CmgSite, context: ssl.SSLContext, limits: FrontDoorLimits) -> None:
        self.site = site
        self.context = context
        self.limits = limits
        self._listener: socket.socket | None = None
        self._accepting: threading.Thread | None = None
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        self._stopping = threading.Event()
        #: Connections closed at accept because ``max_connections`` were open.
        self.refused_connections = 0

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(512)
        # accept() wakes up this often to notice stop(): closing a socket another thread is
        # blocked on does not reliably wake it on Linux.
        listener.settimeout(0.2)
        self._listener = listener
        self._accepting = threading.Thread(
            target=self._accept_loop, name="pytest-cmg-gateway", daemon=True
        )
        self._accepting.start()

    @property
    def port(self) -> int:
        assert self._listener is not None
        return int(self._listener.getsockname()[1])

    @property
    def open_connections(self) -> int:
        with self._open_lock:
            return len(self._open)

    def stop(self) -> None:
        self._stopping.set()
        if self._accepting is not None:
            self._accepting.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        with self._open_lock:
            connections = list(self._open)
        for sock in connections:
            # Wakes a thread blocked in recv: it sees a closed stream and ends.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, address = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # EMFILE and the like: let connections finish, then go on
                continue
            if not self._slots.acquire(blocking=False):
                self.refused_connections += 1
                if self.refused_connections == 1 or self.refused_connections % 100 == 0:
                    self.site.service_log(
                        f"Connection from {address[0]} closed at accept: "
                        f"{self.limits.max_connections} connections open "
                        f"({self.refused_connections} refused so far)"
                    )
                with contextlib.suppress(OSError):
                    sock.close()
                continue
            with self._open_lock:
                self._open.add(sock)
            threading.Thread(
                target=self._connection, args=(sock, address[0]), name="cmg-conn", daemon=True
            ).start()

    # --- one connection -------------------------------------------------------------------

    def _connection(self, raw: socket.socket, peer: str) -> None:
        tls: ssl.SSLSocket | None = None
        try:
            raw.settimeout(self.limits.handshake_timeout)
            try:
                tls = self.context.wrap_socket(raw, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                self._client_fault(peer, f"TLS handshake failed: {exc}")
                return
            self._serve(tls, peer)
        except _ClientFault as fault:
            self._client_fault(peer, str(fault))
        except (ssl.SSLError, OSError) as exc:
            # Under TLS 1.3 a refused client certificate surfaces here, after the handshake;
            # otherwise the client reset or closed the connection.
            self._client_fault(peer, f"connection failed: {exc}")
        except Exception as exc:  # a bug of the front door itself: fail the test with it
            self.site.record_error(exc)
        finally:
            with self._open_lock:
                self._open.discard(raw)
            with contextlib.suppress(OSError):
                (tls or raw).close()
            self._slots.release()

    def _client_fault(self, peer: str, what: str) -> None:
        self.site.service_log(f"Client {peer}: {what[:200]} (the client's doing, not the CMG's)")

    def _serve(self, tls: ssl.SSLSocket, peer: str) -> None:
        der = tls.getpeercert(binary_form=True) or None
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_header_bytes)
        while not self._stopping.is_set():
            try:
                event = self._next_request(tls, conn)
            except h11.RemoteProtocolError as exc:
                self._refuse(tls, conn, _classify_h11(exc), b"", b"")
                self._linger_close(tls)
                return
            if event is None:
                return
            keep = self._exchange(tls, conn, event, der, peer)
            if not keep or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                self._linger_close(tls)
                return
            conn.start_next_cycle()

    def _receive(self, tls: ssl.SSLSocket, conn: h11.Connection, timeout: float, what: str) -> None:
        if timeout <= 0:
            raise _ClientFault(what)
        tls.settimeout(timeout)
        try:
            data = tls.recv(_RECV)
        except TimeoutError as exc:
            raise _ClientFault(what) from exc
        conn.receive_data(data)

    def _next_request(self, tls: ssl.SSLSocket, conn: h11.Connection) -> h11.Request | None:
        """Headers of the next request, within the idle and header timers; None at a clean end."""
        limits = self.limits
        # Pipelined bytes already buffered start the header timer at once.
        pipelined = bool(conn.trailing_data[0])
        deadline = time.monotonic() + limits.header_timeout if pipelined else None
        while True:
            event = conn.next_event()
            if isinstance(event, h11.Request):
                return event
            if isinstance(event, h11.ConnectionClosed):
                return None
            if event is not h11.NEED_DATA:
                return None  # PAUSED cannot happen between requests; be safe and close
            if deadline is None:
                tls.settimeout(limits.idle_timeout)
                try:
                    data = tls.recv(_RECV)
                except TimeoutError:
                    return None  # an idle keep-alive connection: closing it is routine
                deadline = time.monotonic() + limits.header_timeout
                conn.receive_data(data)
                continue
            self._receive(
                tls,
                conn,
                deadline - time.monotonic(),
                f"headers not complete after {limits.header_timeout:g} s (header timeout)",
            )

    def _exchange(
        self,
        tls: ssl.SSLSocket,
        conn: h11.Connection,
        request: h11.Request,
        der: bytes | None,
        peer: str,
    ) -> bool:
        """Read the body, ask the site, write its answer; whether the connection may go on."""
        method = request.method.decode("ascii", "replace")
        raw_target = bytes(request.target)
        headers = tuple(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in request.headers.raw_items()
        )
        try:
            if len(headers) > self.limits.max_headers:
                raise _Malformed(
                    400,
                    "Bad Request - Header Too Long",
                    f"{len(headers)} header fields (at most {self.limits.max_headers})",
                )
            target = origin_target(raw_target)
        except _Malformed as malformed:
            self._refuse(tls, conn, malformed, request.method, raw_target)
            return False
        limit = self.site.body_limit(method, target)
        declared = _declared_length(headers)
        try:
            body, complete, length = self._read_body(tls, conn, limit, declared)
        except _Malformed as malformed:
            self._refuse(tls, conn, malformed, request.method, raw_target)
            return False
        response = self.site.handle(
            SiteRequest(
                method=method,
                target=target,
                headers=headers,
                body=body,
                body_length=length,
                body_complete=complete,
                peer_certificate=der,
                client_address=peer,
            )
        )
        if not complete:
            response.close = True
        return self._write(tls, conn, request, response, peer)

    def _read_body(
        self, tls: ssl.SSLSocket, conn: h11.Connection, limit: int, declared: int | None
    ) -> tuple[bytes, bool, int]:
        """The body if it fits ``limit``; else nothing buffered and ``complete`` False.

        A body over the limit is drained (up to ``drain_limit``, briefly) but never kept, so
        the refusal that follows reaches a client that is still sending.
        """
        if declared is not None and declared > limit:
            self._drain(tls, conn)
            return b"", False, declared
        if conn.they_are_waiting_for_100_continue:
            # .NET's HttpClient waits for this before sending a POST body, as HTTP.sys sends it.
            tls.sendall(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        deadline = time.monotonic() + self.limits.body_timeout
        parts: list[bytes] = []
        size = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.trailing_data[1]:  # the client closed mid-body: no one to answer
                    msg = f"closed the connection after {size} body bytes"
                    raise _ClientFault(msg) from exc
                # Broken chunk framing ("zz", "-1", a bad chunk end): HTTP.sys answers 400.
                raise _Malformed(400, "Bad Request", f"body framing: {exc}") from exc
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    self._drain(tls, conn)
                    return b"", False, max(size, declared or 0)
                parts.append(bytes(event.data))
                continue
            if isinstance(event, h11.EndOfMessage):
                return b"".join(parts), True, size
            if event is h11.NEED_DATA:
                self._receive(
                    tls,
                    conn,
                    deadline - time.monotonic(),
                    f"sent {size} of {declared if declared is not None else 'a chunked'} body "
                    f"bytes, then nothing for the rest of {self.limits.body_timeout:g} s",
                )
                continue
            msg = f"body ended early ({size} bytes received)"
            raise _ClientFault(msg)

    def _drain(self, tls: ssl.SSLSocket, conn: h11.Connection) -> None:
        drained = 0
        deadline = time.monotonic() + min(self.limits.body_timeout, 2.0)
        with contextlib.suppress(_ClientFault, h11.RemoteProtocolError, OSError):
            while drained < self.limits.drain_limit:
                event = conn.next_event()
                if isinstance(event, h11.Data):
                    drained += len(event.data)
                elif event is h11.NEED_DATA:
                    self._receive(tls, conn, deadline - time.monotonic(), "drain")
                else:
                    return

    def _write(
        self,
        tls: ssl.SSLSocket,
        conn: h11.Connection,
        request: h11.Request,
        response: SiteResponse,
        peer: str,
    ) -> bool:
        if response.drop:
            return False
        headers = [
            ("Server", _IIS),
            ("Date", formatdate(usegmt=True)),
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *response.headers.items(),
        ]
        if response.close:
            headers.append(("Connection", "close"))
        payload = response.body if response.truncate is None else response.body[: response.truncate]
        try:
            out = conn.send(
                h11.Response(
                    status_code=response.status,
                    headers=headers,
                    reason=response.reason.encode("latin-1", "replace"),
                )
            )
            out = out or b""
            if request.method != b"HEAD":  # h11 frames a HEAD answer's (absent) body itself
                out += conn.send(h11.Data(data=payload)) or b""
            if response.truncate is None:
                out += conn.send(h11.EndOfMessage()) or b""
            tls.sendall(out or b"")
        except OSError as exc:
            self._client_fault(peer, f"went away before the answer was written ({exc})")
            return False
        return not response.close and response.truncate is None

    def _refuse(
        self,
        tls: ssl.SSLSocket,
        conn: h11.Connection,
        malformed: _Malformed,
        method: bytes,
        target: bytes,
    ) -> None:
        """HTTP.sys's refusal of a malformed request; the connection then closes."""
        response = self.site.refuse_malformed(
            method.decode("latin-1"),
            target.decode("latin-1"),
            malformed.status,
            _REASONS.get(malformed.status, "Bad Request"),
            f"{malformed.title}: {malformed.detail}",
        )
        page = _httpapi_page(malformed.status, malformed.title)
        # Written by hand, not through h11: after a protocol error h11 may no longer be in a
        # state that lets it frame an answer, and this one is fixed text anyway.
        head = (
            f"HTTP/1.1 {malformed.status} {response.reason}\r\n"
            "Content-Type: text/html; charset=us-ascii\r\n"
            f"Server: {_HTTPAPI}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\n"
            "Connection: close\r\n"
            f"Content-Length: {len(page)}\r\n\r\n"
        ).encode("ascii")
        with contextlib.suppress(OSError):
            tls.sendall(head + page)

    def _linger_close(self, tls: ssl.SSLSocket) -> None:
        """Half-close, then read what the client still sends for a moment before closing.

        Closing a socket with unread data makes the kernel send a reset, which can destroy the
        answer before the client reads it; this is the lingering close Apache and HTTP.sys do.
        """
        with contextlib.suppress(OSError):
            tls.shutdown(socket.SHUT_WR)
            tls.settimeout(0.5)
            deadline = time.monotonic() + 1.0
            read = 0
            while time.monotonic() < deadline and read < self.limits.drain_limit:
                chunk = tls.recv(_RECV)
                if not chunk:
                    break
                read += len(chunk)


def _declared_length(headers: tuple[tuple[str, str], ...]) -> int | None:
    """The Content-Length h11 already validated, or None (chunked or no body)."""
    for name, value in headers:
        if name.lower() == "content-length":
            with contextlib.suppress(ValueError):
                return int(value)
    return None
