"""The gateway's front door (issue 10): whose fault a broken exchange is, bounded logs, the
connection cap and timers, the manifest's ``alg``, and the site answering without any socket.

Each test here failed on commit 2dfdc7b (``http.server`` transport), as its comment says.
"""

from __future__ import annotations

import os
import socket
import ssl
import time

import pytest

from pytest_cmg import FakeCMG
from pytest_cmg._gateway.site import CmgSite, SiteRequest
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, encode_message
from pytest_cmg._protocol.location import SHA256_RSA_OID, ContentLocationRequest, ManifestQuery
from pytest_cmg._protocol.paths import MANIFEST_PATH, TOKEN_SIGNATURE_HEADER

CLIENT = "GUID:frontdoor-client"


def tls_connect(cmg, timeout=10):
    context = ssl.create_default_context(cafile=str(cmg.ca_pem))
    raw = socket.create_connection(("127.0.0.1", cmg.port), timeout=timeout)
    return context.wrap_socket(raw, server_hostname="127.0.0.1")


def read_all(sock, limit=10.0):
    received = b""
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    except (OSError, ssl.SSLError):
        pass
    return received


def location_request(cmg, *, length=None, body=None, extra=""):
    body = body if body is not None else encode_message(
        CcmMessage(body=ContentLocationRequest("PS100001", 1, cmg.site_code).to_xml())
    )
    path = cmg.location_url.removeprefix(cmg.url)
    head = (
        f"CCM_POST {path} HTTP/1.1\r\nHost: {cmg.hostname}\r\n"
        f"Content-Type: {CCM_CONTENT_TYPE}\r\nAuthorization: Bearer {cmg.issue_token(CLIENT)}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\n{extra}\r\n"
    )
    return head.encode("latin-1"), body


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


# --- item 3: the client's faults are the client's ------------------------------------------------


def test_short_body_is_the_clients_fault_not_a_gateway_error():
    # On 2dfdc7b: the handler waited 30 s, answered 500 and recorded a gateway error, so
    # ``check()`` (the cmg fixture's teardown, serve's exit) blamed the gateway.
    with FakeCMG(body_timeout=1.0) as cmg:
        head, body = location_request(cmg)
        started = time.monotonic()
        with tls_connect(cmg) as tls:
            tls.sendall(head + body[:10])  # declares the whole body, sends 10 bytes, stalls
            received = read_all(tls)
        assert time.monotonic() - started < 5
        assert b" 500 " not in received
        cmg.check()  # no gateway error
        assert any("the client's doing" in line for line in cmg.service_lines)
        assert cmg.log.count(None, status=500) == 0


def test_half_closed_short_body_is_the_clients_fault():
    with FakeCMG() as cmg:
        head, body = location_request(cmg)
        with tls_connect(cmg) as tls:
            tls.sendall(head + body[:10])
            # Half-close the TCP stream under the TLS layer, which stays usable for reading.
            socket.socket(fileno=os.dup(tls.fileno())).shutdown(socket.SHUT_WR)
            received = read_all(tls)
        assert b" 500 " not in received
        assert wait_until(lambda: any("the client's doing" in ln for ln in cmg.service_lines))
        cmg.check()


def test_client_gone_before_the_answer_is_not_a_gateway_error():
    # On 2dfdc7b: writing the answer to a closed socket raised inside the handler, which
    # recorded it as a gateway error (cmg.check() raised, serve exited 1).
    with FakeCMG() as cmg:
        cmg.fail("location", delay=0.5, times=5)
        for _ in range(5):
            head, body = location_request(cmg)
            tls = tls_connect(cmg)
            tls.sendall(head + body)
            time.sleep(0.2)  # the gateway has the request and is inside the 0.5 s delay
            # Reset instead of a polite close, so the gateway's write fails for sure.
            tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            tls.close()
        assert wait_until(lambda: cmg.log.count("location") == 5)
        time.sleep(1.0)  # every answer has been written to a reset connection by now
        cmg.check()
        assert any("went away before the answer" in line for line in cmg.service_lines)


# --- item 4: bounded logs ------------------------------------------------------------------------


def test_request_log_keeps_a_bounded_excerpt_of_each_request():
    # On 2dfdc7b every header of every request was kept whole for the process's life.
    with FakeCMG() as cmg:
        filler = "".join(f"X-Filler-{n}: {'v' * 150}\r\n" for n in range(90))
        for _ in range(5):
            with tls_connect(cmg) as tls:
                tls.sendall(
                    f"GET /nowhere HTTP/1.1\r\nHost: cmg\r\n{filler}Connection: close\r\n\r\n".encode()
                )
                assert read_all(tls).startswith(b"HTTP/1.1 404 ")
        entries = cmg.log.entries
        assert len(entries) == 5
        for entry in entries:
            assert len(entry.headers) <= 32
            assert sum(len(k) + len(v) for k, v in entry.headers.items()) <= 32 * (64 + 256)


def test_request_log_keeps_the_latest_entries_and_counts_the_dropped():
    site = CmgSite()
    site.log = type(site.log)(max_entries=10)
    for n in range(25):
        site.handle(SiteRequest("GET", f"/nowhere/{n}"))
    entries = site.log.entries
    assert [e.path for e in entries] == [f"/nowhere/{n}" for n in range(15, 25)]
    assert [e.index for e in entries] == list(range(16, 26))
    assert site.log.dropped == 15
    with pytest.raises(AssertionError, match="15 older ones were dropped"):
        site.log.assert_request_made("manifest")


# --- item 9: the manifest's alg ------------------------------------------------------------------


def _manifest_request(site, alg):
    token = site.authority.issue_access_token("PS100001", "PS100001", CLIENT, site.hostname)
    query = ManifestQuery("PS100001", "PS100001", token.tid, token.iss, alg, token.st, token.et)
    return SiteRequest(
        "GET",
        f"{MANIFEST_PATH}?{query.encode()}",
        headers=(("Host", "cmg"), (TOKEN_SIGNATURE_HEADER, token.signature)),
    )


@pytest.mark.parametrize("alg", ["garbage", "1.2.840.113549.1.1.5", "none"])
def test_manifest_request_with_another_alg_is_refused(alg):
    # On 2dfdc7b ``alg`` was not read at all: alg=garbage got the manifest.
    site = CmgSite()
    response = site.handle(_manifest_request(site, alg))
    assert response.status == 401
    assert "alg" in site.log.entries[-1].detail


def test_manifest_request_with_another_alg_is_refused_over_https():
    with FakeCMG() as cmg, tls_connect(cmg) as tls:
        token = cmg.authority.issue_access_token("PS100001", "PS100001", CLIENT, cmg.hostname)
        query = (
            f"pid=PS100001&cid=PS100001&tid={token.tid}&iss={token.iss}&alg=garbage"
            f"&st={token.st}&et={token.et}"
        )
        tls.sendall(
            f"GET {MANIFEST_PATH}?{query} HTTP/1.1\r\nHost: cmg\r\n"
            f"{TOKEN_SIGNATURE_HEADER}: {token.signature}\r\nConnection: close\r\n\r\n".encode()
        )
        assert read_all(tls).startswith(b"HTTP/1.1 401 ")


def test_manifest_request_with_the_site_alg_passes_the_token_check():
    site = CmgSite()  # no cloud DP: the request gets past the token and stops at the content
    response = site.handle(_manifest_request(site, SHA256_RSA_OID))
    assert response.status == 404
    assert "does not serve content" in site.log.entries[-1].detail


def test_repeated_manifest_parameter_is_refused():
    site = CmgSite()
    request = _manifest_request(site, SHA256_RSA_OID)
    doubled = SiteRequest("GET", request.target + "&pid=PS100002", headers=request.headers)
    assert site.handle(doubled).status == 400
    assert "more than once" in site.log.entries[-1].detail


# --- item 10: connection cap and timers ----------------------------------------------------------


def test_connection_cap_and_header_timeout_free_a_trickling_flood():
    # On 2dfdc7b every connection got a thread and was held for ever (1,003 threads for 1,000
    # trickling clients). Now at most max_connections are served, and each is dropped once its
    # headers take longer than header_timeout.
    cap, flood = 8, 24
    with FakeCMG(max_connections=cap, header_timeout=1.0, handshake_timeout=2.0) as cmg:
        held = []
        for _ in range(flood):
            raw = socket.create_connection(("127.0.0.1", cmg.port), timeout=5)
            held.append(raw)
        assert wait_until(lambda: cmg.refused_connections >= flood - cap, timeout=5)
        assert cmg.open_connections <= cap
        for raw in held:
            raw.close()
        # The served ones were mid-handshake; a second wave trickles after a handshake.
        assert wait_until(lambda: cmg.open_connections == 0, timeout=10)
        trickling = [tls_connect(cmg, timeout=5) for _ in range(cap)]
        for tls in trickling:
            tls.sendall(b"G")
        started = time.monotonic()
        for _ in range(4):
            for tls in trickling:
                try:
                    tls.sendall(b"E")
                except OSError:
                    pass
            time.sleep(0.4)
        closed = 0
        for tls in trickling:
            try:
                tls.settimeout(3)
                closed += tls.recv(1) == b""
            except (OSError, ssl.SSLError):
                closed += 1
            tls.close()
        assert closed == cap
        assert time.monotonic() - started < 8
        assert any("header timeout" in line for line in cmg.service_lines)
        cmg.check()


def test_idle_keep_alive_connection_is_closed_after_idle_timeout():
    with FakeCMG(idle_timeout=0.5) as cmg, tls_connect(cmg) as tls:
        tls.sendall(b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: cmg\r\n\r\n")
        first = tls.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        tls.settimeout(5)
        started = time.monotonic()
        assert read_all(tls, limit=5) == b""
        assert time.monotonic() - started < 3


def test_limits_are_checked_where_the_gateway_is_configured():
    with pytest.raises(ValueError, match="header_timeout"):
        FakeCMG(header_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        FakeCMG(max_connections=0)


# --- the site works without sockets --------------------------------------------------------------


def test_site_answers_a_request_without_any_socket():
    site = CmgSite()
    response = site.handle(SiteRequest("GET", "/CCM_Proxy_ServerAuth/ServiceMetadata"))
    assert response.status == 200
    assert b"ServiceMetadata" in response.body
    assert site.handle(SiteRequest("GET", "/SMS_DP_SMSPKG$/Datalib")).status == 404
    assert [e.status for e in site.log.entries] == [200, 404]


def test_expect_100_continue_gets_its_interim_answer():
    # .NET clients send Expect: 100-continue on every POST and wait for it before the body.
    with FakeCMG() as cmg, tls_connect(cmg) as tls:
        head, body = location_request(cmg, extra="Expect: 100-continue\r\nConnection: close\r\n")
        tls.sendall(head)
        interim = tls.recv(65536)
        assert interim.startswith(b"HTTP/1.1 100 ")
        tls.sendall(body)
        final = read_all(tls)
        assert final.startswith(b"HTTP/1.1 200 ") or b"HTTP/1.1 200 " in interim + final


@pytest.mark.parametrize("framing", [b"zz\r\nabc\r\n0\r\n\r\n", b"-1\r\n", b"3\r\nabcXX0\r\n\r\n"])
def test_broken_chunk_framing_gets_httpapi_400(framing):
    # Only a client that closes mid-body goes unanswered; broken framing is HTTP.sys's 400.
    with FakeCMG() as cmg, tls_connect(cmg) as tls:
        path = cmg.location_url.removeprefix(cmg.url)
        tls.sendall(
            f"CCM_POST {path} HTTP/1.1\r\nHost: cmg\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + framing
        )
        received = read_all(tls)
        assert received.startswith(b"HTTP/1.1 400 Bad Request\r\n")
        assert b"Server: Microsoft-HTTPAPI/2.0" in received
        cmg.check()


def test_a_head_request_is_answered_and_the_connection_kept():
    with FakeCMG() as cmg, tls_connect(cmg) as tls:
        tls.sendall(b"HEAD /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: cmg\r\n\r\n")
        first = tls.recv(65536)
        assert first.startswith(b"HTTP/1.1 404 ")  # HEAD is not a published method
        assert first.endswith(b"\r\n\r\n")  # no body follows
        tls.sendall(
            b"GET /CCM_Proxy_ServerAuth/ServiceMetadata HTTP/1.1\r\nHost: cmg\r\nConnection: close\r\n\r\n"
        )
        assert read_all(tls).startswith(b"HTTP/1.1 200 ")
