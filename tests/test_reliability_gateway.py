"""Gateway-side rows of reliability.md's battery that were only partly covered: 26, 31 and 33.

* 26 (sas_scope_and_privilege): SAS minted from offset-aware datetimes carry the UTC instant as
  ``...Z`` and storage (real Azurite) agrees, including offsets whose wall-clock digits point
  the other way; naive datetimes are refused; a gateway whose clock reports another zone mints
  and logs the UTC instant.
* 31 (cmg_server_cert_validation_by_client): a CMG whose certificate, signed by the CA the client
  trusts, names another host or has expired is refused by the engine before any token leaves.
* 33 (cmg_token_matrix): a bulk registration token past its lifetime registers no one.

No test sleeps: token lifetimes run on a :class:`FakeClock`; the only wait is a bounded poll for
the gateway's own log line about a handshake it refused.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import ssl
import time
from datetime import UTC, datetime, timedelta, timezone
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from cryptography import x509

from pytest_cmg import FakeClock, FakeCMG, Step, TaskSequence
from pytest_cmg._client.factory import build_engine, connection_for
from pytest_cmg._gateway.tls import SERVER_CERTIFICATES, WRONG_SERVER_NAME
from pytest_cmg._gateway.tokens import BULK_TOKEN_LIFETIME, INVALID_TOKEN
from pytest_cmg._protocol import codes
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, decode_message, encode_message
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest
from pytest_cmg._protocol.manifest import ContentManifest
from pytest_cmg._protocol.paths import TOKEN_SIGNATURE_HEADER

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from pytest_cmg import CloudDP
    from pytest_cmg._client.engine import TaskSequenceEngine

PACKAGE = "PS100026"
PAYLOAD = {"setup.exe": b"MZ" + b"\x90" * 4094, "readme.txt": b"hello"}
ONE_STEP = TaskSequence(PACKAGE, "Reliability", (Step("Install", "run_command_line", PACKAGE),))
SAS_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


# --- helpers ---------------------------------------------------------------------------------


def gateway_session(gateway: FakeCMG) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE would otherwise replace ``verify``
    session.verify = str(gateway.ca_pem)
    return session


@pytest.fixture
def storage(cloud_dp: CloudDP) -> Iterator[requests.Session]:
    """A session to the cloud DP's storage itself (trusting its CA when it is HTTPS)."""
    session = requests.Session()
    session.trust_env = False
    ca_cert = cloud_dp.endpoint.ca_cert
    session.verify = str(ca_cert) if ca_cert is not None else True
    yield session
    session.close()


def sas_query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def sas_text(instant: datetime) -> str:
    """How a SAS must render ``instant``: UTC, whole seconds, ``Z``."""
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def locate(session: requests.Session, gateway: FakeCMG, client_id: str) -> requests.Response:
    request = ContentLocationRequest(PACKAGE, 1, gateway.site_code)
    return session.request(
        "CCM_POST",
        gateway.location_url,
        data=encode_message(CcmMessage(body=request.to_xml())),
        headers={
            "Content-Type": CCM_CONTENT_TYPE,
            "Authorization": f"Bearer {gateway.issue_token(client_id)}",
        },
        timeout=10,
    )


def manifest_of(session: requests.Session, gateway: FakeCMG) -> ContentManifest:
    located = locate(session, gateway, "GUID:sas-zone")
    assert located.status_code == 200, located.reason
    reply = ContentLocationReply.from_xml(decode_message(located.content).body)
    record = reply.records[0]
    token = record.access_token
    assert token is not None
    params = {"tid": token.tid, "iss": token.iss, "alg": token.alg, "st": token.st, "et": token.et}
    response = session.get(
        record.url, params=params, headers={TOKEN_SIGNATURE_HEADER: token.signature}, timeout=10
    )
    assert response.status_code == 200, response.reason
    return ContentManifest.from_xml(response.text)


def claims_of(jwt: str) -> dict[str, object]:
    payload = jwt.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert isinstance(claims, dict)
    return claims


def sts_url(gateway: FakeCMG) -> str:
    return f"{gateway.url}/CCM_Proxy_ServerAuth/{gateway.role_id}/CCM_STS"


# --- row 26: SAS instants in any zone --------------------------------------------------------

EAST = timezone(timedelta(hours=5))
WEST = timezone(timedelta(hours=-5))
INDIA = timezone(timedelta(hours=5, minutes=30))
#: (start, expiry) relative to now in UTC, the zone each is given in, and what storage answers.
#: The "looks" cases are the bug class reliability.md C1 names: a minter that wrote the
#: wall-clock digits with a ``Z`` would get the opposite answer from storage.
OFFSET_CASES = {
    "expiry_east_future": (timedelta(minutes=-15), timedelta(hours=1), EAST, 200),
    "expiry_east_past_whose_digits_look_future": (
        timedelta(hours=-4), timedelta(hours=-3), EAST, 403,
    ),
    "expiry_west_future_whose_digits_look_past": (
        timedelta(minutes=-15), timedelta(hours=1), WEST, 200,
    ),
    "start_west_future_whose_digits_look_past": (
        timedelta(hours=1), timedelta(hours=2), WEST, 403,
    ),
    "half_hour_offset_and_microseconds": (
        timedelta(minutes=-15, microseconds=654321), timedelta(hours=1, microseconds=123456),
        INDIA, 200,
    ),
}


@pytest.mark.parametrize("case", sorted(OFFSET_CASES))
def test_offset_datetimes_are_signed_as_their_utc_instant(
    cloud_dp: CloudDP, storage: requests.Session, case: str
) -> None:
    # reliability.md 26, mirroring azure-sdk test_generate_blob_sas_expiry: an offset-aware
    # start/expiry becomes the same instant in UTC "Z", and real Azurite judges that instant.
    cloud_dp.distribute(PACKAGE, 1, PAYLOAD)
    start_delta, expiry_delta, zone, expected = OFFSET_CASES[case]
    now = datetime.now(UTC)
    start = (now + start_delta).astimezone(zone)
    expiry = (now + expiry_delta).astimezone(zone)
    if "digits_look_future" in case:
        assert expiry.replace(tzinfo=None) > now.replace(tzinfo=None)  # the trap is set
    if "digits_look_past" in case:
        moved = start if case.startswith("start") else expiry
        assert moved.replace(tzinfo=None) < now.replace(tzinfo=None)
    url = cloud_dp.signed_url(PACKAGE, 1, "setup.exe", start=start, expiry=expiry)
    query = sas_query(url)
    assert SAS_TIME.match(query["st"]) and SAS_TIME.match(query["se"]), query
    assert query["st"] == sas_text(start)
    assert query["se"] == sas_text(expiry)
    response = storage.get(url, timeout=10)
    assert response.status_code == expected, (case, query["st"], query["se"], response.reason)
    if expected == 200:
        assert response.content == PAYLOAD["setup.exe"]


@pytest.mark.parametrize("naive", ["start", "expiry"])
def test_naive_datetimes_are_refused_naming_the_parameter_and_the_fix(
    cloud_dp: CloudDP, naive: str
) -> None:
    # A naive value could be UTC (the storage SDK's reading) or local time (Python's): refused.
    now = datetime.now(UTC)
    window = {"start": now - timedelta(minutes=15), "expiry": now + timedelta(hours=1)}
    window[naive] = window[naive].replace(tzinfo=None)
    with pytest.raises(ValueError, match=rf"{naive}=\S+ is a naive datetime") as excinfo:
        cloud_dp.signed_url(PACKAGE, 1, "setup.exe", **window)
    assert "datetime.now(UTC)" in str(excinfo.value)
    assert f"{naive}.replace(tzinfo=UTC)" in str(excinfo.value)


def test_a_gateway_whose_clock_reports_another_zone_mints_and_logs_utc(
    cloud_dp: CloudDP, storage: requests.Session
) -> None:
    # The gateway's clock reports UTC-7 (same instant): the SAS and the service log carry the
    # UTC instant, and storage serves the SAS.
    cloud_dp.distribute(PACKAGE, 1, PAYLOAD)
    clock = FakeClock(datetime.now(UTC).astimezone(timezone(timedelta(hours=-7))))
    with FakeCMG(cloud_dp=cloud_dp, clock=clock) as gateway, gateway_session(gateway) as session:
        manifest = manifest_of(session, gateway)
        now = clock.now()
        for item in manifest.files:
            assert item.url is not None
            query = sas_query(item.url)
            assert query["st"] == sas_text(now - timedelta(minutes=15))
            assert query["se"] == sas_text(now + gateway.sas_lifetime)
            assert storage.get(item.url, timeout=10).status_code == 200
        se = sas_query(manifest.files[0].url or "")["se"]
        assert any(f"SAS valid until {se}" in line for line in gateway.service_lines), (
            gateway.service_lines
        )
        gateway.check()


# --- row 31: the engine refuses a CMG certificate for another host, or expired ----------------


def engine_for(gateway: FakeCMG, folder: Path, client_id: str, auth: str) -> TaskSequenceEngine:
    """A client engine that trusts the CA that signed ``gateway``'s certificate."""
    return build_engine(connection_for(gateway, client_id, auth), folder)


def chain_text(error: BaseException | None) -> str:
    """Every message along an exception's causes (and urllib3's ``reason``), for the cause."""
    seen: list[str] = []
    pending = [error]
    for _ in range(32):  # bounded: exception chains are short, and may loop
        if not pending:
            break
        current = pending.pop()
        if current is None:
            continue
        seen.append(f"{type(current).__name__}: {current}")
        reason = getattr(current, "reason", None)
        pending += [current.__cause__, current.__context__]
        pending += [reason] if isinstance(reason, BaseException) else []
        pending += [a for a in current.args if isinstance(a, BaseException)]
    return "\n".join(seen)


#: Why the client's TLS layer refuses each kind (OpenSSL's verify messages).
REFUSALS = {
    "wrong-host": "IP address mismatch, certificate is not valid for '127.0.0.1'",
    "expired": "certificate has expired",
}


@pytest.mark.parametrize("auth", ["token", "azure_ad"])
@pytest.mark.parametrize("kind", SERVER_CERTIFICATES)
def test_engine_refuses_a_cmg_certificate_for_another_host_or_expired_before_any_token(
    cloud_dp: CloudDP, tmp_path: Path, kind: str, auth: str
) -> None:
    # reliability.md 31. The certificate is signed by the CA the client trusts in every case,
    # so "valid" (the control) runs the task sequence and the other two can only fail on the
    # name or the date.
    cloud_dp.distribute(PACKAGE, 1, PAYLOAD)
    client_id = f"GUID:wary-{kind}-{auth}"
    with FakeCMG(cloud_dp=cloud_dp, server_certificate=kind) as gateway:
        engine = engine_for(gateway, tmp_path, client_id, auth)
        try:
            result = engine.run(ONE_STEP)
        finally:
            engine.close()
        gateway.check()
        if kind == "valid":
            assert result.succeeded, result.error
            [location] = gateway.log.matching("location")
            assert location.client_id == client_id
            return
        assert result.exit_code == codes.NO_LOCATIONS
        assert "SSLError" in str(result.error)
        # OpenSSL's reason is in the error's own text, not only deep in its chain.
        assert REFUSALS[kind].split(",")[0] in str(result.error), str(result.error)
        assert REFUSALS[kind] in chain_text(result.error), chain_text(result.error)
        # Nothing reached the gateway: no location request, and no CCM_STS for the Azure AD
        # token either; the only trace is the handshake it saw refused.
        gateway.log.assert_no_requests()
        deadline = time.monotonic() + 5
        while not any("TLS handshake" in line for line in gateway.service_lines):
            assert time.monotonic() < deadline, gateway.service_lines
            time.sleep(0.05)
        assert not any("Issued" in line for line in gateway.service_lines)
        assert "Bearer" not in engine.log.path.read_text(encoding="utf-8")


def served_certificate(gateway: FakeCMG, *, check_hostname: bool) -> x509.Certificate:
    """The certificate the gateway presents, read by a client that trusts its CA."""
    context = ssl.create_default_context(cafile=str(gateway.ca_pem))
    context.check_hostname = check_hostname
    with (
        socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=gateway.hostname) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def gateway_certificate_file(gateway: FakeCMG) -> x509.Certificate:
    """The certificate the gateway presents, from its file (a verifying client cannot read
    an expired one)."""
    return x509.load_pem_x509_certificate(gateway.tls.server.cert.read_bytes())


def test_the_defective_server_certificates_have_only_their_defect() -> None:
    # What row 31's refusals rest on: a trusted signature, and exactly one thing wrong.
    with FakeCMG(server_certificate="wrong-host") as gateway:
        # Without the name check the handshake passes: the name is the only defect.
        cert = served_certificate(gateway, check_hostname=False)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [WRONG_SERVER_NAME]
        assert names.get_values_for_type(x509.IPAddress) == []
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            served_certificate(gateway, check_hostname=True)
        cert.verify_directly_issued_by(gateway.tls.server_ca.certificate)
    with FakeCMG(server_certificate="expired") as gateway:
        cert = gateway_certificate_file(gateway)
        assert cert.not_valid_after_utc < datetime.now(UTC)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert gateway.hostname in names.get_values_for_type(x509.DNSName)
        cert.verify_directly_issued_by(gateway.tls.server_ca.certificate)
        with pytest.raises(ssl.SSLCertVerificationError, match="certificate has expired"):
            served_certificate(gateway, check_hostname=True)
    with FakeCMG() as gateway:
        cert = served_certificate(gateway, check_hostname=True)
        assert cert.not_valid_after_utc > datetime.now(UTC)


def test_an_unknown_server_certificate_kind_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'revoked'.*valid, wrong-host, expired"):
        FakeCMG(server_certificate="revoked")


# --- row 33: an expired bulk registration token ----------------------------------------------


def test_an_expired_bulk_token_registers_no_one() -> None:
    # reliability.md 33: a bulk registration token works until the end of its lifetime (4,320
    # minutes by default) and is refused from then on, 401 as every other token refusal, with
    # no client token issued. Time moves on a FakeClock.
    clock = FakeClock(datetime(2024, 5, 1, 8, 0, tzinfo=UTC))
    with FakeCMG(clock=clock) as gateway, gateway_session(gateway) as session:
        bulk = gateway.authority.issue_bulk_token()
        headers = {"Authorization": f"Bearer {bulk}"}
        clock.advance(BULK_TOKEN_LIFETIME - timedelta(seconds=1))
        early = session.post(sts_url(gateway), data=b"GUID:early", headers=headers, timeout=10)
        assert early.status_code == 200
        assert claims_of(early.text)["UniqueId"] == "GUID:early"

        clock.advance(1)
        late = session.post(sts_url(gateway), data=b"GUID:late", headers=headers, timeout=10)
        assert (late.status_code, late.reason) == (401, INVALID_TOKEN)
        assert late.content == b""
        refused = gateway.log.entries[-1]
        assert (refused.endpoint, refused.status, refused.client_id) == ("sts", 401, "")
        assert "IDX10223" in refused.detail  # expired, not some other rule
        assert not any("GUID:late" in line for line in gateway.service_lines)
        assert sum("Issued CCM token" in line for line in gateway.service_lines) == 1

        # The client registered in time keeps its own token: only registration needs the bulk one.
        located = session.request(
            "CCM_POST",
            gateway.location_url,
            data=encode_message(CcmMessage(body=ContentLocationRequest(PACKAGE, 1, gateway.site_code).to_xml())),
            headers={"Content-Type": CCM_CONTENT_TYPE, "Authorization": f"Bearer {early.text}"},
            timeout=10,
        )
        assert located.status_code == 200
        assert gateway.log.entries[-1].client_id == "GUID:early"
        gateway.check()


def test_a_bulk_token_with_a_short_lifetime_expires_at_its_own_end() -> None:
    # The lifetime the administrator chose, not the default, decides.
    clock = FakeClock(datetime(2024, 5, 1, 8, 0, tzinfo=UTC))
    with FakeCMG(clock=clock) as gateway, gateway_session(gateway) as session:
        bulk = gateway.authority.issue_bulk_token(lifetime=dt.timedelta(minutes=60))
        headers = {"Authorization": f"Bearer {bulk}"}
        clock.advance(dt.timedelta(minutes=60))
        late = session.post(sts_url(gateway), data=b"GUID:hour", headers=headers, timeout=10)
        assert (late.status_code, late.reason) == (401, INVALID_TOKEN)
        assert "IDX10223" in gateway.log.entries[-1].detail
        assert not any("Issued CCM token" in line for line in gateway.service_lines)
