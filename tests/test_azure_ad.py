"""Azure AD client authentication through the fake CMG (protocol.md section 2, reliability.md 33).

A fake tenant signs device tokens (RS256, ``kid``) for ``https://ConfigMgrService``. The CMG
accepts them on the ServerAuth paths: directly on the location path, and at CCM_STS in exchange
for a CCM token (what an Azure AD-joined client does before every other request). Every refusal
is ``401 CMGService_Invalid_Token`` with Microsoft.IdentityModel's reason in the service log.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from xml.etree import ElementTree as ET

import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import rsa

from pytest_cmg import (
    CMGConnection,
    FakeClock,
    FakeCMG,
    Step,
    TaskSequence,
)
from pytest_cmg._client.factory import build_engine, connection_for
from pytest_cmg._gateway.tokens import (
    AAD_CLOCK_SKEW,
    AAD_RESOURCE,
    INVALID_TOKEN,
    AzureADDirectory,
    AzureADTenant,
    TokenRejected,
    is_azure_ad_token,
)
from pytest_cmg._protocol import codes
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, decode_message, encode_message
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest
from pytest_cmg._protocol.paths import aad_auth_info_path, sts_path

CLIENT = "GUID:aad-client"
PACKAGE = "PS100041"
PAYLOAD = {"drivers/net.inf": b"[Version]\r\n" * 100, "drivers/net.sys": b"\x00" * 8192}
ONE_STEP = TaskSequence(
    PACKAGE, "Azure AD", (Step("Apply drivers", "apply_driver_package", PACKAGE),)
)


@pytest.fixture
def distributed(cloud_dp):
    return cloud_dp.distribute(PACKAGE, 1, PAYLOAD)


@pytest.fixture
def web(cmg):
    session = requests.Session()
    session.trust_env = False
    session.verify = str(cmg.ca_pem)
    yield session
    session.close()


def locate(session, gateway, token):
    request = ContentLocationRequest(PACKAGE, 1, gateway.site_code)
    return session.request(
        "CCM_POST",
        gateway.location_url,
        data=encode_message(CcmMessage(body=request.to_xml())),
        headers={"Content-Type": CCM_CONTENT_TYPE, "Authorization": f"Bearer {token}"},
        timeout=10,
    )


def exchange(session, gateway, token, body=b""):
    return session.post(
        gateway.url + sts_path(gateway.role_id),
        data=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def claims_of(jwt):
    payload = jwt.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def aad_engine(gateway, folder, cmg_time, aad_token, client_id=CLIENT):
    connection = connection_for(gateway, client_id, "azure_ad", aad_token=aad_token)
    return build_engine(connection, folder, retry=cmg_time.policy())


# --- the accepted paths ---------------------------------------------------------------------


def test_engine_exchanges_its_azure_ad_token_and_downloads(cmg, distributed, tmp_path, cmg_time):
    aad = cmg.issue_aad_token(CLIENT)
    engine = aad_engine(cmg, tmp_path, cmg_time, aad)
    try:
        result = engine.run(ONE_STEP)
    finally:
        engine.close()
    assert result.succeeded, result.error
    assert result.bytes_from_storage(PACKAGE) == sum(map(len, PAYLOAD.values()))
    sts, location, manifest = cmg.log.entries
    assert (sts.endpoint, sts.status, sts.auth, sts.client_id) == ("sts", 200, "azure_ad", CLIENT)
    # After the exchange the client appends its CCM token, as the product does (CcmTokenAuth=1).
    assert (location.endpoint, location.auth, location.client_id) == ("location", "token", CLIENT)
    assert manifest.endpoint == "manifest"
    lines = cmg.service_lines
    assert any("Validated AAD token. TokenType: Device" in ln for ln in lines)
    assert any(f"Created SCCM token, token type: Device, deviceId: {CLIENT}" in ln for ln in lines)
    messages = engine.log.messages
    assert f"ClientIDManagerStartup: Getting CCM Token from {cmg.url}{sts_path(cmg.role_id)}" in (
        messages
    )
    # The Azure AD token and the CCM token (JWTs start "eyJ") never reach the client's log.
    written = engine.log.path.read_text(encoding="utf-8")
    assert "Cached encrypted token for 'S-1-5-18'." in written
    assert aad not in written
    assert "eyJ" not in written


def test_azure_ad_token_is_accepted_on_the_location_path(web, cmg, distributed):
    response = locate(web, cmg, cmg.issue_aad_token(CLIENT))
    assert response.status_code == 200
    reply = ContentLocationReply.from_xml(decode_message(response.content).body)
    [record] = reply.records
    assert record.access_token.tid == CLIENT  # the content token names the registered client
    [entry] = cmg.log.entries
    assert (entry.auth, entry.client_id) == ("azure_ad", CLIENT)


def test_the_ccm_token_from_the_exchange_names_the_registered_client(web, cmg):
    issued = exchange(web, cmg, cmg.issue_aad_token(CLIENT))
    assert issued.status_code == 200
    assert issued.headers["Content-Type"] == "application/jwt"
    claims = claims_of(issued.text)
    assert claims["UniqueId"] == CLIENT
    assert claims["iss"] == cmg.authority.issuer  # a site token, not the Azure AD one
    assert not is_azure_ad_token(issued.text)


def test_unregistered_device_registers_at_ccm_sts_only(web, cmg, distributed):
    device = cmg.tenant.device_id_of("GUID:new-device")
    token = cmg.tenant.issue_device_token(device)
    refused = locate(web, cmg, token)
    assert (refused.status_code, refused.reason) == (401, INVALID_TOKEN)
    assert "is not registered with the site" in cmg.log.entries[-1].detail
    assert exchange(web, cmg, token).status_code == 400  # registration names the client
    registered = exchange(web, cmg, token, b"GUID:new-device")
    assert registered.status_code == 200
    assert claims_of(registered.text)["UniqueId"] == "GUID:new-device"
    assert any("Registering device using AAD auth" in ln for ln in cmg.service_lines)
    assert locate(web, cmg, token).status_code == 200
    # Registered devices cannot ask for another client's token...
    other = exchange(web, cmg, token, b"GUID:someone-else")
    assert other.status_code == 403
    # ...and a second device cannot register as an existing client.
    intruder = cmg.tenant.issue_device_token(cmg.tenant.device_id_of("GUID:intruder"))
    taken = exchange(web, cmg, intruder, b"GUID:new-device")
    assert taken.status_code == 403
    assert "registered to another device" in cmg.log.entries[-1].detail


def test_aad_auth_info_answers_only_onboarded_enabled_tenants(web, cmg):
    known = web.get(cmg.url + aad_auth_info_path(cmg.tenant.tenant_id), timeout=10)
    assert known.status_code == 200
    assert known.headers["Content-Type"].startswith("text/xml")
    info = ET.fromstring(known.text)
    assert info.get("TenantID") == cmg.tenant.tenant_id
    assert info.get("AADCLIENTAPPID") == cmg.tenant.client_app_id
    assert info.get("AADRESOURCEURI") == AAD_RESOURCE
    unknown = web.get(
        cmg.url + aad_auth_info_path(AzureADTenant(clock=cmg.clock).tenant_id), timeout=10
    )
    assert unknown.status_code == 404
    assert unknown.content == b""
    cmg.azure_ad.disable(cmg.tenant.tenant_id)
    assert (
        web.get(cmg.url + aad_auth_info_path(cmg.tenant.tenant_id), timeout=10).status_code == 404
    )
    missing = web.get(cmg.url + "/CCM_Proxy_ServerAuth/AADAuthInfo", timeout=10)
    assert missing.status_code == 400
    assert [e.endpoint for e in cmg.log.entries] == ["aad_info"] * 4
    # Not published on the mutual-auth proxy.
    assert web.get(cmg.url + "/CCM_Proxy_MutualAuth/AADAuthInfo", timeout=10).status_code == 404


def test_clear_restores_the_tenants(cmg):
    extra = cmg.azure_ad.onboard()
    cmg.azure_ad.disable(cmg.tenant.tenant_id)
    cmg.clear()
    assert extra.tenant_id not in cmg.azure_ad.tenants
    assert cmg.azure_ad.auth_info(cmg.tenant.tenant_id) is cmg.tenant


# --- the refusal matrix (reliability.md 33) -------------------------------------------------


def _hours_ago(hours):
    return dt.datetime.now(dt.UTC) - dt.timedelta(hours=hours)


def _disabled_tenant(gateway):
    gateway.azure_ad.disable(gateway.tenant.tenant_id)
    return gateway.issue_aad_token(CLIENT)


def _unknown_tenant(gateway):
    stranger = AzureADTenant(clock=gateway.clock)
    return gateway.issue_aad_token(CLIENT, tenant=stranger)


def _bad_signature(gateway):
    impostor = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return gateway.issue_aad_token(CLIENT, signing_key=impostor)


def _tampered_claims(gateway):
    header, payload, signature = gateway.issue_aad_token(CLIENT).split(".")
    claims = claims_of("x." + payload + ".x")
    claims["deviceid"] = gateway.tenant.device_id_of("GUID:victim")
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


REFUSED = {
    "wrong_audience": (
        lambda g: g.issue_aad_token(CLIENT, audience="https://graph.microsoft.com"),
        "IDX10214",
    ),
    "disabled_tenant": (_disabled_tenant, "is disabled for this site"),
    "unknown_tenant": (_unknown_tenant, "is not onboarded to this site"),
    "expired": (
        lambda g: g.issue_aad_token(
            CLIENT, not_before=_hours_ago(2), lifetime=dt.timedelta(hours=1)
        ),
        "IDX10223: Lifetime validation failed. The token is expired.",
    ),
    "nbf_in_the_future": (
        lambda g: g.issue_aad_token(CLIENT, not_before=_hours_ago(-0.5)),
        "IDX10222: Lifetime validation failed. The token is not yet valid.",
    ),
    "alg_none": (lambda g: g.issue_aad_token(CLIENT, alg="none"), "IDX10504"),
    "bad_signature": (_bad_signature, "IDX10511: Signature validation failed"),
    "tampered_claims": (_tampered_claims, "IDX10511: Signature validation failed"),
    "unknown_kid": (lambda g: g.issue_aad_token(CLIENT, kid="not-a-published-kid"), "IDX10501"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
@pytest.mark.parametrize("endpoint", ["location", "sts"])
def test_refused_azure_ad_tokens_get_401_and_nothing_else(web, cmg, distributed, case, endpoint):
    make, rule = REFUSED[case]
    token = make(cmg)
    assert is_azure_ad_token(token)  # the AAD validator is the one refusing it
    response = locate(web, cmg, token) if endpoint == "location" else exchange(web, cmg, token)
    assert (response.status_code, response.reason) == (401, INVALID_TOKEN)
    assert response.content == b""
    [entry] = cmg.log.entries
    assert rule in entry.detail
    assert entry.detail.startswith("Azure AD token: ")
    assert entry.client_id == ""
    lines = cmg.service_lines
    assert any(INVALID_TOKEN in ln and rule in ln for ln in lines)
    # Neither a content location (and its access token) nor a CCM token was issued.
    assert not any("Content location for" in ln or "Issued CCM token" in ln for ln in lines)
    assert token not in "\n".join(lines) + repr(entry)


def test_clock_skew_of_five_minutes_is_tolerated_and_no_more(cloud_dp):
    cloud_dp.distribute(PACKAGE, 1, PAYLOAD)
    clock = FakeClock()
    with FakeCMG(cloud_dp=cloud_dp, clock=clock) as gateway:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(gateway.ca_pem)
        lifetime = dt.timedelta(hours=1)
        token = gateway.issue_aad_token(CLIENT, lifetime=lifetime)
        early = gateway.issue_aad_token(CLIENT, not_before=clock.now() + AAD_CLOCK_SKEW)
        assert locate(session, gateway, early).status_code == 200  # nbf within the skew
        clock.advance(lifetime + AAD_CLOCK_SKEW - dt.timedelta(seconds=1))
        assert locate(session, gateway, token).status_code == 200
        clock.advance(1)
        expired = locate(session, gateway, token)
        assert (expired.status_code, expired.reason) == (401, INVALID_TOKEN)
        assert "IDX10223" in gateway.log.entries[-1].detail
        session.close()


def test_rotated_keys_validate_until_retired(web, cmg, distributed):
    tenant = cmg.azure_ad.onboard()  # clear() forgets it after the test
    old_kid = tenant.kid
    before = cmg.issue_aad_token(CLIENT, tenant=tenant)
    new_kid = tenant.rotate_key()
    after = cmg.issue_aad_token(CLIENT, tenant=tenant)
    assert json.loads(base64.urlsafe_b64decode(after.split(".")[0] + "==")).get("kid") == new_kid
    assert locate(web, cmg, before).status_code == 200
    assert locate(web, cmg, after).status_code == 200
    tenant.retire_key(old_kid)
    refused = locate(web, cmg, before)
    assert refused.status_code == 401
    assert f"kid: '{old_kid}'" in cmg.log.entries[-1].detail
    assert locate(web, cmg, after).status_code == 200


def test_engine_with_a_refused_azure_ad_token_fails_with_no_location(
    cmg, distributed, tmp_path, cmg_time
):
    cmg.azure_ad.disable(cmg.tenant.tenant_id)
    engine = aad_engine(cmg, tmp_path, cmg_time, cmg.issue_aad_token(CLIENT))
    try:
        result = engine.run(ONE_STEP)
    finally:
        engine.close()
    assert result.exit_code == codes.NO_LOCATIONS
    assert "CCM token request answered 401" in str(result.error)
    assert cmg.log.count("location") == 0
    assert cmg.log.count("manifest") == 0
    assert (
        "ClientIDManagerStartup: Failed to get CCM token. StatusCode=401 StatusText=CMGService_Invalid_Token"
        in (engine.log.messages)
    )


def test_connection_needs_one_way_to_authenticate(cmg):
    with pytest.raises(ValueError, match="neither a token, an Azure AD token nor a client"):
        CMGConnection(cmg.url, cmg.ca_pem, cmg.site_code, cmg.role_id, CLIENT)
    aad = CMGConnection(cmg.url, cmg.ca_pem, cmg.site_code, cmg.role_id, CLIENT, aad_token="x")
    assert aad.location_url.endswith("/ccm_system_tokenauth/request")
    assert aad.sts_url == cmg.url + sts_path(cmg.role_id)


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("a.b", "IDX12741: JWT must have three segments (2 segments, not 3)"),
        ("a.b.c.d", "IDX12741: JWT must have three segments (4 segments, not 3)"),
        ("!!!!.@@@@.####", "IDX12729: Unable to decode the token (JWT header"),
    ],
)
def test_a_token_that_is_no_jwt_is_refused_in_identitymodel_words(token, reason):
    # The site's verifier words the same refusals its own way (tests/test_protocol.py); the
    # Azure AD one must keep Microsoft.IdentityModel's codes for its half of them.
    directory = AzureADDirectory(clock=FakeClock())
    with pytest.raises(TokenRejected) as refused:
        directory.verify(token)
    assert refused.value.reason.startswith(reason)
