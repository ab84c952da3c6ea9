"""Tests of the TCP/HTTP fault proxy, against a real Azurite (and a tiny chunked upstream)."""

from __future__ import annotations

import errno
import random
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from azure.storage.blob import BlobSasPermissions, generate_blob_sas

from pytest_cmg._storage.azurite import AzuriteProcess, BlobEndpoint
from pytest_cmg._storage.endpoint import DEV_ACCOUNT_KEY
from pytest_cmg.faults import (
    Fault,
    FaultProxy,
    close_after,
    close_before_headers,
    delay,
    flip_byte,
    ignore_range,
    reset_after,
    respond,
    stall_after,
    throttle,
)

BIG_SIZE = 1 << 20
SMALL = b"small blob: " + bytes(range(256)) * 4


@dataclass(frozen=True)
class Store:
    endpoint: BlobEndpoint
    container: str
    big: bytes

    def sas_url(self, blob: str) -> str:
        sas = generate_blob_sas(
            account_name=self.endpoint.account_name,
            container_name=self.container,
            blob_name=blob,
            account_key=DEV_ACCOUNT_KEY,
            permission=BlobSasPermissions(read=True),
            expiry=datetime.now(UTC) + timedelta(hours=1),
        )
        return f"{self.endpoint.url}/{self.container}/{blob}?{sas}"


@pytest.fixture(scope="module")
def store():
    proc = AzuriteProcess()
    endpoint = proc.start()
    try:
        service = endpoint.service_client()
        name = f"fp-{uuid.uuid4().hex[:12]}"
        container = service.create_container(name)  # private: no public_access
        big = random.Random(20261101).randbytes(BIG_SIZE)
        container.upload_blob("big.bin", big)
        container.upload_blob("small.bin", SMALL)
        yield Store(endpoint, name, big)
    finally:
        proc.stop()


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)

    @property
    def total(self) -> float:
        return sum(self.calls)


@pytest.fixture
def fake_sleep():
    return FakeSleep()


@pytest.fixture
def proxy(store, fake_sleep):
    with FaultProxy(store.endpoint.url, sleep=fake_sleep, timeout=10.0) as p:
        yield p
        # Every test also checks the SAS never leaks into the log.
        assert "sig=" not in repr(p.log)


@pytest.fixture
def session():
    s = requests.Session()
    s.trust_env = False  # the machine sets REQUESTS_CA_BUNDLE and maybe proxies
    yield s
    s.close()


def new_session() -> requests.Session:
    s = requests.Session()
    s.trust_env = False
    return s


def big_url(store: Store, proxy: FaultProxy) -> str:
    return proxy.rewrite(store.sas_url("big.bin"))


def small_url(store: Store, proxy: FaultProxy) -> str:
    return proxy.rewrite(store.sas_url("small.bin"))


def stream_count(response: requests.Response, chunk: int) -> tuple[int, BaseException | None]:
    """Body bytes received before the stream failed (and the failure)."""
    got = 0
    try:
        for part in response.iter_content(chunk_size=chunk):
            got += len(part)
    except requests.RequestException as exc:
        return got, exc
    return got, None


def raw_get(proxy: FaultProxy, url: str, timeout: float = 5.0) -> socket.socket:
    """A raw socket that has sent one GET for ``url`` through the proxy."""
    target = url.split(str(proxy.port), 1)[1]
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n\r\n".encode())
    return sock


def read_all(sock: socket.socket) -> tuple[bytes, BaseException | None]:
    data = bytearray()
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except OSError as exc:
        return bytes(data), exc
    return bytes(data), None


def split_response(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


def content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


# --------------------------------------------------------------------------------------------
# Fault values and addressing (no network)
# --------------------------------------------------------------------------------------------


def test_fault_names_are_stable():
    assert reset_after(300_000).name == "reset_after(300000)"
    assert close_after(5).name == "close_after(5)"
    assert stall_after(10, 2.5).name == "stall_after(10, 2.5)"
    assert throttle(262_144).name == "throttle(262144)"
    assert delay(0.25).name == "delay(0.25)"
    assert flip_byte(12345).name == "flip_byte(12345)"
    assert close_before_headers().name == "close_before_headers()"
    assert respond(503, headers={"Retry-After": "2"}).name == "respond(503)"
    assert ignore_range().name == "ignore_range()"
    # Frozen and hashable, so scripts can be kept in sets and compared.
    assert reset_after(1) == reset_after(1)
    assert len({reset_after(1), reset_after(1), close_after(1)}) == 2


@pytest.mark.parametrize(
    "make",
    [
        lambda: reset_after(-1),
        lambda: flip_byte(-5),
        lambda: stall_after(0, -1.0),
        lambda: stall_after(0, float("inf")),
        lambda: delay(float("nan")),
        lambda: throttle(0),
        lambda: respond(100),
        lambda: respond(600),
        lambda: respond(503, headers={"X-Bad": "a\r\nInjected: yes"}),
        lambda: respond(503, headers={"X-Bad": "caf\u00e9"}),
        lambda: Fault("throttle"),
    ],
)
def test_invalid_faults_are_refused(make):
    with pytest.raises(ValueError):
        make()


def test_rewrite_keeps_path_and_query_byte_for_byte():
    p = FaultProxy("http://127.0.0.1:43587/devstoreaccount1").start()
    try:
        original = (
            "http://127.0.0.1:43587/devstoreaccount1/c/dir%2Fa%20b.bin"
            "?se=2026-11-01T00%3A00%3A00Z&sp=r&sig=AbC%2B%2F%3D"
        )
        rewritten = p.rewrite(original)
        assert rewritten == f"http://127.0.0.1:{p.port}" + original[len("http://127.0.0.1:43587") :]
        assert p.url == f"http://127.0.0.1:{p.port}"
        with pytest.raises(ValueError) as info:
            p.rewrite("http://127.0.0.1:9999/devstoreaccount1/c/x?sig=secret")
        assert "secret" not in str(info.value)
        with pytest.raises(ValueError):
            p.rewrite("https://127.0.0.1:43587/x")
    finally:
        p.stop()


def test_constructor_and_add_validate():
    with pytest.raises(ValueError):
        FaultProxy("https://127.0.0.1:1")
    p = FaultProxy("http://127.0.0.1:1")
    with pytest.raises(RuntimeError):
        _ = p.port
    with pytest.raises(ValueError):
        p.add(reset_after(1), request=0)
    with pytest.raises(ValueError):
        p.add(reset_after(1), times=0)
    p.stop()  # stopping a never-started proxy is harmless
    with pytest.raises(RuntimeError):
        p.start()


# --------------------------------------------------------------------------------------------
# Pass-through, keep-alive, ranges
# --------------------------------------------------------------------------------------------


def test_pass_through_is_byte_identical_and_keeps_the_connection_alive(store, proxy, session):
    first = session.get(big_url(store, proxy), timeout=10)
    second = session.get(small_url(store, proxy), timeout=10)

    assert first.status_code == 200
    assert first.content == store.big
    assert second.status_code == 200
    assert second.content == SMALL
    assert proxy.wait_idle()
    log = proxy.log
    assert [r.number for r in log] == [1, 2]
    assert [r.connection for r in log] == [1, 1]
    assert proxy.connections == 1
    assert [r.status for r in log] == [200, 200]
    assert [r.body_bytes for r in log] == [BIG_SIZE, len(SMALL)]
    assert all(r.forwarded and r.outcome == "complete" and r.faults == () for r in log)
    assert log[0].path == f"/devstoreaccount1/{store.container}/big.bin"
    assert log[0].method == "GET"
    assert log[0].range is None


def test_azurite_error_answers_are_chunked_and_pass_through(store, proxy, session):
    tampered = big_url(store, proxy).replace("sig=", "sig=AA")
    proxy.add(flip_byte(0), request=2)

    denied = session.get(tampered, timeout=10)
    flipped = session.get(tampered, timeout=10)
    ok = session.get(small_url(store, proxy), timeout=10)

    assert denied.status_code == 403
    # Azurite answers errors chunked; the proxy must keep the framing intact for keep-alive.
    assert denied.headers.get("Transfer-Encoding") == "chunked"
    assert denied.headers["x-ms-error-code"] == "AuthorizationFailure"
    assert b"<Code>AuthorizationFailure</Code>" in denied.content
    assert flipped.content[0] == denied.content[0] ^ 0xFF
    assert flipped.content[1:5] == denied.content[1:5]
    assert ok.content == SMALL
    assert proxy.connections == 1
    assert [r.status for r in proxy.log] == [403, 403, 200]


def test_request_bodies_are_forwarded(store, proxy, session):
    from azure.storage.blob import BlobServiceClient

    via_proxy = BlobServiceClient(
        proxy.rewrite(store.endpoint.url),
        credential={"account_name": store.endpoint.account_name, "account_key": DEV_ACCOUNT_KEY},
    )
    payload = random.Random(7).randbytes(100_000)
    via_proxy.get_blob_client(store.container, "uploaded.bin").upload_blob(payload, overwrite=True)
    direct = store.endpoint.service_client().get_blob_client(store.container, "uploaded.bin")
    assert direct.download_blob().readall() == payload

    # Content-Length body with Expect: 100-continue, through a write SAS.
    sas = generate_blob_sas(
        account_name=store.endpoint.account_name,
        container_name=store.container,
        blob_name="put.bin",
        account_key=DEV_ACCOUNT_KEY,
        permission=BlobSasPermissions(write=True, create=True),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )
    direct_url = f"{store.endpoint.url}/{store.container}/put.bin?{sas}"
    url = proxy.rewrite(direct_url)
    headers = {"x-ms-blob-type": "BlockBlob", "Expect": "100-continue"}
    r = session.put(url, data=b"expect me", headers=headers, timeout=10)
    assert r.status_code == 201, r.text
    got = store.endpoint.service_client().get_blob_client(store.container, "put.bin")
    assert got.download_blob().readall() == b"expect me"

    # A chunked request body: Azurite wants Content-Length for Put Blob, and must say so the
    # same way with and without the proxy; the connection must survive for the next request.
    def chunked_put(target: str) -> requests.Response:
        body = iter([b"part one, ", b"part two"])
        return session.put(target, data=body, headers={"x-ms-blob-type": "BlockBlob"}, timeout=10)

    assert chunked_put(url).status_code == chunked_put(direct_url).status_code
    assert session.get(small_url(store, proxy), timeout=10).content == SMALL
    assert [e.method for e in proxy.log][-3:] == ["PUT", "PUT", "GET"]
    assert all(e.forwarded for e in proxy.log)
    assert proxy.connections == 2  # the SDK's pool, then this session's


def test_head_request_passes_through(store, proxy, session):
    r = session.head(big_url(store, proxy), timeout=10)
    assert r.status_code == 200
    assert int(r.headers["Content-Length"]) == BIG_SIZE
    # A HEAD answer has no body even though it carries Content-Length: the next request on the
    # same connection must still parse.
    assert session.get(small_url(store, proxy), timeout=10).content == SMALL
    assert proxy.connections == 1


def test_range_passes_through_and_is_logged(store, proxy, session):
    r = session.get(big_url(store, proxy), headers={"Range": "bytes=1000-1999"}, timeout=10)

    assert r.status_code == 206
    assert r.headers["Content-Range"] == f"bytes 1000-1999/{BIG_SIZE}"
    assert r.content == store.big[1000:2000]
    assert proxy.log[0].range == "bytes=1000-1999"


def test_x_ms_range_is_logged_in_preference(store, proxy, session):
    r = session.get(
        big_url(store, proxy),
        headers={"Range": "bytes=0-9", "x-ms-range": "bytes=10-19"},
        timeout=10,
    )
    assert r.status_code == 206
    assert r.content == store.big[10:20]  # Azure semantics: x-ms-range wins
    assert proxy.log[0].range == "bytes=10-19"


def test_ignore_range_makes_upstream_answer_the_whole_blob(store, proxy, session):
    proxy.add(ignore_range(), request=2)
    url = big_url(store, proxy)

    ranged = session.get(url, headers={"Range": "bytes=5000-"}, timeout=10)
    lost = session.get(url, headers={"Range": "bytes=5000-"}, timeout=10)

    assert ranged.status_code == 206
    assert ranged.content == store.big[5000:]
    assert lost.status_code == 200
    assert "Content-Range" not in lost.headers
    assert lost.content == store.big
    log = proxy.log
    # The log shows what the client asked for, not what reached upstream.
    assert log[1].range == "bytes=5000-"
    assert log[1].faults == ("ignore_range()",)


def test_azure_sdk_downloads_through_the_proxy(store, proxy, session):
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobClient

    client = BlobClient.from_blob_url(
        big_url(store, proxy),
        transport=RequestsTransport(session=session, session_owner=False, use_env_settings=False),
        max_single_get_size=256 * 1024,
        max_chunk_get_size=256 * 1024,
    )
    assert client.download_blob(max_concurrency=1).readall() == store.big
    log = proxy.log
    # The SDK reads in ranged chunks with x-ms-range on one kept-alive connection.
    assert [r.range for r in log] == [
        f"bytes={start}-{start + 256 * 1024 - 1}" for start in range(0, BIG_SIZE, 256 * 1024)
    ]
    assert {r.status for r in log} == {206}
    assert proxy.connections == 1


# --------------------------------------------------------------------------------------------
# Connection faults
# --------------------------------------------------------------------------------------------


def test_reset_after_delivers_exactly_n_bytes_then_a_reset(store, proxy, session):
    proxy.add(reset_after(300_000))

    r = session.get(big_url(store, proxy), stream=True, timeout=10)
    assert r.status_code == 200
    # 300_000 is a multiple of the chunk size: a read that straddled the RST would lose the
    # bytes it had already buffered inside http.client, and the count would look short.
    got, exc = stream_count(r, 10_000)

    assert exc is not None
    assert "reset" in repr(exc).lower()
    assert got == 300_000
    entry = proxy.log[0]
    assert entry.faults == ("reset_after(300000)",)
    assert entry.outcome == "reset"
    assert entry.body_bytes == 300_000
    # The next request opens a new connection and is unaffected.
    assert session.get(small_url(store, proxy), timeout=10).content == SMALL
    assert proxy.connections == 2


def test_reset_after_is_a_real_rst_on_the_wire(store, proxy):
    proxy.add(reset_after(4096))
    sock = raw_get(proxy, big_url(store, proxy))
    with sock:
        data, exc = read_all(sock)

    assert isinstance(exc, ConnectionResetError)
    head, body = split_response(data)
    assert head.startswith(b"HTTP/1.1 200")
    assert body == store.big[:4096]


def test_close_after_is_a_clean_short_read(store, proxy, session):
    proxy.add(close_after(70_000), times=2)

    sock = raw_get(proxy, big_url(store, proxy))
    with sock:
        data, exc = read_all(sock)
    assert exc is None  # EOF, not ECONNRESET
    head, body = split_response(data)
    assert content_length(head) == BIG_SIZE
    assert body == store.big[:70_000]

    r = session.get(big_url(store, proxy), stream=True, timeout=10)
    got, exc = stream_count(r, 10_000)
    assert got == 70_000 < int(r.headers["Content-Length"])
    assert exc is not None
    assert "IncompleteRead" in repr(exc)
    assert "reset" not in repr(exc).lower()
    assert [(e.outcome, e.body_bytes) for e in proxy.log] == [("closed", 70_000)] * 2


def test_close_before_headers_then_next_request_is_fine(store, proxy, session):
    proxy.add(close_before_headers())

    with pytest.raises(requests.ConnectionError):
        session.get(small_url(store, proxy), timeout=10)
    ok = session.get(small_url(store, proxy), timeout=10)

    assert ok.status_code == 200
    assert ok.content == SMALL
    first, second = proxy.log
    assert first.outcome == "closed_before_headers"
    assert not first.forwarded
    assert first.status is None
    assert first.body_bytes == 0
    assert second.forwarded
    assert second.faults == ()


def test_stop_closes_live_connections_and_the_listener(store, fake_sleep):
    p = FaultProxy(store.endpoint.url, sleep=fake_sleep).start()
    port = p.port
    sock = raw_get(p, p.rewrite(store.sas_url("small.bin")))
    with sock:
        sock.settimeout(5)
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        # Read the rest of the one response; the keep-alive connection stays open.
        while len(split_response(first)[1]) < len(SMALL):
            first += sock.recv(65536)

        p.stop()
        p.stop()  # idempotent

        rest, _exc = read_all(sock)
        assert rest == b""  # closed by the proxy (EOF or reset), nothing more sent
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert not any(t.name.startswith(f"faultproxy-{port}-") for t in threading.enumerate())
    assert "sig=" not in repr(p.log)


def test_upstream_down_answers_502(fake_sleep, session):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    with FaultProxy(f"http://127.0.0.1:{dead_port}", sleep=fake_sleep) as p:
        r = session.get(f"{p.url}/devstoreaccount1/c/b?sig=secret", timeout=10)
        assert r.status_code == 502
        (entry,) = p.log
        assert entry.outcome == "upstream_error"
        assert not entry.forwarded
        assert entry.path == "/devstoreaccount1/c/b"


# --------------------------------------------------------------------------------------------
# Content faults and scripted answers
# --------------------------------------------------------------------------------------------


def test_flip_byte_changes_exactly_that_byte(store, proxy, session):
    proxy.add(flip_byte(12345))

    r = session.get(big_url(store, proxy), timeout=10)

    assert r.status_code == 200
    body = r.content
    assert len(body) == BIG_SIZE
    diffs = [i for i in range(BIG_SIZE) if body[i] != store.big[i]]
    assert diffs == [12345]
    assert body[12345] == store.big[12345] ^ 0xFF
    assert proxy.log[0].faults == ("flip_byte(12345)",)


def test_flip_byte_offset_is_relative_to_the_response_body(store, proxy, session):
    proxy.add(flip_byte(0))
    r = session.get(big_url(store, proxy), headers={"Range": "bytes=100-199"}, timeout=10)
    assert r.content[0] == store.big[100] ^ 0xFF
    assert r.content[1:] == store.big[101:200]


def test_respond_503_on_request_2_only(store, proxy, session):
    proxy.add(
        respond(503, headers={"Retry-After": "2", "x-ms-error-code": "ServerBusy"}),
        request=2,
    )
    url = small_url(store, proxy)

    statuses = []
    for _ in range(3):
        r = session.get(url, timeout=10)
        statuses.append(r.status_code)
        if r.status_code == 503:
            busy = r

    assert statuses == [200, 503, 200]
    assert busy.headers["Retry-After"] == "2"
    assert busy.headers["x-ms-error-code"] == "ServerBusy"
    assert busy.content == b""
    log = proxy.log
    assert [r.forwarded for r in log] == [True, False, True]
    assert [r.status for r in log] == [200, 503, 200]
    assert log[1].faults == ("respond(503)",)
    # A scripted answer keeps the connection alive like a real one.
    assert proxy.connections == 1


def test_respond_with_body_and_body_faults(store, proxy, session):
    proxy.add(respond(404, headers={"x-ms-error-code": "BlobNotFound"}, body=b"gone"))
    proxy.add(flip_byte(1), request=1)
    r = session.get(small_url(store, proxy), timeout=10)
    assert r.status_code == 404
    assert r.content == b"g" + bytes([ord("o") ^ 0xFF]) + b"ne"
    assert r.headers["Content-Length"] == "4"


# --------------------------------------------------------------------------------------------
# Timing faults (fake sleep) and one bounded real-time stall
# --------------------------------------------------------------------------------------------


def test_throttle_paces_through_the_injected_sleep(store, proxy, session, fake_sleep):
    proxy.add(throttle(256 * 1024))

    started = time.monotonic()
    r = session.get(big_url(store, proxy), timeout=10)

    assert r.content == store.big
    assert fake_sleep.total == pytest.approx(4.0)
    assert len(fake_sleep.calls) >= 32  # small slices, not one big sleep
    assert max(fake_sleep.calls) <= 0.25
    assert time.monotonic() - started < 3.0  # nothing really waited


def test_stall_after_pauses_once_then_continues(store, proxy, session, fake_sleep):
    proxy.add(stall_after(500_000, 7.5))
    r = session.get(big_url(store, proxy), timeout=10)
    assert r.content == store.big
    assert fake_sleep.calls == [7.5]
    assert proxy.log[0].faults == ("stall_after(500000, 7.5)",)


def test_delay_and_reset_combine_on_one_request(store, proxy, session, fake_sleep):
    proxy.add(delay(3.0), request=1)
    proxy.add(reset_after(0), request=1)

    r = session.get(big_url(store, proxy), stream=True, timeout=10)
    got, exc = stream_count(r, 10_000)

    assert r.status_code == 200
    assert got == 0
    assert exc is not None
    assert fake_sleep.calls == [3.0]
    assert proxy.log[0].faults == ("delay(3)", "reset_after(0)")


def test_stall_with_real_sleep_makes_a_client_read_timeout_fire(store):
    with FaultProxy(store.endpoint.url) as p, new_session() as s:
        p.add(stall_after(100_000, 2.0))
        started = time.monotonic()
        r = s.get(big_url(store, p), stream=True, timeout=(5, 0.5))
        got, exc = stream_count(r, 10_000)
        elapsed = time.monotonic() - started
        assert isinstance(exc, requests.ConnectionError)
        assert "timed out" in str(exc).lower()
        assert got == 100_000
        assert 0.4 < elapsed < 1.9
        stopping = time.monotonic()
    # stop() cut the remaining stall short instead of waiting it out.
    assert time.monotonic() - stopping < 1.0


# --------------------------------------------------------------------------------------------
# Addressing by request number
# --------------------------------------------------------------------------------------------


def test_request_numbers_count_across_connections(store, proxy):
    proxy.add(respond(500), request=3)
    proxy.add(respond(418), request=5, times=2)
    url = small_url(store, proxy)

    statuses = []
    for _ in range(7):
        with new_session() as s:  # a new connection each time
            statuses.append(s.get(url, timeout=10).status_code)

    assert statuses == [200, 200, 500, 200, 418, 418, 200]
    log = proxy.log
    assert [r.number for r in log] == [1, 2, 3, 4, 5, 6, 7]
    assert [r.connection for r in log] == [1, 2, 3, 4, 5, 6, 7]


def test_untargeted_faults_hit_the_next_requests_and_clear_resets(store, proxy, session):
    url = small_url(store, proxy)
    session.get(url, timeout=10)
    proxy.add(respond(503), times=2)

    assert [session.get(url, timeout=10).status_code for _ in range(3)] == [503, 503, 200]

    proxy.add(respond(500), request=1)
    proxy.clear()
    assert proxy.log == []
    assert session.get(url, timeout=10).status_code == 200  # the pending fault was dropped
    assert proxy.log[0].number == 1


# --------------------------------------------------------------------------------------------
# Chunked responses (Azurite never sends them, so a tiny upstream does)
# --------------------------------------------------------------------------------------------

CHUNKS = [b"a" * 10, b"b" * 5000, b"c" * 3]


class _StubHandler(BaseHTTPRequestHandler):
    """/x: chunked body; /silent-close: closes after answering without saying so; /short:
    promises 100 bytes and sends 10."""

    protocol_version = "HTTP/1.1"

    def do_GET(self):
        self.send_response(200)
        if self.path.startswith("/silent-close"):
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            self.close_connection = True
            return
        if self.path.startswith("/short"):
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.close_connection = True
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for chunk in CHUNKS:
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")

    def log_message(self, format, *args):
        pass


@pytest.fixture
def stub_upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    server.daemon_threads = True
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_chunked_body_offsets_count_payload_only(stub_upstream, fake_sleep, session):
    payload = b"".join(CHUNKS)
    with FaultProxy(stub_upstream, sleep=fake_sleep) as p:
        assert session.get(p.url + "/x?sig=s", timeout=10).content == payload

        p.add(flip_byte(10))  # first byte of the second chunk, not a framing byte
        flipped = session.get(p.url + "/x", timeout=10).content
        assert flipped == payload[:10] + bytes([payload[10] ^ 0xFF]) + payload[11:]

        p.add(reset_after(12))
        r = session.get(p.url + "/x", stream=True, timeout=10)
        got, exc = stream_count(r, 1)
        assert exc is not None
        assert got == 12
        assert p.log[2].body_bytes == 12
        assert p.wait_idle()
        assert [e.outcome for e in p.log] == ["complete", "complete", "reset"]
        assert p.log[0].path == "/x"


def test_raw_socket_reset_errno(store, proxy):
    """The RST is visible to any client as ECONNRESET, not only through requests."""
    proxy.add(reset_after(0))
    with raw_get(proxy, small_url(store, proxy)) as sock:
        _data, exc = read_all(sock)
    assert isinstance(exc, OSError)
    assert exc.errno == errno.ECONNRESET


def test_upstream_closing_a_kept_alive_connection_is_replaced(stub_upstream, fake_sleep, session):
    """What Azurite does after 5 s idle (Keep-Alive: timeout=5), without waiting 5 s."""
    with FaultProxy(stub_upstream, sleep=fake_sleep) as p:
        for _ in range(3):
            r = session.get(p.url + "/silent-close", timeout=10)
            assert (r.status_code, r.content) == (200, b"ok")
        assert p.connections == 1
        assert p.upstream_connections == 3
        assert [e.forwarded for e in p.log] == [True] * 3


def test_upstream_dying_mid_body_gives_the_client_a_short_read(stub_upstream, fake_sleep, session):
    with FaultProxy(stub_upstream, sleep=fake_sleep) as p:
        r = session.get(p.url + "/short", stream=True, timeout=10)
        got, exc = stream_count(r, 1)
        assert got == 10
        assert exc is not None
        assert p.wait_idle()
        assert p.log[0].outcome == "upstream_error"
        assert session.get(p.url + "/x", timeout=10).content == b"".join(CHUNKS)


def test_garbage_request_gets_400_and_is_not_counted(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        data, _exc = read_all(sock)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert proxy.log == []


def test_path_filter_numbers_only_the_requests_for_that_blob(store, proxy, session):
    """``request=N, path=P`` is the N-th request for P, whatever else arrived in between."""
    proxy.add(respond(503), request=2, path="big.bin")
    small, big = small_url(store, proxy), big_url(store, proxy)

    statuses = [
        session.get(url, headers={"Range": "bytes=0-9"}, timeout=10).status_code
        for url in (small, big, small, small, big, big)
    ]

    # Global requests 3 and 4 are for small.bin: they neither fire the fault nor count for it.
    assert statuses == [206, 206, 206, 206, 503, 206]
    assert [r.faults for r in proxy.log][4] == ("respond(503)",)
    with pytest.raises(ValueError, match="path must not be empty"):
        proxy.add(respond(503), path="")


def test_every_fault_kind_has_one_word_in_the_vocabulary():
    """A scenario can script every fault the proxy knows: the table names each kind once."""
    from typing import get_args

    from pytest_cmg._net.faults import VOCABULARY, FaultKind

    kinds = [word.kind for word in VOCABULARY]
    assert sorted(kinds) == sorted(get_args(FaultKind))


@pytest.mark.parametrize(
    ("fault", "body", "acted"),
    [
        (reset_after(100), 99, False),
        (reset_after(100), 100, True),  # the cut happens once the offset is reached
        (flip_byte(100), 100, False),  # byte 100 is the 101st: it was never sent
        (flip_byte(100), 101, True),
        (respond(503), 0, True),  # no offset: it acts on every request it hits
    ],
)
def test_a_fault_at_an_offset_acts_only_once_the_body_reaches_it(fault, body, acted):
    assert fault.acted(body) is acted


def test_a_record_snapshot_copies_every_field_and_stays_as_it_was():
    from dataclasses import fields

    from pytest_cmg._net.proxy import ProxiedRequest, Record

    # One list of fields for both: snapshot() copies by ProxiedRequest's field names.
    assert [f.name for f in fields(Record)] == [f.name for f in fields(ProxiedRequest)]
    record = Record(
        3, 1, "GET", "/c/b", "bytes=0-9", ("reset",), True, 206, 10, "complete", 5.0, "2"
    )
    snapshot = record.snapshot()
    assert snapshot == ProxiedRequest(
        3, 1, "GET", "/c/b", "bytes=0-9", ("reset",), True, 206, 10, "complete", 5.0, "2"
    )
    record.body_bytes += 5
    record.outcome = "reset"
    assert (snapshot.body_bytes, snapshot.outcome) == (10, "complete")
