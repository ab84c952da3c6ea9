"""SAS lifecycle and hostile input against the running gateway and real Azurite.

reliability.md tests 22-28 (SAS) and 35-37 (input hardening, content authorization, no
credentials in answers).
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import pytest
import requests

from pytest_cmg import FakeClock, FakeCMG
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, decode_message, encode_message
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest
from pytest_cmg._protocol.manifest import ContentManifest
from pytest_cmg._protocol.paths import TOKEN_SIGNATURE_HEADER
from pytest_cmg._storage.endpoint import DEV_ACCOUNT_KEY

CLIENT = "GUID:sas-client"


def session_for(gateway):
    session = requests.Session()
    session.trust_env = False
    session.verify = str(gateway.ca_pem)
    return session


def post_location(session, gateway, body: bytes):
    return session.request(
        "CCM_POST",
        gateway.location_url,
        data=body,
        headers={
            "Content-Type": CCM_CONTENT_TYPE,
            "Authorization": f"Bearer {gateway.issue_token(CLIENT)}",
        },
        timeout=10,
    )


def locate(session, gateway, package_id, version=1):
    request = ContentLocationRequest(package_id, version, gateway.site_code)
    response = post_location(session, gateway, encode_message(CcmMessage(body=request.to_xml())))
    assert response.status_code == 200
    return ContentLocationReply.from_xml(decode_message(response.content).body)


def manifest_response(session, reply, **override):
    record = reply.records[0]
    token = record.access_token
    params = {"tid": token.tid, "iss": token.iss, "alg": token.alg, "st": token.st, "et": token.et}
    url = record.url
    if "pid" in override:
        url = url.replace("pid=PS100012", f"pid={override.pop('pid')}")
    return session.get(
        url, params={**params, **override},
        headers={TOKEN_SIGNATURE_HEADER: token.signature}, timeout=10,
    )


def manifest_of(session, gateway, package_id="PS100012"):
    reply = locate(session, gateway, package_id)
    response = manifest_response(session, reply)
    assert response.status_code == 200
    return ContentManifest.from_xml(response.text)


def with_query(url: str, **changes: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return urlunsplit(parts._replace(query=urlencode(query)))


@pytest.fixture
def files(cloud_dp):
    return cloud_dp.distribute(
        "PS100012", 1,
        {"a.bin": b"A" * 4096, "b.bin": b"B" * 4096, "sub/ファイル.txt": b"japanese name"},
    )


@pytest.fixture
def http(cmg):
    session = session_for(cmg)
    yield session
    session.close()


def test_every_minted_sas_is_blob_scoped_read_only_and_short_lived(http, cmg, files):
    # reliability.md 26: a property of every SAS the CMG mints.
    for _ in range(3):
        manifest = manifest_of(http, cmg)
        now = cmg.clock.now()
        for item in manifest.files:
            url = urlsplit(item.url)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            assert query["sr"] == "b"
            assert query["sp"] == "r"
            assert "sip" not in query
            assert "ss" not in query and "srt" not in query  # never an account SAS
            assert query["se"].endswith("Z") and query["st"].endswith("Z")
            assert query["spr"] in ("https", "https,http")
            expiry = datetime.strptime(query["se"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=now.tzinfo)
            assert expiry - now <= cmg.sas_lifetime + timedelta(seconds=1)
            # The signed path is the file's own blob.
            assert requests.utils.unquote(url.path).endswith(f"/PS100012.1/{item.relpath}")


@pytest.mark.parametrize(
    "change",
    [
        {"se": "2099-01-01T00:00:00Z"},  # expiry edited without re-signing
        {"sp": "rw"},
        {"sr": "c"},
        {"sig": "AAAA" + "A" * 40},
    ],
    ids=["se", "sp", "sr", "sig"],
)
def test_tampered_sas_fields_are_refused_by_storage(http, cmg, files, change):
    # reliability.md 23: Azurite enforces the signature over every field.
    item = manifest_of(http, cmg).files[0]
    assert requests.get(item.url, timeout=10).status_code == 200
    assert requests.get(with_query(item.url, **change), timeout=10).status_code == 403


def test_sas_for_one_blob_does_not_open_another(http, cmg, files):
    first, second = manifest_of(http, cmg).files[:2]
    swapped = urlunsplit(urlsplit(second.url)._replace(query=urlsplit(first.url).query))
    assert requests.get(swapped, timeout=10).status_code == 403


def test_sas_start_is_back_dated_for_a_client_clock_behind(cloud_dp, files):
    # reliability.md 22: a gateway clock 10 minutes ahead of storage still mints usable SAS,
    # because st is back-dated 15 minutes; one an hour ahead mints SAS that are not yet valid.
    for ahead, expected in ((timedelta(minutes=10), 200), (timedelta(hours=1), 403)):
        clock = FakeClock()
        clock.advance(ahead)
        with FakeCMG(cloud_dp=cloud_dp, clock=clock) as gateway:
            session = session_for(gateway)
            item = manifest_of(session, gateway).files[0]
            assert requests.get(item.url, timeout=10).status_code == expected, ahead


def raw_sas_url(cloud_dp, **options):
    """A SAS URL signed here, not by the gateway, to probe what Azurite itself enforces."""
    from azure.storage.blob import BlobSasPermissions, generate_blob_sas

    sas = generate_blob_sas(
        account_name=cloud_dp.endpoint.account_name,
        container_name=cloud_dp.container,
        blob_name=cloud_dp.blob_name("PS100012", 1, "a.bin"),
        account_key=cloud_dp.endpoint.account_key,
        permission=BlobSasPermissions(read=True),
        expiry=FakeClock().now() + timedelta(minutes=5),
        **options,
    )
    return f"{cloud_dp.blob_url('PS100012', 1, 'a.bin')}?{sas}"


def test_https_only_sas_is_refused_over_plain_http(cloud_dp, files):
    # reliability.md 25, and why CloudDP signs "https,http" when storage is plain HTTP: a
    # spr=https SAS used over http is refused (AuthorizationProtocolMismatch).
    response = requests.get(raw_sas_url(cloud_dp, protocol="https"), timeout=10)
    assert response.status_code == 403
    assert response.headers.get("x-ms-error-code") == "AuthorizationProtocolMismatch"


@pytest.mark.xfail(
    strict=True,
    reason="Azurite 3.37 does not enforce sip (validateIPRange returns true); reliability.md 24",
)
def test_sas_restricted_to_another_ip_is_refused_by_storage(cloud_dp, files):
    # What Azure does: a SAS with sip=10.1.2.3 used from 127.0.0.1 is refused with 403
    # AuthorizationSourceIPMismatch. Azurite accepts it, so this test fails (xfail); strict, so
    # the day Azurite enforces sip the suite says so and the emulation notes must change.
    response = requests.get(raw_sas_url(cloud_dp, ip="10.1.2.3"), timeout=10)
    assert response.status_code == 403
    assert response.headers.get("x-ms-error-code") == "AuthorizationSourceIPMismatch"


def test_sip_is_still_signed_so_it_cannot_be_removed_or_edited(cloud_dp, files):
    # The other half of reliability.md 24: sip is inside the string-to-sign, so even Azurite
    # refuses a SAS whose sip was edited. The gateway never mints sip (see the property test).
    url = raw_sas_url(cloud_dp, ip="10.1.2.3")
    assert requests.get(with_query(url, sip="127.0.0.1"), timeout=10).status_code == 403


# --- HTTPS storage (reliability.md C1, test 25) ----------------------------------------------


@pytest.fixture(scope="module")
def https_storage():
    """An Azurite of its own serving HTTPS (the harness's is plain HTTP, see azurite.py)."""
    from pytest_cmg._storage.azurite import AzuriteProcess

    with AzuriteProcess(https=True) as azurite:
        assert azurite.endpoint is not None
        yield azurite.endpoint


@pytest.fixture
def https_dp(https_storage):
    from pytest_cmg import CloudDP

    dp = CloudDP(https_storage, f"cmg-https-{uuid.uuid4().hex[:12]}")
    dp.create()
    dp.distribute("PS100012", 1, {"a.bin": b"A" * 4096, "b.bin": b"B" * 10})
    yield dp
    dp.delete()


def test_https_only_sas_is_served_over_https(https_dp):
    assert https_dp.endpoint.url.startswith("https://127.0.0.1:")
    assert https_dp.endpoint.ca_cert is not None
    url = raw_sas_url(https_dp, protocol="https")
    assert "spr=https&" in url or url.endswith("spr=https")
    with requests.Session() as storage:
        storage.trust_env = False
        response = storage.get(url, verify=str(https_dp.endpoint.ca_cert), timeout=10)
        assert response.status_code == 200
        assert response.content == b"A" * 4096
        # The storage CA is not one the system trusts: a client must be given it.
        with pytest.raises(requests.exceptions.SSLError):
            storage.get(url, timeout=10)


def test_gateway_mints_https_only_sas_for_https_storage(https_dp):
    with FakeCMG(cloud_dp=https_dp) as gateway:
        session = session_for(gateway)
        manifest = manifest_of(session, gateway)
        session.close()
    for item in manifest.files:
        query = parse_qs(urlsplit(item.url).query)
        assert query["spr"] == ["https"]
        assert item.url.startswith("https://")
        body = requests.get(item.url, verify=str(https_dp.endpoint.ca_cert), timeout=10)
        assert body.status_code == 200
        assert len(body.content) == item.size
        # The same SAS over plain HTTP is a protocol mismatch on Azure; Azurite serving HTTPS
        # only cannot even be reached over HTTP.
        with pytest.raises(requests.ConnectionError):
            requests.get(item.url.replace("https://", "http://", 1), timeout=10)


def test_measured_egress_falls_back_to_manifest_sizes_for_https_storage(https_dp):
    from pytest_cmg import CmgSettings

    with FakeCMG(cloud_dp=https_dp) as gateway:
        gateway.configure(settings=CmgSettings(measure_egress=True))
        session = session_for(gateway)
        manifest = manifest_of(session, gateway)
        session.close()
        assert all(item.url.startswith(https_dp.endpoint.url) for item in manifest.files)
        assert gateway.egress_bytes == manifest.total_size == 4106
        assert any("cannot be measured" in line for line in gateway.service_lines)


def test_a_public_container_is_refused(cloud_dp, files):
    # reliability.md 27: Azurite's public-access authenticator would pass any tampered SAS.
    container = cloud_dp._service.get_container_client(cloud_dp.container)
    container.set_container_access_policy(signed_identifiers={}, public_access="blob")
    with pytest.raises(RuntimeError, match="allows public access"):
        cloud_dp.create()
    container.set_container_access_policy(signed_identifiers={}, public_access=None)
    cloud_dp.create()
    anonymous = requests.get(cloud_dp.blob_url("PS100012", 1, "a.bin"), timeout=10)
    assert anonymous.status_code in (403, 404)


def test_an_expired_sas_is_refused(http, cmg, files):
    cmg.fail("manifest", request=1, sas_ttl=-60)
    item = manifest_of(http, cmg).files[0]
    response = requests.get(item.url, timeout=10)
    assert response.status_code == 403


HOSTILE_BODIES = {
    "xxe": '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<ContentLocationRequest><Package ID="&x;" Version="1"/></ContentLocationRequest>',
    "billion-laughs": '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 10}">' for i in range(8))
    + ']><ContentLocationRequest><Package ID="&i;" Version="1"/></ContentLocationRequest>',
    "not-xml": "<ContentLocationRequest><Package",
    "wrong-root": "<PolicyRequest/>",
    "no-package": '<ContentLocationRequest><AssignedSite SiteCode="PS1"/></ContentLocationRequest>',
    "bad-version": '<ContentLocationRequest><Package ID="PS100012" Version="1 OR 1=1"/>'
    '<AssignedSite SiteCode="PS1"/><ClientLocationInfo/></ContentLocationRequest>',
}


@pytest.mark.parametrize("name", list(HOSTILE_BODIES))
def test_hostile_location_requests_get_4xx_never_5xx(http, cmg, files, name):
    # reliability.md 35.
    body = encode_message(CcmMessage(body=HOSTILE_BODIES[name]))
    response = post_location(http, cmg, body)
    assert response.status_code == 400
    assert response.content == b""  # nothing of the input is echoed
    cmg.check()  # and no handler error was swallowed


@pytest.mark.parametrize(
    "package_id",
    [
        "PS1'; DROP TABLE Packages;--",
        "A" * 20_000,
        "PS10001\x00",
        "\uff30\uff33\uff11\uff10\uff10\uff10\uff11\uff12",  # full-width PS100012
    ],
    ids=["sql", "over-long", "nul", "fullwidth"],
)
def test_odd_package_ids_get_an_empty_reply_not_an_error(http, cmg, files, package_id):
    request = ContentLocationRequest(package_id.replace("\x00", ""), 1, cmg.site_code)
    response = post_location(http, cmg, encode_message(CcmMessage(body=request.to_xml())))
    assert response.status_code == 200
    reply = ContentLocationReply.from_xml(decode_message(response.content).body)
    assert reply.records == ()
    cmg.check()


def test_a_manifest_for_another_package_than_the_token_is_refused(http, cmg, cloud_dp, files):
    # reliability.md 36: the access token is bound to its package.
    cloud_dp.distribute("PS100013", 1, {"other.bin": b"secret"})
    reply = locate(http, cmg, "PS100012")
    response = manifest_response(http, reply, pid="PS100013")
    assert response.status_code == 401
    assert response.reason == "CMGService_Invalid_Token"


def test_content_removed_after_location_gets_404(http, cmg, cloud_dp, files):
    reply = locate(http, cmg, "PS100012")
    cloud_dp.delete()
    cloud_dp.create()
    assert manifest_response(http, reply).status_code == 404


def test_no_account_key_or_wide_sas_in_any_answer(http, cmg, files):
    # reliability.md 37: answers carry per-blob SAS only, never the storage account's key.
    reply = locate(http, cmg, "PS100012")
    manifest = manifest_response(http, reply)
    for text in (reply.to_xml(), manifest.text, *cmg.service_lines):
        assert DEV_ACCOUNT_KEY not in text
        assert "sr=c" not in text and "srt=" not in text
    for entry in cmg.log.entries:
        assert "sig" not in str(entry.query)
