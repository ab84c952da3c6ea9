"""A scriptable HTTP/1.1 fault proxy in front of one blob endpoint (toxiproxy is not available).

The client's download core has to be tested against storage that misbehaves the way real networks
and servers do: connections reset or closed mid-body, stalls, slow links, a flipped byte, a late
answer, an answer with no bytes at all, 5xx with ``Retry-After``, a server that stops honouring
``Range``. Azurite does none of that on its own, so :class:`FaultProxy` sits between the client and
Azurite on 127.0.0.1 and injects those faults.

Design
------
* **HTTP-aware, not a byte pipe.** The proxy parses each request head and each response head, so
  faults are addressed by *request number* and *response-body offset*, which is what tests reason
  about ("RST after 300 000 body bytes of the second request"). Heads are forwarded byte-for-byte
  (except the headers :func:`ignore_range` removes); only the body passes through the fault
  pipeline.
* **Deterministic.** Faults are scripted with :meth:`FaultProxy.add` for a global request number
  (counted across all client connections in arrival order) or for the next N requests. Nothing is
  random, so a failing test fails the same way every time.
* **Threads and blocking sockets**, like the rest of the project: one daemon thread accepts, one
  daemon thread serves each client connection and owns a kept-alive upstream connection of its
  own. Keep-alive on the client side works, so the SDK's and ``requests``' connection pools behave
  as they do against real storage.
* **Bounded.** Every socket has a timeout (``timeout``, 30 s by default), :meth:`FaultProxy.stop`
  joins with a bound, and all waits go through the injectable ``sleep``. The default
  (``time.sleep``) is replaced by a wait on the proxy's stop event, so ``stop()`` cuts a real
  stall short instead of leaving a thread asleep. Tests pass a fake ``sleep`` that records the
  requested seconds and returns at once.
* **No secrets kept.** The log keeps the path without its query string: SAS signatures never
  reach the log, reprs or error messages.

Body faults count *payload* bytes. Azurite sends blob bodies with ``Content-Length`` but its error
answers (403 ``AuthorizationFailure``, 404, ...) with ``Transfer-Encoding: chunked``, so chunked
bodies are handled fully: the chunk framing is parsed and forwarded unchanged while offsets count
only the de-chunked payload, so ``flip_byte(10)`` flips the 11th payload byte and never a framing
byte, and ``reset_after(n)`` cuts after n payload bytes (before the next framing line). Request
bodies (``Content-Length`` or chunked) are read whole, then forwarded, which is what lets a request
be replayed once on a fresh upstream connection when Azurite (``Keep-Alive: timeout=5``) closed an
idle kept-alive one between two requests.

Limits
------
* Linux (or another POSIX with ``TIOCOUTQ``): ``fcntl``/``termios`` are imported at module level,
  as ``azurite.py`` already does for ``fcntl``.
* Upstream is plain ``http`` only (Azurite started without ``--cert``); the client side is plain
  HTTP on 127.0.0.1. The ``Host`` header is forwarded as the client sent it (Azurite reads the
  account from the path for IP hosts, and SAS/Shared Key signatures do not cover the host).
* ``Expect: 100-continue`` is answered by the proxy and not forwarded.
* The log is written before the client can observe anything (status before the head, body bytes
  before they are sent, ``reset``/``closed`` before the cut), but ``complete`` only after the last
  byte: call :meth:`FaultProxy.wait_idle` before asserting on outcomes of finished requests.
* Heads must use CRLF line ends and be at most 64 KiB; request bodies at most 16 MiB.
* ``Upgrade``/``101`` and ``CONNECT`` are not supported; absolute-form request targets are
  forwarded as they are.
* ``reset_after`` waits (bounded by ``timeout``) until the kernel has handed the n bytes to the
  peer before the RST (Linux ``TIOCOUTQ``), because an abortive close discards unsent data and the
  client would otherwise see fewer than n bytes. A client that stops reading holds that wait up
  to ``timeout``.
* ``throttle`` sleeps ``slice / rate`` before each slice, so the real rate is slightly below the
  configured one (send time is not subtracted); with a fake sleep the requested total is exactly
  ``body_length / rate``.
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import http
import logging
import math
import select
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from types import TracebackType
    from typing import Self

__all__ = [
    "Fault",
    "FaultKind",
    "FaultProxy",
    "ProxiedRequest",
    "close_after",
    "close_before_headers",
    "delay",
    "flip_byte",
    "ignore_range",
    "reset_after",
    "respond",
    "stall_after",
    "throttle",
]

_log = logging.getLogger(__name__)

FaultKind = Literal[
    "reset_after",
    "close_after",
    "stall_after",
    "throttle",
    "delay",
    "flip_byte",
    "close_before_headers",
    "respond",
    "ignore_range",
]

_MAX_HEAD = 64 * 1024
_MAX_REQUEST_BODY = 16 * 1024 * 1024
_IO_CHUNK = 64 * 1024
_ACCEPT_POLL_SECONDS = 0.5
_JOIN_SECONDS = 5.0
_DRAIN_POLL_SECONDS = 0.001
_RANGE_HEADERS = ("x-ms-range", "range")
# A server that has lost range support cannot honour the per-range checksum headers either, and
# the Get Blob reference has real Azure answer 400 to them without a range (Azurite 3.37 does not),
# which would hide the 200-with-everything this fault is meant to produce.
_IGNORE_RANGE_DROPS = frozenset(
    {"range", "x-ms-range", "x-ms-range-get-content-md5", "x-ms-range-get-content-crc64"}
)


# --------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour; build it with the functions below rather than directly.

    ``offset`` is the response-body offset of ``reset_after``/``close_after``/``stall_after``/
    ``flip_byte``; ``seconds`` is used by ``stall_after`` and ``delay``; ``rate`` (bytes per
    second) by ``throttle``; ``status``/``headers``/``body`` by ``respond``.
    """

    kind: FaultKind
    offset: int = 0
    seconds: float = 0.0
    rate: int = 0
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""

    def __post_init__(self) -> None:
        if self.offset < 0:
            msg = f"{self.kind}: the body offset must be >= 0, not {self.offset}"
            raise ValueError(msg)
        if not math.isfinite(self.seconds) or self.seconds < 0:
            msg = f"{self.kind}: seconds must be a finite number >= 0, not {self.seconds!r}"
            raise ValueError(msg)
        if self.kind == "throttle" and self.rate <= 0:
            msg = f"throttle: bytes_per_second must be > 0, not {self.rate}"
            raise ValueError(msg)
        if self.kind == "respond":
            # 1xx would be taken for an interim answer and leave the client waiting for a final one.
            if not 200 <= self.status <= 599:
                msg = f"respond: status must be a final status 200-599, not {self.status}"
                raise ValueError(msg)
            for name, value in self.headers:
                broken = not name or any(c in name for c in "\r\n:") or "\r" in value
                if broken or "\n" in value or not (name + value).isascii():
                    msg = f"respond: header {name!r} would break the response head"
                    raise ValueError(msg)

    @property
    def name(self) -> str:
        """Short, stable description used in :attr:`ProxiedRequest.faults`."""
        if self.kind in ("reset_after", "close_after", "flip_byte"):
            return f"{self.kind}({self.offset})"
        if self.kind == "stall_after":
            return f"stall_after({self.offset}, {self.seconds:g})"
        if self.kind == "throttle":
            return f"throttle({self.rate})"
        if self.kind == "delay":
            return f"delay({self.seconds:g})"
        if self.kind == "respond":
            return f"respond({self.status})"
        return f"{self.kind}()"


def reset_after(n: int) -> Fault:
    """After ``n`` response-body bytes, abort the client connection with a TCP RST."""
    return Fault("reset_after", offset=n)


def close_after(n: int) -> Fault:
    """After ``n`` response-body bytes, close the client connection cleanly (FIN)."""
    return Fault("close_after", offset=n)


def stall_after(n: int, seconds: float) -> Fault:
    """After ``n`` body bytes, forward nothing for ``seconds`` (through ``sleep``), then go on."""
    return Fault("stall_after", offset=n, seconds=seconds)


def throttle(bytes_per_second: int) -> Fault:
    """Pace the response body at about ``bytes_per_second`` (through ``sleep``)."""
    return Fault("throttle", rate=bytes_per_second)


def delay(seconds: float) -> Fault:
    """Wait ``seconds`` (through ``sleep``) before forwarding the response head."""
    return Fault("delay", seconds=seconds)


def flip_byte(offset: int) -> Fault:
    """XOR 0xFF the response-body byte at ``offset`` (0-based within the body)."""
    return Fault("flip_byte", offset=offset)


def close_before_headers() -> Fault:
    """Read the request, forward nothing, close the connection without a single response byte."""
    return Fault("close_before_headers")


def respond(status: int, *, headers: dict[str, str] | None = None, body: bytes = b"") -> Fault:
    """Answer ``status`` with these headers and body instead of forwarding the request.

    ``Content-Length`` is added unless given. Body faults (reset, flip, ...) scripted for the same
    request apply to this body.
    """
    return Fault("respond", status=status, headers=tuple((headers or {}).items()), body=body)


def ignore_range() -> Fault:
    """Forward the request without ``Range``/``x-ms-range``: upstream answers 200, full body."""
    return Fault("ignore_range")


@dataclass
class _Plan:
    """The faults of one request, folded into what the forwarding code needs to know."""

    names: tuple[str, ...] = ()
    close_before_headers: bool = False
    respond: Fault | None = None
    ignore_range: bool = False
    delay: float = 0.0
    rate: int | None = None
    stalls: list[tuple[int, float]] = field(default_factory=list)
    flips: list[int] = field(default_factory=list)
    cut: tuple[int, Literal["reset", "close"]] | None = None

    @classmethod
    def build(cls, faults: Iterable[Fault]) -> _Plan:
        plan = cls()
        names: list[str] = []
        for fault in faults:
            names.append(fault.name)
            if fault.kind == "close_before_headers":
                plan.close_before_headers = True
            elif fault.kind == "respond":
                plan.respond = plan.respond or fault
            elif fault.kind == "ignore_range":
                plan.ignore_range = True
            elif fault.kind == "delay":
                plan.delay += fault.seconds
            elif fault.kind == "throttle":
                plan.rate = fault.rate if plan.rate is None else min(plan.rate, fault.rate)
            elif fault.kind == "stall_after":
                plan.stalls.append((fault.offset, fault.seconds))
            elif fault.kind == "flip_byte":
                plan.flips.append(fault.offset)
            else:
                kind: Literal["reset", "close"] = (
                    "reset" if fault.kind == "reset_after" else "close"
                )
                if plan.cut is None or fault.offset < plan.cut[0]:
                    plan.cut = (fault.offset, kind)
        plan.names = tuple(names)
        plan.stalls.sort()
        plan.flips = sorted(set(plan.flips))
        return plan


# --------------------------------------------------------------------------------------------
# Log
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxiedRequest:
    """What happened to one request (a snapshot; :attr:`FaultProxy.log` makes new ones).

    ``path`` never includes the query string. ``range`` is the ``x-ms-range`` value the client
    sent, else its ``Range`` value. ``forwarded`` tells whether the request reached upstream.
    ``status`` is the status sent to the client (upstream's or a scripted one), None if no head
    was sent. ``body_bytes`` counts body bytes handed to the client socket. ``outcome`` is None
    while the request is in flight, then one of ``complete``, ``reset``, ``closed``,
    ``closed_before_headers``, ``upstream_error``, ``client_gone``, ``error``. ``started`` is
    when the request's head was read (``time.monotonic``, real time whatever ``sleep`` is), and
    ``retry_after`` the ``Retry-After`` value sent with the answer, if any: together they tell
    whether a client waited as it was asked to.
    """

    number: int
    connection: int
    method: str
    path: str
    range: str | None
    faults: tuple[str, ...]
    forwarded: bool
    status: int | None
    body_bytes: int
    outcome: str | None
    started: float = 0.0
    retry_after: str | None = None


@dataclass
class _Record:
    number: int
    connection: int
    method: str
    path: str
    range: str | None
    faults: tuple[str, ...]
    forwarded: bool = False
    status: int | None = None
    body_bytes: int = 0
    outcome: str | None = None
    started: float = field(default_factory=time.monotonic)
    retry_after: str | None = None

    def snapshot(self) -> ProxiedRequest:
        return ProxiedRequest(
            number=self.number,
            connection=self.connection,
            method=self.method,
            path=self.path,
            range=self.range,
            faults=self.faults,
            forwarded=self.forwarded,
            status=self.status,
            body_bytes=self.body_bytes,
            outcome=self.outcome,
            started=self.started,
            retry_after=self.retry_after,
        )


@dataclass
class _Pending:
    fault: Fault
    first: int | None
    remaining: int
    #: Only requests whose decoded path contains this count, and are numbered, for this fault.
    path: str | None = None
    seen: int = 0


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------


class _BadMessageError(Exception):
    """The peer sent something this proxy cannot parse as HTTP/1.1."""


class _UpstreamError(Exception):
    """Upstream could not be reached, closed early, or answered garbage."""

    def __init__(self, reason: str, *, retryable: bool = False) -> None:
        super().__init__(reason)
        self.retryable = retryable


class _ClientGoneError(Exception):
    """The client socket failed while we were writing to it."""


class _Reader:
    """Buffered reads from a socket, so heads can be split from the body bytes behind them."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(_IO_CHUNK)
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
            if searched > _MAX_HEAD:
                msg = f"message head longer than {_MAX_HEAD} bytes"
                raise _BadMessageError(msg)
            if not self._fill():
                if not self.buf:
                    return None
                msg = "connection closed inside a message head"
                raise _BadMessageError(msg)

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[: end + 1])
                del self.buf[: end + 1]
                return line
            if len(self.buf) > _MAX_HEAD:
                msg = "line too long"
                raise _BadMessageError(msg)
            if not self._fill():
                msg = "connection closed inside a line"
                raise _BadMessageError(msg)

    def read_some(self, n: int) -> bytes:
        """Up to ``n`` bytes (buffered ones first); b"" only at EOF."""
        if self.buf:
            data = bytes(self.buf[:n])
            del self.buf[:n]
            return data
        return self.sock.recv(min(n, _IO_CHUNK))

    def read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self.read_some(n - len(out))
            if not data:
                msg = f"connection closed after {len(out)} of {n} body bytes"
                raise _BadMessageError(msg)
            out += data
        return bytes(out)


@dataclass
class _Head:
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


def _parse_head(raw: bytes) -> _Head:
    lines = raw[:-4].split(b"\r\n")
    first = lines[0].decode("latin-1")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            msg = "obsolete header line folding"
            raise _BadMessageError(msg)
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip():
            msg = "malformed header line"
            raise _BadMessageError(msg)
        headers.append((name.decode("latin-1").lower(), value.decode("latin-1").strip()))
    return _Head(raw=raw, first_line=first, lines=lines[1:], headers=headers)


def _content_length(head: _Head) -> int | None:
    values = {v.strip() for raw in head.values("content-length") for v in raw.split(",")}
    if not values:
        return None
    if len(values) != 1 or not next(iter(values)).isdigit():
        msg = "invalid Content-Length"
        raise _BadMessageError(msg)
    return int(next(iter(values)))


def _is_chunked(head: _Head) -> bool:
    codings = [t.strip().lower() for v in head.values("transfer-encoding") for t in v.split(",")]
    codings = [c for c in codings if c]
    if not codings:
        return False
    if codings[-1] != "chunked":
        msg = f"unsupported Transfer-Encoding {', '.join(codings)}"
        raise _BadMessageError(msg)
    return True


def _chunked_pieces(reader: _Reader) -> Iterator[tuple[bool, bytes]]:
    """(is_payload, bytes) pieces of a chunked body; framing pieces are forwarded verbatim."""
    while True:
        line = reader.read_line()
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            msg = "malformed chunk size line"
            raise _BadMessageError(msg) from None
        yield False, line
        if size == 0:
            while True:
                trailer = reader.read_line()
                yield False, trailer
                if trailer in (b"\r\n", b"\n"):
                    return
        remaining = size
        while remaining:
            data = reader.read_some(min(remaining, _IO_CHUNK))
            if not data:
                msg = "connection closed inside a chunk"
                raise _BadMessageError(msg)
            remaining -= len(data)
            yield True, data
        crlf = reader.read_line()
        if crlf not in (b"\r\n", b"\n"):
            msg = "chunk not followed by CRLF"
            raise _BadMessageError(msg)
        yield False, crlf


def _length_pieces(reader: _Reader, length: int) -> Iterator[tuple[bool, bytes]]:
    remaining = length
    while remaining:
        data = reader.read_some(min(remaining, _IO_CHUNK))
        if not data:
            msg = f"upstream closed after {length - remaining} of {length} body bytes"
            raise _BadMessageError(msg)
        remaining -= len(data)
        yield True, data


def _until_close_pieces(reader: _Reader) -> Iterator[tuple[bool, bytes]]:
    while data := reader.read_some(_IO_CHUNK):
        yield True, data


def _upstream_pieces(pieces: Iterator[tuple[bool, bytes]]) -> Iterator[tuple[bool, bytes]]:
    """Turn read failures into _UpstreamError so they are not mistaken for client failures."""
    while True:
        try:
            piece = next(pieces)
        except StopIteration:
            return
        except (OSError, _BadMessageError) as exc:
            raise _UpstreamError(_describe(exc)) from exc
        yield piece


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _path_of(target: str) -> str:
    """The request target without query or fragment (the query carries the SAS signature)."""
    if "://" in target:
        target = urlsplit(target.partition("?")[0]).path or "/"
    return target.partition("?")[0].partition("#")[0]


def _wants_close(version: str, head: _Head) -> bool:
    tokens = head.tokens("connection")
    if "close" in tokens:
        return True
    return version == "HTTP/1.0" and "keep-alive" not in tokens


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Status"


# --------------------------------------------------------------------------------------------
# One client connection
# --------------------------------------------------------------------------------------------


class _Connection:
    def __init__(self, proxy: FaultProxy, client: socket.socket, number: int) -> None:
        self.proxy = proxy
        self.client = client
        self.number = number
        self.client_reader = _Reader(client)
        self.upstream: socket.socket | None = None
        self.upstream_reader: _Reader | None = None
        self.thread = threading.Thread(
            target=self.run, name=f"faultproxy-{proxy.port}-conn-{number}", daemon=True
        )

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> None:
        try:
            while not self.proxy._stopping.is_set():
                try:
                    raw = self.client_reader.read_head()
                except _BadMessageError:
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
            head = _parse_head(raw)
            method, target, version = head.first_line.split(" ")
            if not version.startswith("HTTP/1."):
                msg = "not HTTP/1.x"
                raise _BadMessageError(msg)
            body = self._read_request_body(head)
        except (_BadMessageError, ValueError):
            self._send_simple(400, "Bad Request")
            return False
        except (OSError, _ClientGoneError):
            return False
        if body is None:
            self._send_simple(413, "Content Too Large")
            return False

        range_value = next((v for n in _RANGE_HEADERS if (v := head.get(n)) is not None), None)
        rec, plan = self.proxy._begin(self.number, method, _path_of(target), range_value)
        try:
            return self._exchange(rec, plan, head, method, version, body)
        except _ClientGoneError:
            self.proxy._set(rec, outcome="client_gone")
            return False
        finally:
            self.proxy._finish(rec)

    def _read_request_body(self, head: _Head) -> bytes | None:
        """The raw body (framing kept); None if it is too large to buffer."""
        chunked = _is_chunked(head)
        length = None if chunked else _content_length(head)
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
        for _payload, data in _chunked_pieces(self.client_reader):
            out += data
            if len(out) > _MAX_REQUEST_BODY:
                return None
        return bytes(out)

    def _exchange(
        self, rec: _Record, plan: _Plan, head: _Head, method: str, version: str, body: bytes
    ) -> bool:
        client_close = _wants_close(version, head)
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
            chunked = not no_body and _is_chunked(resp_head)
            length = None if no_body or chunked else _content_length(resp_head)
        except _BadMessageError:
            self._drop_upstream()
            self.proxy._set(rec, outcome="upstream_error", status=502)
            self._send_simple(502, "Bad Gateway")
            return False
        until_close = not no_body and not chunked and length is None
        upstream_close = until_close or _wants_close(resp_version, resp_head)

        if plan.delay:
            self.proxy._sleep(plan.delay)
        self.proxy._set(rec, status=status, retry_after=resp_head.get("Retry-After"))
        self._to_client(resp_head.raw)

        assert self.upstream_reader is not None
        pieces: Iterator[tuple[bool, bytes]]
        if no_body:
            pieces = iter(())
        elif chunked:
            pieces = _chunked_pieces(self.upstream_reader)
        elif length is not None:
            pieces = _length_pieces(self.upstream_reader, length)
        else:
            pieces = _until_close_pieces(self.upstream_reader)
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
        self, rec: _Record, plan: _Plan, fault: Fault, method: str, client_close: bool
    ) -> bool:
        headers = list(fault.headers)
        if not any(n.lower() == "content-length" for n, _ in headers):
            headers.append(("Content-Length", str(len(fault.body))))
        text = f"HTTP/1.1 {fault.status} {_reason(fault.status)}\r\n"
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

    def _upstream_head(self, head: _Head, plan: _Plan) -> bytes:
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
        self.upstream_reader = _Reader(sock)
        if self.proxy._stopping.is_set():
            self._drop_upstream()
            msg = "proxy is stopping"
            raise _UpstreamError(msg)
        return False

    def _round_trip(self, request: bytes, rec: _Record) -> tuple[_Head, int]:
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

    def _send_and_read_head(self, request: bytes, rec: _Record) -> tuple[_Head, int]:
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
                head = _parse_head(raw)
                parts = head.first_line.split(" ", 2)
                if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                    msg = "malformed status line"
                    raise _BadMessageError(msg)
                status = int(parts[1])
                if status == 101:
                    msg = "upstream switched protocols, which this proxy cannot follow"
                    raise _UpstreamError(msg)
                if status >= 200:
                    return head, status
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _UpstreamError(str(exc), retryable=not self.upstream_reader.buf) from exc
        except (OSError, _BadMessageError) as exc:
            raise _UpstreamError(_describe(exc)) from exc

    def _drop_upstream(self) -> None:
        sock, self.upstream, self.upstream_reader = self.upstream, None, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    # -- body pipeline ---------------------------------------------------------------------

    def _pump(
        self, pieces: Iterator[tuple[bool, bytes]], rec: _Record, plan: _Plan
    ) -> Literal["complete", "reset", "close"]:
        """Forward body pieces with the plan's faults applied by payload offset."""
        stalls = list(plan.stalls)
        cut = plan.cut
        rate = plan.rate
        # Small slices so a throttled body flows steadily and a fake sleep sees every pause.
        step = max(1, min(_IO_CHUNK, rate // 8)) if rate else _IO_CHUNK
        pos = 0

        def events_at(pos: int) -> Literal["reset", "close"] | None:
            while stalls and stalls[0][0] <= pos:
                self.proxy._sleep(stalls.pop(0)[1])
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

    def _cut(self, rec: _Record, kind: Literal["reset", "close"]) -> None:
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

    def _to_client(self, data: bytes | bytearray) -> None:
        try:
            self.client.sendall(data)
        except OSError as exc:
            raise _ClientGoneError(str(exc)) from exc

    def _body_to_client(self, data: bytearray, rec: _Record) -> None:
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
                if not self.client.recv(_IO_CHUNK):
                    break
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_WR)
        with contextlib.suppress(OSError):
            self.client.close()


# --------------------------------------------------------------------------------------------
# The proxy
# --------------------------------------------------------------------------------------------


class FaultProxy:
    """Loopback HTTP/1.1 proxy in front of one upstream host:port, scriptable per request number.

    ``upstream`` is a URL such as ``http://127.0.0.1:43587``; a path in it (a
    :class:`BlobEndpoint` URL ends in ``/devstoreaccount1``) is ignored, only scheme, host and
    port are used. ``sleep`` is how ``stall_after``, ``throttle`` and ``delay`` wait; the default
    waits on the stop event so :meth:`stop` is never held up by a scripted stall. ``timeout``
    bounds every socket operation and the RST drain.
    """

    def __init__(
        self,
        upstream: str,
        *,
        sleep: Callable[[float], None] = time.sleep,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme.lower() != "http" or not parts.hostname:
            msg = (
                f"the fault proxy needs a plain http upstream like http://127.0.0.1:10000, "
                f"not {parts.scheme}://{parts.netloc}"
            )
            raise ValueError(msg)
        if timeout <= 0:
            msg = f"timeout must be > 0, not {timeout}"
            raise ValueError(msg)
        self._up_host = parts.hostname
        self._up_port = parts.port or 80
        self.timeout = timeout
        self._sleep: Callable[[float], None] = (
            self._interruptible_sleep if sleep is time.sleep else sleep
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._port: int | None = None
        self._started = False
        self._stopped = False
        self._conns: set[_Connection] = set()
        self._connections = 0
        self._upstream_connections = 0
        self._counter = 0
        self._inflight = 0
        self._pending: list[_Pending] = []
        self._records: list[_Record] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and an OS-chosen port; serve in daemon threads."""
        with self._lock:
            if self._stopped:
                msg = "a stopped FaultProxy cannot be started again; create a new one"
                raise RuntimeError(msg)
            if self._started:
                return self
            self._started = True
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
            # A bound on accept() so the loop notices stop() even where shutdown() does not wake it.
            listener.settimeout(_ACCEPT_POLL_SECONDS)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self._port = listener.getsockname()[1]
        self._acceptor = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-{self._port}-accept", daemon=True
        )
        self._acceptor.start()
        return self

    def stop(self) -> None:
        """Close the listener and every live connection; join threads with a bound. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            conns = list(self._conns)
        self._stopping.set()
        deadline = time.monotonic() + _JOIN_SECONDS
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
        if self._acceptor is not None:
            self._acceptor.join(timeout=max(deadline - time.monotonic(), 0.1))
        if self._listener is not None:
            self._listener.close()
        for conn in conns:
            conn.abort()
        for conn in conns:
            conn.thread.join(timeout=max(deadline - time.monotonic(), 0.1))
            if conn.thread.is_alive():
                _log.warning("fault proxy connection thread %s did not end", conn.thread.name)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _addr = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                # EMFILE and friends: back off instead of spinning, then keep serving.
                self._stopping.wait(0.05)
                continue
            sock.settimeout(self.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._stopped:
                    sock.close()
                    return
                self._connections += 1
                conn = _Connection(self, sock, self._connections)
                self._conns.add(conn)
            conn.thread.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            msg = "the fault proxy is not started"
            raise RuntimeError(msg)
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rewrite(self, url: str) -> str:
        """``url`` with the upstream's scheme://host:port replaced by the proxy's.

        Path and query are kept byte-for-byte (a SAS signature must not be re-encoded).
        """
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        port = parts.port or (80 if parts.scheme.lower() == "http" else None)
        if parts.scheme.lower() != "http" or host != self._up_host.lower() or port != self._up_port:
            msg = (
                f"{parts.scheme}://{parts.netloc} is not this proxy's upstream "
                f"http://{self._up_host}:{self._up_port}"
            )
            raise ValueError(msg)
        return self.url + url[len(parts.scheme) + 3 + len(parts.netloc) :]

    # -- scripting -------------------------------------------------------------------------

    def add(
        self,
        fault: Fault,
        *,
        request: int | None = None,
        times: int = 1,
        path: str | None = None,
    ) -> None:
        """Script ``fault`` for requests ``request`` .. ``request + times - 1`` (1-based, global).

        With ``request=None`` it applies to the next ``times`` requests that arrive. Several
        faults may target the same request; they combine (e.g. ``delay`` + ``reset_after``).

        With ``path``, only requests whose URL-decoded path contains it are counted and hit:
        ``request=2, path="install.wim"`` is the second request for that blob, whatever other
        blobs were asked for in between. Parallel downloads make global numbers race between
        files, so a fault meant for one file should name it.
        """
        if request is not None and request < 1:
            msg = f"request numbers start at 1, not {request}"
            raise ValueError(msg)
        if times < 1:
            msg = f"times must be >= 1, not {times}"
            raise ValueError(msg)
        if path is not None and not path:
            msg = "path must not be empty (leave it out to match every request)"
            raise ValueError(msg)
        with self._lock:
            self._pending.append(_Pending(fault, request, times, path))

    def clear(self) -> None:
        """Drop pending faults and the log and restart request numbering at 1.

        Connection numbers keep counting, so :attr:`connections` still tells how many client
        connections were opened since :meth:`start`.
        """
        with self._lock:
            self._pending.clear()
            self._records.clear()
            self._counter = 0

    @property
    def log(self) -> list[ProxiedRequest]:
        """One snapshot per request since start (or the last :meth:`clear`), in arrival order."""
        with self._lock:
            return [r.snapshot() for r in self._records]

    @property
    def connections(self) -> int:
        """Client connections accepted since :meth:`start`."""
        with self._lock:
            return self._connections

    @property
    def upstream_connections(self) -> int:
        """Connections opened to upstream since :meth:`start` (one per client connection, plus
        a new one whenever upstream closed a kept-alive one, e.g. Azurite after 5 s idle)."""
        with self._lock:
            return self._upstream_connections

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is in flight (every log entry has an outcome); False on timeout.

        Body bytes are counted before they are sent, but ``complete`` can only be recorded after
        the last byte went out, so read outcomes of finished requests after this.
        """
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
            return True

    # -- bookkeeping used by connections ---------------------------------------------------

    def _begin(
        self, connection: int, method: str, path: str, range_value: str | None
    ) -> tuple[_Record, _Plan]:
        with self._lock:
            self._counter += 1
            number = self._counter
            faults: list[Fault] = []
            still: list[_Pending] = []
            decoded = unquote(path)
            for entry in self._pending:
                if entry.path is not None and entry.path not in decoded:
                    still.append(entry)
                    continue
                entry.seen += 1
                # Without a path filter every request counts, so ``seen`` equals ``number``.
                index = entry.seen if entry.path is not None else number
                if entry.first is None:
                    faults.append(entry.fault)
                    entry.remaining -= 1
                    if entry.remaining > 0:
                        still.append(entry)
                else:
                    last = entry.first + entry.remaining - 1
                    if entry.first <= index <= last:
                        faults.append(entry.fault)
                    if index < last:
                        still.append(entry)
            self._pending = still
            plan = _Plan.build(faults)
            record = _Record(number, connection, method, path, range_value, plan.names)
            self._records.append(record)
            self._inflight += 1
        return record, plan

    def _set(
        self,
        rec: _Record,
        *,
        forwarded: bool | None = None,
        status: int | None = None,
        outcome: str | None = None,
        retry_after: str | None = None,
    ) -> None:
        with self._lock:
            if retry_after is not None:
                rec.retry_after = retry_after
            if forwarded is not None:
                rec.forwarded = forwarded
            if status is not None:
                rec.status = status
            if outcome is not None:
                rec.outcome = outcome

    def _count_upstream(self) -> None:
        with self._lock:
            self._upstream_connections += 1

    def _add_bytes(self, rec: _Record, n: int) -> None:
        with self._lock:
            rec.body_bytes += n

    def _finish(self, rec: _Record) -> None:
        with self._idle:
            if rec.outcome is None:
                rec.outcome = "error"
            self._inflight -= 1
            self._idle.notify_all()
