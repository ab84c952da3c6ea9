"""One client connection of the fault proxy: read a request, forward it, pump the answer back.

Each client connection is served by one daemon thread that owns a kept-alive upstream
connection of its own. Heads are forwarded byte-for-byte (except the headers ``ignore_range``
removes); only the response body passes through the fault pipeline (:meth:`Connection._pump`),
which applies a :class:`~pytest_cmg._net.faults.Plan` by payload offset.

Request bodies (``Content-Length`` or chunked) are read whole, then forwarded, which is what lets
a request be replayed once on a fresh upstream connection when Azurite (``Keep-Alive:
timeout=5``) closed an idle kept-alive one between two requests. ``Expect: 100-continue`` is
answered here and not forwarded; request bodies are at most 16 MiB.

``reset_after`` waits (bounded by the proxy's ``timeout``) until the kernel has handed the n
bytes to the peer before the RST (Linux ``TIOCOUTQ``), because an abortive close discards unsent
data and the client would otherwise see fewer than n bytes. ``fcntl``/``termios`` are therefore
imported at module level: Linux, or another POSIX with ``TIOCOUTQ``.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import logging
import select
import socket
import struct
import termios
import threading
import time
from typing import TYPE_CHECKING, Literal

from .._errors import PytestCmgError
from .wire import (
    IO_CHUNK,
    BadMessageError,
    Reader,
    chunked_pieces,
    content_length,
    describe,
    is_chunked,
    length_pieces,
    parse_head,
    path_of,
    reason_phrase,
    until_close_pieces,
    wants_close,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from .faults import Fault, Plan
    from .proxy import FaultProxy, Record
    from .wire import Head

__all__ = ["Connection"]

_log = logging.getLogger(__name__)

_MAX_REQUEST_BODY = 16 * 1024 * 1024
_DRAIN_POLL_SECONDS = 0.001
_RANGE_HEADERS = ("x-ms-range", "range")
# A server that has lost range support cannot honour the per-range checksum headers either, and
# the Get Blob reference has real Azure answer 400 to them without a range (Azurite 3.37 does not),
# which would hide the 200-with-everything this fault is meant to produce.
_IGNORE_RANGE_DROPS = frozenset(
    {"range", "x-ms-range", "x-ms-range-get-content-md5", "x-ms-range-get-content-crc64"}
)


class _UpstreamError(PytestCmgError):
    """Upstream could not be reached, closed early, or answered garbage."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


class _ClientGoneError(PytestCmgError):
    """The client socket failed while we were writing to it."""


def _upstream_pieces(pieces: Iterator[tuple[bool, bytes]]) -> Iterator[tuple[bool, bytes]]:
    """Turn read failures into _UpstreamError so they are not mistaken for client failures."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            return
        except (OSError, BadMessageError) as exc:
            raise _UpstreamError(describe(exc)) from exc
        yield piece


class Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.client = client
        self.number = number
        self.client_reader = Reader(client)
        self.upstream: socket.socket | None = None
        self.upstream_reader: Reader | None = None
        self.thread = threading.Thread(
            target=self.run, name=f"faultproxy-{proxy.port}-conn-{number}", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.proxy._stopping.is_set():
                try:
                    raw = self.client_reader.read_head()
                except BadMessageError:
                    self._send_simple(400, "Bad Request")
                    return
                except OSError:
                    return
                if raw is None or not self._serve(raw):
                    return
        except Exception:
            # A proxy bug must show up in the test output, not as a silently hung client.
            _log.exception("fault proxy connection %s failed", self.number)
        finally:
            self._close_client_gracefully()
            self._drop_upstream()
            self.proxy._forget(self)

    def abort(self) -> None:
        """From stop(): wake a thread blocked in recv/send and free both sockets."""
        for sock in (self.client, self.upstream):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    sock.close()

    # -- one request -----------------------------------------------------------------------

    def _serve(self, raw: bytes) -> bool:
        """Handle one request; True if the client connection may carry another one."""
        try:
            head = parse_head(raw)
            method, target, version = head.first_line.split(" ")
            if not version.startswith("HTTP/1."):
                msg = "not HTTP/1.x"
                raise BadMessageError(msg)
            body = self._read_request_body(head)
        except (BadMessageError, ValueError):
            self._send_simple(400, "Bad Request")
            return False
        except (OSError, _ClientGoneError):
            return False
        if body is None:
            self._send_simple(413, "Content Too Large")
            return False

        range_value = next((v for n in _RANGE_HEADERS if (v := head.get(n)) is not None), None)
        rec, plan = self.proxy._begin(self.number, method, path_of(target), range_value)
        try:
            return self._exchange(rec, plan, head, method, version, body)
        except _ClientGoneError:
            self.proxy._set(rec, outcome="client_gone")
            return False
        finally:
            self.proxy._finish(rec)

    def _read_request_body(self, head: Head) -> bytes | None:
        """The raw body (framing kept); None if it is too large to buffer."""
        chunked = is_chunked(head)
        length = None if chunked else content_length(head)
        if not chunked and not length:
            return b""
        if "100-continue" in head.tokens("expect"):
            # The Expect header is dropped upstream, so the interim answer has to come from here.
            self._to_client(b"HTTP/1.1 100 Continue\r\n\r\n")
        if length is not None:
            if length > _MAX_REQUEST_BODY:
                return None
            return self.client_reader.read_exact(length)
        out = bytearray()
        for _payload, data in chunked_pieces(self.client_reader):
            out += data
            if len(out) > _MAX_REQUEST_BODY:
                return None
        return bytes(out)

    def _exchange(
        self, rec: Record, plan: Plan, head: Head, method: str, version: str, body: bytes
    ) -> bool:
        client_close = wants_close(version, head)
        if plan.close_before_headers:
            self.proxy._set(rec, outcome="closed_before_headers")
            self._close_client_gracefully()
            return False
        if plan.respond is not None:
            return self._respond(rec, plan, plan.respond, method, client_close)

        try:
            resp_head, status = self._round_trip(self._upstream_head(head, plan) + body, rec)
        except _UpstreamError as exc:
            _log.debug("fault proxy request %s: upstream failed: %s", rec.number, exc)
            self.proxy._set(rec, outcome="upstream_error", status=502)
            self._send_simple(502, "Bad Gateway")
            return False

        resp_version = resp_head.first_line.split(" ", 1)[0]
        no_body = method == "HEAD" or status in (204, 304)
        try:
            chunked = not no_body and is_chunked(resp_head)
            length = None if no_body or chunked else content_length(resp_head)
        except BadMessageError:
            self._drop_upstream()
            self.proxy._set(rec, outcome="upstream_error", status=502)
            self._send_simple(502, "Bad Gateway")
            return False
        until_close = not no_body and not chunked and length is None
        upstream_close = until_close or wants_close(resp_version, resp_head)

        if plan.delay:
            self.proxy._sleep(plan.delay)
        self.proxy._set(rec, status=status, retry_after=resp_head.get("Retry-After"))
        self._to_client(resp_head.raw)

        assert self.upstream_reader is not None
        pieces: Iterator[tuple[bool, bytes]]
        if no_body:
            pieces = iter(())
        elif chunked:
            pieces = chunked_pieces(self.upstream_reader)
        elif length is not None:
            pieces = length_pieces(self.upstream_reader, length)
        else:
            pieces = until_close_pieces(self.upstream_reader)
        try:
            result = self._pump(_upstream_pieces(pieces), rec, plan)
        except _UpstreamError as exc:
            _log.debug("fault proxy request %s: upstream failed mid-body: %s", rec.number, exc)
            self._drop_upstream()
            self.proxy._set(rec, outcome="upstream_error")
            return False
        if result != "complete":
            return False
        self.proxy._set(rec, outcome="complete")
        if upstream_close:
            self._drop_upstream()
        return not (client_close or until_close)

    def _respond(
        self, rec: Record, plan: Plan, fault: Fault, method: str, client_close: bool
    ) -> bool:
        headers = list(fault.headers)
        if not any(n.lower() == "content-length" for n, _ in headers):
            headers.append(("Content-Length", str(len(fault.body))))
        text = f"HTTP/1.1 {fault.status} {reason_phrase(fault.status)}\r\n"
        text += "".join(f"{n}: {v}\r\n" for n, v in headers) + "\r\n"
        if plan.delay:
            self.proxy._sleep(plan.delay)
        wait = next((v for n, v in headers if n.lower() == "retry-after"), None)
        self.proxy._set(rec, status=fault.status, retry_after=wait)
        self._to_client(text.encode("latin-1"))
        body = b"" if method == "HEAD" else fault.body
        result = self._pump(iter([(True, body)] if body else []), rec, plan)
        if result != "complete":
            return False
        self.proxy._set(rec, outcome="complete")
        scripted_close = any(
            n.lower() == "connection" and "close" in v.lower() for n, v in fault.headers
        )
        return not (client_close or scripted_close)

    def _upstream_head(self, head: Head, plan: Plan) -> bytes:
        dropped = {"expect"}
        if plan.ignore_range:
            dropped |= _IGNORE_RANGE_DROPS
        kept = [
            line
            for line, (name, _value) in zip(head.lines, head.headers, strict=True)
            if name not in dropped
        ]
        return b"\r\n".join([head.first_line.encode("latin-1"), *kept]) + b"\r\n\r\n"

    # -- upstream --------------------------------------------------------------------------

    def _ensure_upstream(self) -> bool:
        """Connect if needed; True when an already-used connection is reused."""
        if self.upstream is not None:
            readable, _, _ = select.select([self.upstream], [], [], 0)
            # Idle and readable means EOF (Azurite's keep-alive timeout) or stray bytes: unusable.
            if not readable:
                return True
            self._drop_upstream()
        try:
            sock = socket.create_connection(
                (self.proxy._up_host, self.proxy._up_port), timeout=self.proxy.timeout
            )
        except OSError as exc:
            msg = f"cannot connect to upstream: {exc}"
            raise _UpstreamError(msg) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.proxy._count_upstream()
        self.upstream = sock
        self.upstream_reader = Reader(sock)
        if self.proxy._stopping.is_set():
            self._drop_upstream()
            msg = "proxy is stopping"
            raise _UpstreamError(msg)
        return False

    def _round_trip(self, request: bytes, rec: Record) -> tuple[Head, int]:
        for attempt in (1, 2):
            reused = self._ensure_upstream()
            try:
                return self._send_and_read_head(request, rec)
            except _UpstreamError as exc:
                self._drop_upstream()
                # Only an idle connection closed under us is safe to replay on: upstream never
                # started to answer, so it did not act on the request.
                if not (attempt == 1 and reused and exc.retryable):
                    raise
        msg = "unreachable"
        raise AssertionError(msg)

    def _send_and_read_head(self, request: bytes, rec: Record) -> tuple[Head, int]:
        assert self.upstream is not None
        assert self.upstream_reader is not None
        try:
            self.upstream.sendall(request)
            self.proxy._set(rec, forwarded=True)
            while True:
                raw = self.upstream_reader.read_head()
                if raw is None:
                    msg = "upstream closed the connection before answering"
                    raise _UpstreamError(msg, retryable=True)
                head = parse_head(raw)
                parts = head.first_line.split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                    msg = "malformed status line"
                    raise BadMessageError(msg)
                status = int(parts[1])
                if status == 101:
                    msg = "upstream switched protocols, which this proxy cannot follow"
                    raise _UpstreamError(msg)
                if status >= 200:
                    return head, status
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _UpstreamError(str(exc), retryable=not self.upstream_reader.buf) from exc
        except (OSError, BadMessageError) as exc:
            raise _UpstreamError(describe(exc)) from exc

    def _drop_upstream(self) -> None:
        sock, self.upstream, self.upstream_reader = self.upstream, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- body pipeline ---------------------------------------------------------------------

    def _pump(
        self, pieces: Iterator[tuple[bool, bytes]], rec: Record, plan: Plan
    ) -> Literal["complete", "reset", "close"]:
        """Forward body pieces with the plan's faults applied by payload offset."""
        stalls = list(plan.stalls)
        cut = plan.cut
        rate = plan.rate
        # Small slices so a throttled body flows steadily and a fake sleep sees every pause.
        step = max(1, min(IO_CHUNK, rate // 8)) if rate else IO_CHUNK
        pos = 0

        def events_at(pos: int) -> Literal["reset", "close"] | None:
            held = False
            while stalls and stalls[0][0] <= pos:
                self.proxy._sleep(stalls.pop(0)[1])
                held = True
            if held and self._client_left():
                # A client that went away while the body was held (a killed process, a power
                # cut) is sent nothing more: those bytes would count as served, unreceived.
                msg = f"the client closed the connection during a stall at body byte {pos}"
                raise _ClientGoneError(msg)
            if cut is not None and cut[0] <= pos:
                self._cut(rec, cut[1])
                return cut[1]
            return None

        for is_payload, data in pieces:
            if not is_payload:
                if (done := events_at(pos)) is not None:
                    return done
                self._to_client(data)
                continue
            view = memoryview(data)
            i = 0
            while i < len(view):
                if (done := events_at(pos)) is not None:
                    return done
                n = min(len(view) - i, step)
                for boundary in (stalls[0][0] if stalls else None, cut[0] if cut else None):
                    if boundary is not None and boundary > pos:
                        n = min(n, boundary - pos)
                piece = bytearray(view[i : i + n])
                first = bisect.bisect_left(plan.flips, pos)
                for off in plan.flips[first : bisect.bisect_left(plan.flips, pos + n)]:
                    piece[off - pos] ^= 0xFF
                if rate:
                    self.proxy._sleep(n / rate)
                self._body_to_client(piece, rec)
                pos += n
                i += n
        if (done := events_at(pos)) is not None:
            return done
        return "complete"

    def _cut(self, rec: Record, kind: Literal["reset", "close"]) -> None:
        # The outcome is recorded before the client can observe the cut, so a test that reads the
        # log right after its exception sees it.
        if kind == "reset":
            self._wait_delivered()
            self.proxy._set(rec, outcome="reset")
            with contextlib.suppress(OSError):
                self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            with contextlib.suppress(OSError):
                self.client.close()
        else:
            self.proxy._set(rec, outcome="closed")
            self._close_client_gracefully()
        # The upstream response was not read to its end, so that connection cannot be reused.
        self._drop_upstream()

    def _wait_delivered(self) -> None:
        """Wait until the kernel has no unsent/unacked bytes for the client (bounded)."""
        deadline = time.monotonic() + self.proxy.timeout
        while time.monotonic() < deadline:
            try:
                raw = fcntl.ioctl(self.client.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
            except (OSError, ValueError):
                return
            if struct.unpack("i", raw)[0] <= 0:
                return
            if self.proxy._stopping.wait(_DRAIN_POLL_SECONDS):
                return

    # -- client side -----------------------------------------------------------------------

    def _client_left(self) -> bool:
        """Whether the client has closed its end (EOF or an error waiting), input left unread."""
        try:
            readable, _, _ = select.select([self.client], [], [], 0)
            # Readable: EOF, an error, or the next request's bytes (a client that is still there).
            return bool(readable) and self.client.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):  # ValueError: the socket was closed here (stop())
            return True

    def _to_client(self, data: bytes | bytearray) -> None:
        try:
            self.client.sendall(data)
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    def _body_to_client(self, data: bytearray, rec: Record) -> None:
        # Counted before sending so the log is never behind what the client has seen; whatever the
        # kernel refused is taken back off.
        self.proxy._add_bytes(rec, len(data))
        view = memoryview(data)
        sent = 0
        try:
            while sent < len(view):
                sent += self.client.send(view[sent:])
        except OSError as exc:
            self.proxy._add_bytes(rec, sent - len(view))
            raise _ClientGoneError(str(exc)) from exc

    def _send_simple(self, status: int, reason: str) -> None:
        body = f"{status} {reason} (pytest-cmg fault proxy)\n".encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        with contextlib.suppress(_ClientGoneError):
            self._to_client(head.encode("latin-1") + body)

    def _close_client_gracefully(self) -> None:
        # Closing with unread input makes Linux send RST instead of FIN, so read what is left.
        with contextlib.suppress(OSError):
            self.client.setblocking(False)
            for _ in range(64):
                if not self.client.recv(IO_CHUNK):
                    break
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            self.client.close()
