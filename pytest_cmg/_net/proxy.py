"""A scriptable HTTP/1.1 fault proxy in front of one blob endpoint (toxiproxy is not available).

This module is the server and its request log; the fault vocabulary is
:mod:`pytest_cmg._net.faults`, the HTTP/1.1 framing :mod:`pytest_cmg._net.wire` and the per-
connection pump :mod:`pytest_cmg._net.connection`. The public names are re-exported by
:mod:`pytest_cmg.faults`.

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
* Linux (or another POSIX with ``TIOCOUTQ``): the connection module imports ``fcntl``/``termios``
  at module level for the drain before a reset.
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
* ``reset_after`` first waits until the kernel has handed the n bytes to the peer
  (:mod:`pytest_cmg._net.connection` says why), so a client that stops reading holds it up to
  ``timeout``; ``throttle`` runs slightly below its rate (:mod:`pytest_cmg._net.faults`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from .._errors import InvalidValueError, NotRunningError
from .._util.service import Service
from .connection import Connection
from .faults import Fault, Plan

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FaultProxy", "Pending", "ProxiedRequest", "Record"]

_log = logging.getLogger(__name__)

_ACCEPT_POLL_SECONDS = 0.5
_JOIN_SECONDS = 5.0


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
class Record:
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
        # The record and its snapshot have the same fields (tests/test_faultproxy.py checks):
        # a field added to both is copied without a third list to keep in step.
        return ProxiedRequest(**{f.name: getattr(self, f.name) for f in fields(ProxiedRequest)})


@dataclass
class Pending:
    fault: Fault
    first: int | None
    remaining: int
    #: Only requests whose decoded path contains this count, and are numbered, for this fault.
    path: str | None = None
    seen: int = 0


class FaultProxy(Service):
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
            raise InvalidValueError(msg)
        if timeout <= 0:
            msg = f"FaultProxy(timeout={timeout!r}): give a number of seconds above 0"
            raise InvalidValueError(msg)
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
        self._conns: set[Connection] = set()
        self._connections = 0
        self._upstream_connections = 0
        self._counter = 0
        self._inflight = 0
        self._pending: list[Pending] = []
        self._records: list[Record] = []

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        """Listen on 127.0.0.1 and an OS-chosen port; serve in daemon threads."""
        with self._lock:
            if self._stopped:
                msg = "a stopped FaultProxy cannot be started again; create a new one"
                raise NotRunningError(msg)
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
                conn = Connection(self, sock, self._connections)
                self._conns.add(conn)
            conn.thread.start()

    def _forget(self, conn: Connection) -> None:
        with self._lock:
            self._conns.discard(conn)

    def _interruptible_sleep(self, seconds: float) -> None:
        self._stopping.wait(seconds)

    # -- addresses -------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            msg = "the fault proxy is not started; call start() or use it as a context manager"
            raise NotRunningError(msg)
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
                f"FaultProxy.rewrite: {parts.scheme}://{parts.netloc} is not this proxy's upstream "
                f"http://{self._up_host}:{self._up_port}; rewrite only URLs of the storage it fronts"
            )
            raise InvalidValueError(msg)
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
            msg = f"FaultProxy.add(request={request}): requests count from 1; give 1+ or None"
            raise InvalidValueError(msg)
        if times < 1:
            msg = f"FaultProxy.add(times={times}): a fault applies at least once; give 1 or more"
            raise InvalidValueError(msg)
        if path is not None and not path:
            msg = 'FaultProxy.add(path=""): path must not be empty; leave it out to match all'
            raise InvalidValueError(msg)
        with self._lock:
            self._pending.append(Pending(fault, request, times, path))

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
    ) -> tuple[Record, Plan]:
        with self._lock:
            self._counter += 1
            number = self._counter
            faults: list[Fault] = []
            still: list[Pending] = []
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
            plan = Plan.build(faults)
            record = Record(number, connection, method, path, range_value, plan.names)
            self._records.append(record)
            self._inflight += 1
        return record, plan

    def _set(
        self,
        rec: Record,
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

    def _add_bytes(self, rec: Record, n: int) -> None:
        with self._lock:
            rec.body_bytes += n

    def _finish(self, rec: Record) -> None:
        with self._idle:
            if rec.outcome is None:
                rec.outcome = "error"
            self._inflight -= 1
            self._idle.notify_all()
