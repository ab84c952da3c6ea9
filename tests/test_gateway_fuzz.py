"""Socket-level fuzz battery against a running gateway (issue 10, item 2 and part 6).

The gateway runs in a subprocess (``FakeCMG()`` without a cloud DP), so its memory can be read
from ``/proc/<pid>/status`` and a crash or a traceback on its stderr is seen as such. Over raw
TLS sockets (and some plain TCP sent to the TLS port) the battery sends a few thousand malformed
requests made by a seeded generator from a grammar of mutations: bad request lines (absolute
URLs with a broken host, HTTP/0.9 forms, absurd methods and versions, control characters, very
long targets), broken header lines (no colon, space before the colon, folding, huge and many
headers), bad and duplicate Content-Length, chunked bodies on a GET that hold a second request,
bodies shorter than announced then a half-close, pipelined requests, and every published path
with garbage tokens (a JWT nested 5,000 deep among them), bad percent-encoding and non-UTF-8
paths. Every request carries a unique marker in its request line or headers.

What must hold: no answer is a 5xx (505 only where the request's HTTP version was the
mutation), every answer starts with a valid ``HTTP/1.x`` status line (no HTTP/0.9 page), no
marker comes back in a status line, header or body, no case takes 10 s, a chunked GET's body is
never answered as a second request, the gateway records no error and writes no traceback, and
its RSS ends within 32 MB of where it started. The trickle test holds 300 connections that send
a byte a second: the gateway caps connections and closes slow header readers on a timer.

Counts by status, elapsed time and RSS before and after go to stdout and to the junit report
(``record_property``).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import random
import re
import select
import socket
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

#: The gateway, serving until its stdin closes; "check" on stdin prints its recorded errors.
GATEWAY_SCRIPT = r"""
import json, sys
from pytest_cmg import FakeCMG

options = json.loads(sys.argv[1])
with FakeCMG(**options) as cmg:
    token = cmg.issue_token("GUID:fuzz-client")
    print(json.dumps({"port": cmg.port, "ca": str(cmg.ca_pem), "role": cmg.role_id,
                      "token": token}), flush=True)
    for line in sys.stdin:
        if line.strip() == "check":
            try:
                cmg.check()
                errors = []
            except Exception as exc:
                errors = [repr(exc), repr(exc.__cause__)]
            print(json.dumps({"errors": errors}), flush=True)
"""

SEED = 20261204
#: At least this many malformed requests, and no more than this long sending them.
MIN_CASES = 2000
MAX_CASES = 5000
BATTERY_BUDGET = 40.0
#: One case (connect, send, read until the gateway closes) may take this long at most.
CASE_LIMIT = 10.0
RSS_BUDGET_KIB = 32 * 1024
HOST = b"cmg.contoso.test"


# --- the gateway in a subprocess -------------------------------------------------------------


@dataclass
class Gateway:
    process: subprocess.Popen[str]
    port: int
    ca: str
    role: str
    token: str
    stderr: Path
    #: Threads of the gateway before its first connection: what "idle" looks like.
    idle_threads: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _status(self, name: str) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        msg = f"/proc/{self.process.pid}/status has no {name} line"
        raise AssertionError(msg)

    def rss_kib(self) -> int:
        return self._status("VmRSS")

    def threads(self) -> int:
        return self._status("Threads")

    def errors(self) -> list[str]:
        """What the gateway recorded as its own errors (``FakeCMG.check``)."""
        with self._lock:
            assert self.process.stdin is not None and self.process.stdout is not None
            self.process.stdin.write("check\n")
            self.process.stdin.flush()
            return list(json.loads(self.process.stdout.readline())["errors"])

    def wait_idle(self, timeout: float = 15.0) -> int:
        """Wait until the gateway runs no more threads than when idle (every connection's
        thread has ended); return how many it runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            now = self.threads()
            if now <= self.idle_threads:
                return now
            time.sleep(0.1)
        return self.threads()

    def traceback(self) -> str:
        text = self.stderr.read_text(errors="replace")
        return text if "Traceback" in text else ""


@contextlib.contextmanager
def running_gateway(tmp_path: Path, **options: object) -> Iterator[Gateway]:
    stderr_path = tmp_path / f"gateway-{os.getpid()}-{time.monotonic_ns()}.stderr"
    with stderr_path.open("w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", GATEWAY_SCRIPT, json.dumps(options)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert process.stdout is not None
        # Bounded: a gateway that never starts fails the test instead of hanging it.
        started, _, _ = select.select([process.stdout], [], [], 60)
        ready = process.stdout.readline() if started else ""
        if not ready:
            process.kill()  # this test's own child, by its handle
            process.wait(timeout=10)
            msg = (
                f"the gateway subprocess did not start ({process.returncode}); "
                f"its stderr: {stderr_path.read_text()[-3000:]}"
            )
            raise AssertionError(msg)
        info = json.loads(ready)
        running = Gateway(
            process, info["port"], info["ca"], info["role"], info["token"], stderr_path
        )
        running.idle_threads = running.threads()
        yield running
    finally:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()  # this test's own child, by its handle
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with running_gateway(tmp_path_factory.mktemp("fuzz")) as running:
        yield running


def _tls_context(ca: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    # Certificate checks are tested elsewhere; here only the bytes after the handshake matter.
    context.check_hostname = False
    return context


# --- one exchange on a raw socket -------------------------------------------------------------


@dataclass
class Case:
    """One malformed exchange: bytes to send and what the answer may be."""

    family: str
    data: bytes
    marker: bytes
    #: Plain TCP to the TLS port: no handshake, the gateway must just close.
    plain: bool = False
    #: At most this many final answers (a chunked GET's body must not be a second request).
    max_answers: int | None = None
    #: The request's HTTP version is the mutation: HTTP.sys answers 505 for that.
    bad_version: bool = False
    #: Statuses the answer must have, when the case pins it.
    expect: frozenset[int] | None = None


@dataclass
class Answer:
    status: int
    reason: bytes
    headers: dict[bytes, bytes]
    body: bytes


@dataclass
class Outcome:
    case: Case
    raw: bytes = b""
    answers: list[Answer] = field(default_factory=list)
    interim: int = 0
    elapsed: float = 0.0
    #: What went wrong on the client side: a reset, a refused handshake (not failures).
    client: str = ""
    #: Set when the bytes received are not HTTP/1.x answers.
    invalid: str = ""


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9]{2}) ([\x20-\x7e\t]*)")


def parse_answers(raw: bytes, outcome: Outcome) -> None:
    """Split what the gateway sent into answers; ``outcome.invalid`` says where that failed."""
    rest = raw
    while rest:
        if not rest.startswith(b"HTTP/1."):
            outcome.invalid = f"bytes that are not an HTTP/1.x answer: {rest[:60]!r}"
            return
        head, sep, after = rest.partition(b"\r\n\r\n")
        if not sep:
            outcome.invalid = f"answer head without its blank line: {head[:80]!r}"
            return
        lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(lines[0])
        if match is None:
            outcome.invalid = f"invalid status line {lines[0][:80]!r}"
            return
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon:
                outcome.invalid = f"answer header line without a colon: {line[:80]!r}"
                return
            headers[name.strip().lower()] = value.strip()
        status = int(match[1])
        if status < 200:
            outcome.interim += 1
            rest = after
            continue
        length = headers.get(b"content-length")
        if length is None or not length.isdigit():
            body, rest = after, b""
        else:
            body, rest = after[: int(length)], after[int(length) :]
        outcome.answers.append(Answer(status, match[2], headers, body))


class TlsPipe:
    """A TLS client over a memory BIO, so the client can half-close the TLS way.

    After the case's last byte it sends close_notify and shuts down its TCP write side, then
    keeps reading: the gateway sees a clean end of stream and can still answer (TLS 1.3 allows
    a half-closed session to go on writing). A bare TCP half-close would leave the gateway's
    TLS session broken ("EOF in violation of protocol") and unable to answer at all.
    """

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="cmg.contoso.test"
        )

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        if not data:
            self.incoming.write_eof()
            return False
        self.incoming.write(data)
        return True

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    raise ConnectionResetError("closed during the TLS handshake") from None
                continue
            self._flush()
            return

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self.tls.write(view[:65536])
            view = view[written:]
            self._flush()

    def half_close(self) -> None:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()  # queues close_notify; the gateway's own is not waited for
        self._flush()
        self.sock.shutdown(socket.SHUT_WR)

    def recv(self) -> bytes:
        while True:
            try:
                return self.tls.read(65536)
            except ssl.SSLWantReadError:
                if not self._fill():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""


def exchange(port: int, context: ssl.SSLContext, case: Case, limit: float = CASE_LIMIT) -> Outcome:
    """Connect, send the case, half-close, read until the gateway closes (or ``limit``)."""
    outcome = Outcome(case)
    started = time.monotonic()
    chunks: list[bytes] = []
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=limit) as sock:
            # One timeout for the whole case: every blocking call gets what is left of it.
            sock.settimeout(limit)
            if case.plain:
                with contextlib.suppress(OSError):
                    sock.sendall(case.data)
                    sock.shutdown(socket.SHUT_WR)
                receive: Callable[[], bytes] = lambda: sock.recv(65536)  # noqa: E731
            else:
                pipe = TlsPipe(sock, context)
                pipe.handshake()
                # The gateway may close before taking every byte (a refusal): then read what
                # it answered.
                with contextlib.suppress(OSError, ssl.SSLError):
                    pipe.send(case.data)
                    pipe.half_close()
                receive = pipe.recv
            while True:
                remaining = started + limit - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                sock.settimeout(remaining)
                chunk = receive()
                if not chunk:
                    break
                chunks.append(chunk)
    except TimeoutError:
        outcome.client = "still open at the case's time limit"
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        outcome.client = f"reset ({exc.__class__.__name__})"
    except OSError as exc:
        outcome.client = f"connection failed ({exc.__class__.__name__}: {exc})"
    outcome.elapsed = time.monotonic() - started
    outcome.raw = b"".join(chunks)
    if not case.plain:
        parse_answers(outcome.raw, outcome)
    return outcome


def problems_of(outcome: Outcome) -> list[str]:
    """Every rule ``outcome`` breaks, as text naming the case."""
    case = outcome.case
    where = f"[{case.family}] {case.data[:100]!r}"
    found = []
    if outcome.elapsed >= CASE_LIMIT or outcome.client.startswith("still open"):
        found.append(f"{where}: took {outcome.elapsed:.1f} s ({outcome.client or 'slow'})")
    if case.marker in outcome.raw:
        found.append(
            f"{where}: the answer echoes request bytes ({case.marker!r}): {outcome.raw[:200]!r}"
        )
    if case.plain:
        return found
    if outcome.invalid:
        found.append(f"{where}: {outcome.invalid}")
    for answer in outcome.answers:
        if answer.status >= 500 and not (answer.status == 505 and case.bad_version):
            found.append(f"{where}: answered {answer.status} {answer.reason!r}")
        if case.expect is not None and answer.status not in case.expect:
            found.append(
                f"{where}: answered {answer.status}, expected one of {sorted(case.expect)}"
            )
    if case.max_answers is not None and len(outcome.answers) > case.max_answers:
        statuses = [a.status for a in outcome.answers]
        found.append(
            f"{where}: {len(outcome.answers)} answers {statuses}, at most {case.max_answers}"
        )
    if case.expect is not None and not outcome.answers and not outcome.client:
        found.append(f"{where}: closed without an answer, expected one of {sorted(case.expect)}")
    return found


def status_key(outcome: Outcome) -> str:
    if outcome.case.plain:
        return "tcp-garbage: " + ("answered" if outcome.raw.startswith(b"HTTP/") else "closed")
    if outcome.answers:
        return str(outcome.answers[0].status)
    if outcome.client:
        return "client: " + outcome.client.split(" (")[0]
    return "closed without an answer"


# --- the grammar of mutations -----------------------------------------------------------------


def request(
    method: bytes = b"GET",
    target: bytes = b"/",
    version: bytes = b"HTTP/1.1",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
    *,
    host: bool = True,
    eol: bytes = b"\r\n",
) -> bytes:
    lines = [method + b" " + target + b" " + version]
    if host:
        lines.append(b"Host: " + HOST)
    lines += [name + b": " + value for name, value in headers or []]
    return eol.join(lines) + eol + eol + body


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def deep_jwt(depth: int, *, where: str) -> bytes:
    nested = b64url(b"[" * depth + b"]" * depth)
    flat = b64url(b'{"alg":"RS256","typ":"JWT"}')
    header, claims = (nested, b64url(b"{}")) if where == "header" else (flat, nested)
    return header + b"." + claims + b"." + b64url(b"signature")


#: Built once: 48 MiB of zeros in some 48 KiB of zlib, under the location body limit.
ZLIB_BOMB = zlib.compress(b"\x00" * (48 * 1024 * 1024), 9)
DEEP_TOKENS = [
    deep_jwt(5000, where="claims"),
    deep_jwt(5000, where="header"),
    deep_jwt(2000, where="claims"),
]


def chunked(body: bytes, size: int = 0) -> bytes:
    size = size or len(body) or 1
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


class Grammar:
    """Malformed exchanges from a seeded generator; each family is one kind of mutation."""

    def __init__(self, seed: int, role: str, token: str) -> None:
        self.random = random.Random(seed)
        self.role = role.encode()
        self.token = token.encode()
        self.serial = 0
        location = b"/CCM_Proxy_ServerAuth/" + self.role + b"/ccm_system_tokenauth/request"
        self.published: list[tuple[bytes, bytes]] = [
            (b"CCM_POST", location),
            (b"CCM_POST", b"/CCM_Proxy_MutualAuth/" + self.role + b"/ccm_system/request"),
            (b"POST", b"/CCM_Proxy_ServerAuth/" + self.role + b"/CCM_STS"),
            (b"POST", b"/CCM_Proxy_MutualAuth/" + self.role + b"/CCM_STS"),
            (b"GET", b"/CCM_Proxy_ServerAuth/ServiceMetadata"),
            (b"GET", b"/CCM_Proxy_MutualAuth/ServiceMetadata"),
            (b"GET", b"/CCM_Proxy_ServerAuth/AADAuthInfo?TenantID="),
            (b"GET", b"/CCM_Proxy_MutualAuth/" + self.role + b"/SMS_MP/.sms_aut?MPLIST"),
            (b"GET", b"/downloadrestservice.svc/getcontentxmlsecure?pid=PS100001&cid=PS100001"),
        ]
        self.families: list[tuple[Callable[[bytes], Case], int]] = [
            (self.request_line, 14),
            (self.http09, 3),
            (self.long_target, 3),
            (self.target_bytes, 8),
            (self.header_syntax, 12),
            (self.header_size, 4),
            (self.content_length, 10),
            (self.transfer_encoding, 10),
            (self.short_body, 5),
            (self.pipeline, 6),
            (self.published_path, 20),
            (self.tcp_garbage, 3),
            (self.binary_after_handshake, 2),
        ]

    def marker(self) -> bytes:
        self.serial += 1
        return b"MRK%08X" % self.serial

    def case(self) -> Case:
        families, weights = zip(*self.families, strict=True)
        family = self.random.choices(families, weights)[0]
        return family(self.marker())

    def pick(self, options: list[bytes]) -> bytes:
        return self.random.choice(options)

    # Each family: a request that breaks one rule, the marker where an echo would show.

    def request_line(self, marker: bytes) -> Case:
        r = self.random
        kind = r.randrange(6)
        if kind == 0:
            targets = [
                b"http://[/" + marker,
                b"http://[::1/" + marker,
                b"https://h:99999/" + marker,
                b"http:///" + marker,
                b"http://" + marker + b"@/x",
                b"*",
                b"cmg.contoso.test:443",
                b"//" + marker,
                b"x" + marker,
            ]
            return Case(
                "request-line",
                request(target=self.pick(targets)),
                marker,
                expect=frozenset({400, 404}),
            )
        if kind == 1:
            methods = [
                marker,
                b"G\x00T" + marker,
                b"GET\x7f" + marker,
                b"(" + marker + b")",
                b"M" * r.randrange(100, 3000) + marker,
                "ЖЖ".encode() + marker,
                b"",
                b"GET POST",
            ]
            return Case(
                "request-line", request(method=self.pick(methods), target=b"/" + marker), marker
            )
        if kind == 2:
            versions = [
                b"HTTP/1.1" + marker,
                b"HTTP/2.0",
                b"HTTP/9.9",
                b"HTTP/1",
                b"http/1.1",
                b"HTTP/1.1 " + marker,
                b"HTTP/01.1",
                b"HTTP/1.1\x00",
                marker,
            ]
            return Case(
                "request-line",
                request(target=b"/" + marker, version=self.pick(versions)),
                marker,
                bad_version=True,
            )
        if kind == 3:
            lines = [
                b"GET  /" + marker + b" HTTP/1.1",
                b"GET /" + marker + b"  HTTP/1.1",
                b"GET /" + marker + b" HTTP/1.1 ",
                b" GET /" + marker + b" HTTP/1.1",
                b"GET\t/" + marker + b"\tHTTP/1.1",
                b"GET /" + marker + b" HTTP/1.1 extra",
            ]
            data = self.pick(lines) + b"\r\nHost: " + HOST + b"\r\n\r\n"
            return Case("request-line", data, marker, bad_version=True)
        if kind == 4:
            # Bare LF line endings and a lone CR.
            eol = self.pick([b"\n", b"\r", b"\n\r"])
            return Case(
                "request-line", request(target=b"/" + marker, eol=eol), marker, bad_version=True
            )
        # An HTTP/1.1 request without Host (HTTP.sys: 400 Bad Request - Invalid Hostname).
        return Case(
            "request-line",
            request(target=b"/" + marker, host=False),
            marker,
            expect=frozenset({400}),
        )

    def http09(self, marker: bytes) -> Case:
        data = self.pick(
            [
                b"GET /" + marker + b"\r\n",
                b"GET /" + marker + b"\r\n\r\n",
                b"/" + marker + b"\r\n\r\n",
                marker + b"\r\n\r\n",
                b"GET\r\n\r\n" + marker,
            ]
        )
        return Case("http/0.9", data, marker, bad_version=True)

    def long_target(self, marker: bytes) -> Case:
        size = self.random.choice([4 * 1024, 15 * 1024, 17 * 1024, 64 * 1024, 200 * 1024])
        target = b"/" + b"a" * size + marker
        return Case(
            "long-target", request(target=target), marker, expect=frozenset({400, 404, 414})
        )

    def target_bytes(self, marker: bytes) -> Case:
        bad = self.pick(
            [
                b"\x00",
                b"\x01",
                b"\x7f",
                b"\x80",
                b"\xff",
                b"\xc0\xaf",
                b"%",
                b"%zz",
                b"%G0",
                b"%ff",
                b"%c0%af",
                b"%00",
                b"%0a",
                b"%0d%0a" + marker,
                b"%ed%a0%80",
                b"\t",
                b"\x1b[2J",
                b"%u0041",
                b"/../../etc/passwd",
                b"?" + b"&" * 2000,
                b"#frag",
            ]
        )
        path = self.pick(
            [
                b"/",
                b"/downloadrestservice.svc/getcontentxmlsecure",
                b"/CCM_Proxy_ServerAuth/ServiceMetadata",
            ]
        )
        in_query = self.random.random() < 0.5 or b"?" in bad
        target = path + (b"?pid=" if in_query else b"") + bad + marker
        # In the path, HTTP.sys refuses what does not decode (400) and URL filtering what is
        # not published (404). In the query it is the endpoint's to judge: ServiceMetadata
        # ignores its query and answers 200, the manifest refuses a bad one (400, 401).
        expect = None if in_query else frozenset({400, 404})
        return Case("target-bytes", request(target=target), marker, expect=expect)

    def header_syntax(self, marker: bytes) -> Case:
        lines = [
            b"X-Nocolon-" + marker,
            b"X-A : " + marker,
            b"X-A\t: " + marker,
            b" folded " + marker,
            b"\tfolded " + marker,
            b": " + marker,
            b"X A: " + marker,
            b"X-\x00: " + marker,
            b"X-A: a\x00" + marker,
            b"X-A: a\rb" + marker,
            "X-Ä: ".encode() + marker,
            b"X-A: \xff\xfe" + marker,
            b"Host: second-" + marker,
            b"Content-Length: 0\r\nContent-Length: 0\r\nX: " + marker,
        ]
        line = self.pick(lines)
        data = (
            b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: "
            + HOST
            + b"\r\n"
            + line
            + b"\r\nX-After: 1\r\n\r\n"
        )
        # Legal HTTP, whatever else they look like: non-ASCII (obs-text) bytes in a value, the
        # same Content-Length twice, and obs-fold, which RFC 9112 lets a server either refuse
        # or unfold (h11 unfolds). Every other line here is refused by HTTP.sys with a 400.
        legal = line.startswith((b" folded", b"\tfolded", b"X-A: \xff", b"Content-Length: 0"))
        return Case("header-syntax", data, marker, expect=None if legal else frozenset({400}))

    def header_size(self, marker: bytes) -> Case:
        r = self.random
        if r.random() < 0.5:
            size = r.choice([8 * 1024, 17 * 1024, 64 * 1024, 256 * 1024])
            headers = [(b"X-Big", b"v" * size + marker)]
        else:
            count = r.choice([99, 101, 150, 1000, 5000])
            headers = [(b"X-H%d" % i, marker) for i in range(count)]
        return Case("header-size", request(target=b"/" + marker, headers=headers), marker)

    def content_length(self, marker: bytes) -> Case:
        r = self.random
        method, target = (
            self.pick([b"POST", b"CCM_POST", b"GET"]),
            self.published[r.randrange(3)][1],
        )
        values = [
            [b"abc"],
            [b"-1"],
            [b"1,2"],
            [b"+5"],
            [b"0x10"],
            [b"5 5"],
            [b"99999999999999999999"],
            [b"5", b"6"],
            [b"5", b"5"],
            [b"1" + marker],
            [b""],
            [b"-0"],
            [b"10"],
            [b"1e3"],
        ]
        headers = [(b"Content-Length", value) for value in r.choice(values)] + [(b"X-Fuzz", marker)]
        body = r.randbytes(r.choice([0, 3, 5, 10, 100]))
        return Case("content-length", request(method, target, headers=headers, body=body), marker)

    def transfer_encoding(self, marker: bytes) -> Case:
        r = self.random
        inner = (
            b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: "
            + HOST
            + b"\r\nX-Inner: "
            + marker
            + b"\r\n\r\n"
        )
        kind = r.randrange(6)
        if kind == 0:
            # The smuggling shape: a chunked GET whose body is a whole second request, as is or
            # chunk-framed. A server that ignores chunked on a GET it serves answers the body as
            # a request of its own (the outer GET goes to a path that answers 200, so nothing
            # refuses it and closes first).
            body = self.pick([inner, chunked(inner), chunked(inner, 7)])
            outer = self.pick([b"/CCM_Proxy_ServerAuth/ServiceMetadata", b"/" + marker])
            data = request(target=outer, headers=[(b"Transfer-Encoding", b"chunked")], body=body)
            return Case("chunked-smuggle", data, marker, max_answers=1)
        if kind == 1:
            headers = [(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"%d" % len(inner))]
            data = request(target=b"/" + marker, headers=headers, body=chunked(inner))
            return Case("chunked-smuggle", data, marker, max_answers=1)
        if kind == 2:
            bodies = [
                b"zz\r\nabc\r\n0\r\n\r\n",
                b"-1\r\n\r\n",
                b"ffffffffffffffffff\r\nab",
                b"5\r\nab\r\n",
                b"3;ext=" + marker + b"\r\nabc\r\n0\r\n\r\n",
                b"3\r\nabcXX0\r\n\r\n",
            ]
            data = request(
                b"POST",
                self.published[2][1],
                headers=[(b"Transfer-Encoding", b"chunked"), (b"X-Fuzz", marker)],
                body=self.pick(bodies),
            )
            return Case("chunked-bad", data, marker, max_answers=1)
        codings = [
            b"chunked, identity",
            b"xchunked",
            b"chunked\x00",
            b"gzip",
            b" chunked",
            b"identity",
            b"chunked, chunked",
            marker,
        ]
        data = request(
            b"POST",
            self.published[2][1],
            headers=[(b"Transfer-Encoding", self.pick(codings))],
            body=chunked(inner),
        )
        return Case("transfer-encoding", data, marker, max_answers=1)

    def short_body(self, marker: bytes) -> Case:
        method, target = self.published[self.random.randrange(4)]
        headers = [
            (b"Content-Length", b"%d" % self.random.randrange(50, 5000)),
            (b"Authorization", b"Bearer " + marker),
        ]
        return Case("short-body", request(method, target, headers=headers, body=b"x" * 10), marker)

    def pipeline(self, marker: bytes) -> Case:
        r = self.random
        pool = [
            request(target=b"/CCM_Proxy_ServerAuth/ServiceMetadata"),
            request(target=b"/nope-" + marker),
            request(
                b"POST",
                self.published[2][1],
                headers=[(b"Authorization", b"Bearer " + marker), (b"Content-Length", b"0")],
            ),
            b"GARBAGE " + marker + b"\r\n\r\n",
            request(target=b"http://[/" + marker),
        ]
        data = b"".join(r.choice(pool) for _ in range(r.randrange(2, 6)))
        return Case("pipeline", data, marker)

    def published_path(self, marker: bytes) -> Case:
        r = self.random
        method, target = r.choice(self.published)
        tokens = [
            *DEEP_TOKENS,
            b"",
            b"    ",
            marker,
            b"a.b.c",
            b"e30.e30.",
            b64url(b'{"alg":"none"}')
            + b"."
            + b64url(b'{"exp":NaN,"iss":"https://sts.windows.net/x/"}')
            + b".",
            b64url(b'{"alg":"RS256"}')
            + b"."
            + b64url(b'{"iss":"https://sts.windows.net/' + marker + b'/"}')
            + b".c2ln",
            b"A" * 15000,
            "ÿ".encode("latin-1") * 10,
            self.token + marker,
            self.token,
        ]
        token = r.choice(tokens)
        scheme = self.pick([b"Bearer ", b"bearer ", b"Basic ", b"", b"Bearer\t"])
        headers = [(b"Authorization", scheme + token), (b"X-Fuzz", marker)]
        if r.random() < 0.3:
            headers.append(
                (b"X-Cmg-Token-Signature", self.pick([b"!!", b"A" * 20000, marker, b"%ff"]))
            )
        if b"?" in target:
            target += self.pick(
                [
                    marker,
                    b"%ff" + marker,
                    b"%zz",
                    b"&pid=PS1&pid=PS2",
                    b"&tid=%0a",
                    b"&" * 100,
                    b";x=" + marker,
                ]
            )
        body = b""
        if method != b"GET":
            body = self.pick(
                [
                    r.randbytes(r.randrange(0, 300)),
                    ZLIB_BOMB,
                    b"--aAbBcCdDv1234567890VxXyYzZ\r\n\r\n" + marker,
                    "GUID:ünïcode".encode(),
                    b"\xff\xfe" * 50,
                ]
            )
        if body or method != b"GET":
            headers.append((b"Content-Length", b"%d" % len(body)))
        return Case("published", request(method, target, headers=headers, body=body), marker)

    def tcp_garbage(self, marker: bytes) -> Case:
        r = self.random
        data = self.pick(
            [
                r.randbytes(r.randrange(1, 2000)) + marker,
                request(target=b"/" + marker),
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + marker,
                b"\x16\x03\x01\xff\xff" + marker * 100,
                marker,
            ]
        )
        return Case("tcp-garbage", data, marker, plain=True)

    def binary_after_handshake(self, marker: bytes) -> Case:
        return Case(
            "binary", self.random.randbytes(self.random.randrange(1, 5000)) + marker, marker
        )


# --- the battery ------------------------------------------------------------------------------

_BUSY = 12  # client threads: enough to keep the gateway busy on two shared cores


def run_cases(
    gateway: Gateway, cases: Iterator[Case], *, budget: float, limit: int
) -> tuple[list[Outcome], float]:
    """Run ``cases`` on ``_BUSY`` client threads until ``limit`` cases or ``budget`` seconds,
    whichever comes first (each case is bounded by ``CASE_LIMIT`` on its own)."""
    context = _tls_context(gateway.ca)
    outcomes: list[Outcome] = []
    started = time.monotonic()
    with ThreadPoolExecutor(_BUSY) as pool:
        pending: set[Future[Outcome]] = set()
        for case in cases:
            if len(outcomes) + len(pending) >= limit or time.monotonic() - started > budget:
                break
            pending.add(pool.submit(exchange, gateway.port, context, case))
            if len(pending) >= 2 * _BUSY:  # a short queue, so the budget check stays current
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                outcomes.extend(future.result() for future in done)
        outcomes.extend(future.result() for future in pending)
    return outcomes, time.monotonic() - started


def _generate(grammar: Grammar) -> Iterator[Case]:
    while True:
        yield grammar.case()


def test_fuzz_battery(gateway: Gateway, record_property: Callable[[str, object], None]) -> None:
    grammar = Grammar(SEED, gateway.role, gateway.token)
    # Warm up: every family once or twice, so code loaded on first use is not counted as growth.
    warm = Grammar(SEED + 1, gateway.role, gateway.token)
    run_cases(gateway, _generate(warm), budget=10, limit=150)
    gateway.wait_idle()
    rss_before = gateway.rss_kib()

    outcomes, elapsed = run_cases(
        gateway, _generate(grammar), budget=BATTERY_BUDGET, limit=MAX_CASES
    )

    idle_threads = gateway.wait_idle()
    time.sleep(0.5)
    rss_after = gateway.rss_kib()
    counts = Counter(status_key(o) for o in outcomes)
    families = Counter(o.case.family for o in outcomes)
    slowest = max(outcomes, key=lambda o: o.elapsed)
    summary = {
        "requests": len(outcomes),
        "elapsed_s": round(elapsed, 1),
        "by_status": dict(sorted(counts.items())),
        "by_family": dict(sorted(families.items())),
        "slowest_s": round(slowest.elapsed, 2),
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "threads_idle": idle_threads,
    }
    print("fuzz battery:", json.dumps(summary, indent=1))
    for name, value in summary.items():
        record_property(f"fuzz_{name}", json.dumps(value) if isinstance(value, dict) else value)

    problems = [problem for outcome in outcomes for problem in problems_of(outcome)]
    assert len(outcomes) >= MIN_CASES, f"only {len(outcomes)} cases in {elapsed:.0f} s"
    assert not problems, f"{len(problems)} problem(s), the first ones:\n" + "\n".join(problems[:25])
    assert not gateway.errors(), f"the gateway recorded errors: {gateway.errors()}"
    assert not gateway.traceback(), (
        f"a traceback on the gateway's stderr:\n{gateway.traceback()[-3000:]}"
    )
    assert rss_after - rss_before < RSS_BUDGET_KIB, (
        f"the gateway's RSS grew from {rss_before} KiB to {rss_after} KiB over the battery "
        f"(budget {RSS_BUDGET_KIB} KiB)"
    )


# --- regressions of the probe's items 5 to 8 -------------------------------------------------


def _one(gateway: Gateway, data: bytes, marker: bytes = b"MRK-NONE") -> Outcome:
    return exchange(gateway.port, _tls_context(gateway.ca), Case("regression", data, marker))


def test_bad_ipv6_absolute_target_is_a_400_without_traceback(gateway: Gateway) -> None:
    """Item 5: ``GET http://[/x`` made urlsplit raise in the handler: no answer, a traceback."""
    outcome = _one(gateway, request(target=b"http://[/x"))
    assert [a.status for a in outcome.answers] == [400], (outcome.raw[:200], outcome.client)
    assert not gateway.traceback()
    assert not gateway.errors()


def test_chunked_get_body_is_not_answered_as_a_second_request(gateway: Gateway) -> None:
    """Item 6: a GET's chunked body holding a request must not be answered as one.

    http.server ignored Transfer-Encoding on a GET that ServiceMetadata serves (no body
    expected), so the body stayed in the stream: sent as is, it was answered as a second
    request (404 for /inner); chunk-framed, its size line got an HTTP/0.9 error page.
    """
    inner = b"GET /inner HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n"
    for body in (inner, chunked(inner), chunked(inner, 7)):
        data = request(
            target=b"/CCM_Proxy_ServerAuth/ServiceMetadata",
            headers=[(b"Transfer-Encoding", b"chunked")],
            body=body,
        )
        outcome = _one(gateway, data)
        statuses = [a.status for a in outcome.answers]
        assert len(statuses) <= 1, f"answered {statuses}: the body was read as a second request"
        assert 404 not in statuses, statuses
        assert not outcome.invalid, outcome.invalid


@pytest.mark.parametrize(
    "line", [b"X-No-Colon", b"X-A : b"], ids=["no-colon", "space-before-colon"]
)
def test_broken_header_line_is_a_400_not_dropped_headers(gateway: Gateway, line: bytes) -> None:
    """Item 7: after a header line without a colon (or with a space before it) http.server
    stopped reading headers and served the request without the rest; HTTP.sys refuses it."""
    data = (
        b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: "
        + HOST
        + b"\r\n"
        + line
        + b"\r\nX-Later: 1\r\n\r\n"
    )
    outcome = _one(gateway, data)
    assert [a.status for a in outcome.answers] == [400], (outcome.raw[:200], outcome.client)


@pytest.mark.parametrize(
    "data",
    [
        b"GET /x MRK-ECHO HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /x HTTP/1.1MRK-ECHO\r\nHost: h\r\n\r\n",
        b"GET /x MRK-ECHO\r\n\r\n",
        b"MRK-ECHO /x HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nMRK-ECHO\r\n\r\n",
        b"GET /MRK-ECHO\r\n",
    ],
    ids=["four-words", "version", "version-only", "method", "header", "http09"],
)
def test_status_line_and_page_never_echo_request_bytes(gateway: Gateway, data: bytes) -> None:
    """Item 8: http.server put a four-word request line into its reason phrase ("400 Bad
    request syntax ('GET /x MRK-ECHO HTTP/1.1')"), answered a bad version with an HTTP/0.9
    page (no status line) quoting it, or reset the connection before its answer."""
    outcome = _one(gateway, data, b"MRK-ECHO")
    assert len(outcome.answers) == 1, (outcome.raw[:200], outcome.client, outcome.invalid)
    assert outcome.raw.startswith(b"HTTP/1.1 "), outcome.raw[:200]
    assert not outcome.invalid, outcome.invalid
    assert b"MRK-ECHO" not in outcome.raw, outcome.raw[:300]
    assert outcome.answers[0].status in {400, 404, 505}, outcome.raw[:200]


@pytest.mark.parametrize("where", ["header", "claims"])
def test_jwt_nested_5000_deep_is_a_401_not_a_500(gateway: Gateway, where: str) -> None:
    """Item 2: a JWT nesting JSON 5,000 deep got 500 (RecursionError) on the token path."""
    path = b"/CCM_Proxy_ServerAuth/" + gateway.role.encode() + b"/CCM_STS"
    headers = [
        (b"Authorization", b"Bearer " + deep_jwt(5000, where=where)),
        (b"Content-Length", b"0"),
    ]
    outcome = _one(gateway, request(b"POST", path, headers=headers))
    assert [a.status for a in outcome.answers] == [401], (outcome.raw[:200], outcome.client)
    assert not gateway.errors()


# --- slow clients and the connection cap -----------------------------------------------------

TRICKLE_CONNECTIONS = 300
CAP = 40
HEADER_TIMEOUT = 3.0
IDLE_TIMEOUT = 3.0


def test_trickling_clients_are_capped_and_timed_out(
    tmp_path: Path, record_property: Callable[[str, object], None]
) -> None:
    """300 connections that each send a byte every second: past ``max_connections`` new ones
    are closed at once, and those let in are closed once ``header_timeout`` has run from their
    first byte, however steadily they trickle. Then the gateway serves normally again."""
    with running_gateway(
        tmp_path, max_connections=CAP, header_timeout=HEADER_TIMEOUT, idle_timeout=IDLE_TIMEOUT
    ) as gw:
        context = _tls_context(gw.ca)
        started = time.monotonic()
        trickle = b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nX-Slow: " + b"a" * 64
        admitted: list[ssl.SSLSocket] = []
        refused = 0
        for _ in range(TRICKLE_CONNECTIONS):
            raw = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
            try:
                sock = context.wrap_socket(raw, server_hostname="cmg.contoso.test")
                # The first byte at once: an admitted connection is a slow header reader from
                # the start, never an idle one (the idle timer would free its slot early).
                sock.sendall(trickle[:1])
                admitted.append(sock)
            except (ssl.SSLError, OSError):
                refused += 1
                raw.close()
        opened = time.monotonic() - started
        # The refused ones were closed at accept: the handshake failed fast, not on a timer.
        assert len(admitted) <= CAP, f"{len(admitted)} connections admitted past a cap of {CAP}"
        assert refused >= TRICKLE_CONNECTIONS - CAP - 5
        assert opened < 15, f"opening {TRICKLE_CONNECTIONS} connections took {opened:.1f} s"

        # While the admitted ones hold every slot, one more is refused or closed at once, not
        # queued behind them.
        knocked = time.monotonic()
        over = exchange(gw.port, context, Case("over-cap", request(), b"MRK-NONE"), limit=5)
        knocked = time.monotonic() - knocked
        assert not over.answers, f"a connection over the cap was served: {over.raw[:100]!r}"
        assert knocked < 2, f"the connection over the cap took {knocked:.1f} s to be closed"

        # Trickle: one byte a second each, headers that never end.
        alive = dict.fromkeys(admitted, 1)
        closed_after: list[float] = []
        first_byte = time.monotonic()
        while alive and time.monotonic() - first_byte < HEADER_TIMEOUT + 6:
            for sock, sent in list(alive.items()):
                try:
                    sock.settimeout(0.001)
                    with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                        if sock.recv(4096) == b"":
                            raise ConnectionResetError
                    sock.settimeout(1)
                    sock.sendall(trickle[sent : sent + 1])
                    alive[sock] = sent + 1
                except (OSError, ssl.SSLError):
                    closed_after.append(time.monotonic() - first_byte)
                    del alive[sock]
                    sock.close()
            time.sleep(1.0)
        for sock in alive:
            sock.close()
        # Meanwhile new connections were refused; now the slots are free again.
        served = exchange(
            gw.port,
            context,
            Case("after", request(target=b"/CCM_Proxy_ServerAuth/ServiceMetadata"), b"MRK-NONE"),
        )
        elapsed = time.monotonic() - started
        record_property("trickle_admitted", len(admitted))
        record_property("trickle_refused", refused)
        record_property("trickle_closed_after_max_s", round(max(closed_after, default=0), 1))
        record_property("trickle_elapsed_s", round(elapsed, 1))
        print(
            f"trickle: {len(admitted)} admitted, {refused} refused at accept (one more closed in "
            f"{knocked:.2f} s while full), {len(alive)} still open at the end, the last "
            f"trickler closed {max(closed_after, default=0):.1f} s after its first byte, "
            f"{elapsed:.1f} s in all"
        )
        assert not alive, f"{len(alive)} trickling connections still open past the header timeout"
        assert max(closed_after, default=0) < HEADER_TIMEOUT + 4
        assert [a.status for a in served.answers] == [200], (served.raw[:200], served.client)
        assert elapsed < 25
        assert not gw.errors()
        assert not gw.traceback()


def test_idle_keep_alive_connection_is_closed_after_idle_timeout(tmp_path: Path) -> None:
    with running_gateway(tmp_path, idle_timeout=IDLE_TIMEOUT, header_timeout=HEADER_TIMEOUT) as gw:
        raw = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
        with _tls_context(gw.ca).wrap_socket(raw, server_hostname="cmg.contoso.test") as sock:
            sock.sendall(request(target=b"/CCM_Proxy_ServerAuth/ServiceMetadata"))
            started = time.monotonic()
            received = b""
            sock.settimeout(IDLE_TIMEOUT + 5)
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received += chunk
            waited = time.monotonic() - started
        assert received.startswith(b"HTTP/1.1 200 ")
        assert IDLE_TIMEOUT - 0.5 < waited < IDLE_TIMEOUT + 3, f"closed after {waited:.1f} s"
