"""The fake CMG over real HTTPS on loopback, in front of a real Azurite cloud DP."""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlsplit

import pytest
import requests

from pytest_cmg import CmgSettings, FakeCMG, GatewayError, NotRunningError
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, decode_message, encode_message
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest
from pytest_cmg._protocol.manifest import ContentManifest
from pytest_cmg._protocol.paths import TOKEN_SIGNATURE_HEADER

CLIENT = "GUID:test-client"


@pytest.fixture
def http(cmg):
    session = requests.Session()
    session.trust_env = False
    session.verify = str(cmg.ca_pem)
    yield session
    session.close()


def locate(http, cmg, package_id, version=1, *, token=None, use_azure=True, body=None):
    request = ContentLocationRequest(package_id, version, cmg.site_code, use_azure=use_azure)
    data = body if body is not None else encode_message(CcmMessage(body=request.to_xml()))
    headers = {"Content-Type": CCM_CONTENT_TYPE}
    if token is not False:
        headers["Authorization"] = f"Bearer {token or cmg.issue_token(CLIENT)}"
    return http.request("CCM_POST", cmg.location_url, data=data, headers=headers, timeout=10)


def manifest_for(http, reply):
    record = reply.records[0]
    token = record.access_token
    params = {"tid": token.tid, "iss": token.iss, "alg": token.alg, "st": token.st, "et": token.et}
    return http.get(
        record.url, params=params, headers={TOKEN_SIGNATURE_HEADER: token.signature}, timeout=10
    )


@pytest.fixture
def distributed(cloud_dp):
    return cloud_dp.distribute(
        "PS100012", 2, {"sources/install.wim": b"W" * 300_000, "日本語/セットアップ.txt": b"hello"}
    )


def test_location_reply_through_token_path_leads_to_a_manifest_with_sas_urls(
    http, cmg, distributed
):
    response = locate(http, cmg, "PS100012", 2)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == CCM_CONTENT_TYPE
    reply = ContentLocationReply.from_xml(decode_message(response.content).body)
    assert reply.package_hash == distributed.hash
    [record] = reply.records
    assert record.dp_type == "CLOUD"
    assert record.server_remote_name == cmg.hostname
    assert "/downloadrestservice.svc/getcontentxmlsecure?pid=PS100012" in record.url

    answer = manifest_for(http, reply)
    assert answer.status_code == 200
    manifest = ContentManifest.from_xml(answer.text)
    assert manifest.hash == distributed.hash
    assert {f.relpath for f in manifest.files} == {"sources/install.wim", "日本語/セットアップ.txt"}
    for item in manifest.files:
        blob = requests.get(item.url, timeout=10)
        assert blob.status_code == 200
        assert len(blob.content) == item.size
    cmg.log.assert_request_made("location", count=1, status=200, package_id="PS100012")
    cmg.log.assert_request_made("manifest", count=1, status=200, package_id="PS100012")


def test_sas_urls_are_blob_scoped_read_only_and_short_lived(http, cmg, cloud_dp, distributed):
    reply = ContentLocationReply.from_xml(
        decode_message(locate(http, cmg, "PS100012", 2).content).body
    )
    manifest = ContentManifest.from_xml(manifest_for(http, reply).text)
    first, second = sorted(manifest.files, key=lambda f: f.relpath)
    query = parse_qs(urlsplit(first.url).query)
    assert query["sr"] == ["b"]
    assert query["sp"] == ["r"]
    assert "sip" not in query
    # The signature of one blob does not open another.
    other = urlsplit(second.url)._replace(query=urlsplit(first.url).query).geturl()
    assert requests.get(other, timeout=10).status_code == 403
    # Read-only: a write with the same SAS is refused.
    put = requests.put(
        first.url, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}, timeout=10
    )
    assert put.status_code == 403
    # The container stays private: the same blob without SAS is refused.
    assert requests.get(first.url.split("?")[0], timeout=10).status_code in (403, 404)


def test_unknown_package_gets_the_empty_fallback_reply(http, cmg, distributed):
    response = locate(http, cmg, "PS1000FF", 1)
    assert response.status_code == 200
    body = decode_message(response.content).body
    assert 'SiteLocality="FALLBACK"' in body
    assert ContentLocationReply.from_xml(body).records == ()


def test_stale_version_gets_no_location(http, cmg, distributed):
    reply = ContentLocationReply.from_xml(
        decode_message(locate(http, cmg, "PS100012", 1).content).body
    )
    assert reply.records == ()


def test_content_disabled_cmg_and_client_without_cloud_dp_get_no_location(
    http, cmg, distributed
):
    no_azure = locate(http, cmg, "PS100012", 2, use_azure=False)
    assert ContentLocationReply.from_xml(decode_message(no_azure.content).body).records == ()
    cmg.configure(settings=CmgSettings(content_enabled=False))
    disabled = locate(http, cmg, "PS100012", 2)
    assert ContentLocationReply.from_xml(decode_message(disabled.content).body).records == ()
    assert any("does not serve content" in line for line in cmg.service_lines)


@pytest.mark.parametrize(
    ("token", "rule"),
    [
        (False, "no bearer token"),
        ("not-a-jwt", "three-part"),
        ("e30.e30.", "alg"),  # {} header: no RS256
    ],
)
def test_bad_tokens_are_refused_with_the_product_status(http, cmg, distributed, token, rule):
    response = locate(http, cmg, "PS100012", 2, token=token)
    assert response.status_code == 401
    assert response.reason == "CMGService_Invalid_Token"
    [entry] = cmg.log.entries
    assert rule in entry.detail


def test_token_of_another_site_is_refused(http, cmg, distributed):
    other = FakeCMG().authority.issue_ccm_token(CLIENT)
    response = locate(http, cmg, "PS100012", 2, token=other)
    assert response.status_code == 401
    assert "signature" in cmg.log.entries[0].detail


def test_unpublished_paths_are_refused_before_processing(http, cmg):
    for method, path in [
        ("GET", "/CCM_Proxy_ServerAuth/72057594037927939/ccm_system/request"),
        ("CCM_POST", "/CCM_Proxy_ServerAuth/72057594037927939/ccm_system/request"),
        ("GET", "/SMS_DP_SMSPKG$/Content_1"),
        ("PROPFIND", "/downloadrestservice.svc/getcontentxmlsecure"),
        ("GET", "/CCM_Proxy_ServerAuth/../../etc/passwd"),
    ]:
        response = http.request(method, cmg.url + path, timeout=10)
        assert response.status_code == 404, (method, path)
    assert cmg.log.count(None) == 5
    assert all(e.endpoint is None for e in cmg.log.entries)


def test_over_long_location_body_is_refused(http, cmg):
    response = locate(http, cmg, "PS100012", body=b"x" * (64 * 1024 + 1))
    assert response.status_code == 413


def test_malformed_envelope_is_a_bad_request(http, cmg):
    response = locate(http, cmg, "PS100012", body=b"--not multipart--")
    assert response.status_code == 400
    assert "CCM message" in cmg.log.entries[0].detail


def test_manifest_without_token_signature_is_refused(http, cmg, distributed):
    reply = ContentLocationReply.from_xml(
        decode_message(locate(http, cmg, "PS100012", 2).content).body
    )
    token = reply.records[0].access_token
    params = {"tid": token.tid, "iss": token.iss, "alg": token.alg, "st": token.st, "et": token.et}
    unsigned = http.get(reply.records[0].url, params=params, timeout=10)
    assert unsigned.status_code == 401
    tampered = http.get(
        reply.records[0].url,
        params={**params, "tid": "GUID:someone-else"},
        headers={TOKEN_SIGNATURE_HEADER: token.signature},
        timeout=10,
    )
    assert tampered.status_code == 401
    missing = http.get(reply.records[0].url, timeout=10)
    assert missing.status_code == 400


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_older_than_1_2_is_refused(cmg):
    context = ssl.create_default_context(cafile=str(cmg.ca_pem))
    context.minimum_version = ssl.TLSVersion.TLSv1
    context.maximum_version = ssl.TLSVersion.TLSv1_1
    import socket

    with socket.create_connection(("127.0.0.1", cmg.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLError):
            context.wrap_socket(raw, server_hostname="127.0.0.1")


def test_untrusted_client_does_not_connect(cmg):
    with pytest.raises(requests.exceptions.SSLError):
        session = requests.Session()
        session.trust_env = False
        session.get(cmg.url + "/", timeout=5, verify=True)


def test_missing_request_assertion_shows_the_closest_requests(http, cmg, distributed):
    locate(http, cmg, "PS100012", 2)
    with pytest.raises(AssertionError) as excinfo:
        cmg.log.assert_request_made("location", package_id="PS100013")
    text = str(excinfo.value)
    assert "expected at least 1 request(s) matching" in text
    assert "PS100012" in text  # what did arrive
    assert "Closest requests received (1 in all)" in text


def test_unexpected_requests_are_listed_when_none_were_expected(http, cmg, distributed):
    locate(http, cmg, "PS100012", 2)
    cmg.log.assert_no_requests("manifest")
    with pytest.raises(AssertionError, match=r"expected no request matching \{'endpoint': 'location'\}, found 1:\n  #1 CCM_POST"):
        cmg.log.assert_no_requests("location")


def test_handler_errors_are_reraised_in_the_test(http, cmg, distributed, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom in the gateway")

    monkeypatch.setattr(cmg, "locate", broken)
    response = locate(http, cmg, "PS100012", 2)
    assert response.status_code == 500
    with pytest.raises(GatewayError, match="boom in the gateway"):
        cmg.check()
    cmg.clear()  # the fixture's own check() must not fail this test a second time


def test_gateway_works_without_pytest_fixtures(cloud_dp):
    cloud_dp.distribute("PS100099", 1, {"a.txt": b"abc"})
    with FakeCMG(cloud_dp=cloud_dp) as gateway:
        session = requests.Session()
        session.trust_env = False
        session.verify = str(gateway.ca_pem)
        response = locate(session, gateway, "PS100099", 1)
        assert response.status_code == 200
        port = gateway.port
    # Every not-started misuse is NotRunningError (also a RuntimeError), not a GatewayError.
    with pytest.raises(NotRunningError, match="not started"):
        _ = gateway.url
    with pytest.raises(RuntimeError, match="not started"):
        _ = gateway.url
    assert port > 0


def test_clear_forgets_what_a_test_changed(cmg, cloud_dp):
    from pytest_cmg import DeploymentSettings, DownloadMode

    cmg.site_code = "XYZ"
    cmg.configure(
        settings=CmgSettings(content_enabled=False, site_version=1906),
        deployment=DeploymentSettings(download_mode=DownloadMode.ALL_BEFORE_START),
    )
    cmg.fail("location", status=503)
    cmg.stop_service()
    cmg.clear()
    assert cmg.site_code == "PS1"
    assert cmg.settings == CmgSettings()
    assert cmg.deployment == DeploymentSettings()
    assert cmg.faults.pending == []
    assert cmg.running
    assert len(cmg.log) == 0


# --- on-premises sources and record order (protocol.md 1.5) ----------------------------------


def reply_of(response):
    assert response.status_code == 200
    return ContentLocationReply.from_xml(decode_message(response.content).body)


def test_on_prem_records_come_first_and_the_cloud_last(http, cmg, distributed):
    cmg.add_on_prem_dp("PS1DP.contoso.test", distributed)
    cmg.add_on_prem_dp("PS2DP.contoso.test", distributed, locality="REMOTE", https=True)
    cmg.add_on_prem_dp("EMPTYDP.contoso.test")  # holds nothing: never listed
    body = decode_message(locate(http, cmg, "PS100012", 2).content).body
    reply = ContentLocationReply.from_xml(body)
    assert [(r.server_remote_name, r.dp_type, r.locality) for r in reply.records] == [
        ("PS1DP.contoso.test", "SERVER", "LOCAL"),
        ("PS2DP.contoso.test", "SERVER", "REMOTE"),
        (cmg.hostname, "CLOUD", "REMOTE"),
    ]
    local, remote, cloud = reply.records
    assert local.url == "http://PS1DP.contoso.test/SMS_DP_SMSPKG$/PS100012"
    assert local.signature_url == "http://PS1DP.contoso.test/SMS_DP_SMSSIG$/PS100012.2.tar"
    assert (local.ssl_state, remote.ssl_state, cloud.ssl_state) == (0, 1, 1)
    assert remote.url.startswith("https://PS2DP.contoso.test/")
    assert local.windows_trust and not cloud.windows_trust
    assert local.access_token is None and cloud.access_token is not None
    assert reply.package_hash == distributed.hash
    assert '<MPSite SiteCode="PS1" MasterSiteCode="PS1" SiteLocality="LOCAL"' in body
    assert "<ADSite Name=\"Default-First-Site-Name\" />" in body


def test_prefer_cloud_sources_puts_the_cloud_record_first(http, cmg, distributed):
    cmg.add_on_prem_dp("PS1DP.contoso.test", distributed)
    cmg.configure(settings=CmgSettings(prefer_cloud_sources=True))
    reply = reply_of(locate(http, cmg, "PS100012", 2))
    assert [r.dp_type for r in reply.records] == ["CLOUD", "SERVER"]


def test_content_only_on_prem_gets_on_prem_records_and_no_fallback(http, cmg, cloud_dp):
    from pytest_cmg import ContentManifest, ManifestFile

    on_prem_only = ContentManifest("PS100077", 1, (ManifestFile("a.txt", 3, "0" * 64),))
    cmg.add_on_prem_dp("PS1DP.contoso.test", on_prem_only)
    response = locate(http, cmg, "PS100077", 1)
    body = decode_message(response.content).body
    assert 'SiteLocality="FALLBACK"' not in body
    [record] = ContentLocationReply.from_xml(body).records
    assert record.dp_type == "SERVER"
    assert ContentLocationReply.from_xml(body).package_hash == on_prem_only.hash
    assert any("No cloud location for PS100077:1" in ln for ln in cmg.service_lines)
    assert not any("No content location" in ln for ln in cmg.service_lines)


def test_engine_skips_intranet_dps_and_downloads_from_the_cloud(cmg, cmg_client, distributed):
    from pytest_cmg import Step, TaskSequence

    cmg.add_on_prem_dp("PS1DP.contoso.test", distributed)
    cmg.add_on_prem_dp("PS2DP.contoso.test", distributed, locality="REMOTE")
    engine = cmg_client()
    sequence = TaskSequence(
        "PS100020", "On-prem first", (Step("Upgrade", "upgrade_os", "PS100012"),), {"PS100012": 2}
    )
    result = engine.run(sequence)
    assert result.succeeded, result.error
    messages = engine.log.messages
    assert "TSManager: Processing 3 locations." in messages
    skipped = [m for m in messages if m.startswith("LocationServices: Skipping distribution point")]
    assert [m.split("'")[1] for m in skipped] == ["PS1DP.contoso.test", "PS2DP.contoso.test"]
    assert all("cannot reach an intranet distribution point" in m for m in skipped)
    # Records are logged in reply order, then the cloud one is used.
    listed = [m for m in messages if m.startswith("LocationServices: Distribution Point=")]
    assert ["PS1DP" in listed[0], "PS2DP" in listed[1], "getcontentxmlsecure" in listed[2]] == [
        True,
        True,
        True,
    ]
    cmg.log.assert_request_made("manifest", count=1, status=200)


def test_engine_with_only_intranet_sources_finds_no_content_server(cmg, cmg_client, cloud_dp):
    from pytest_cmg import ContentManifest, ManifestFile, Step, TaskSequence
    from pytest_cmg._protocol import codes

    on_prem_only = ContentManifest("PS100077", 1, (ManifestFile("a.txt", 3, "0" * 64),))
    cmg.add_on_prem_dp("PS1DP.contoso.test", on_prem_only)
    engine = cmg_client()
    result = engine.run(
        TaskSequence("PS100020", "Intranet only", (Step("Run", "run_command_line", "PS100077"),))
    )
    assert result.exit_code == codes.NO_LOCATIONS
    messages = engine.log.messages
    assert "TSManager: Processing 1 locations." in messages
    assert "TSManager: No static content server." in messages
    assert "TSManager: Content location request for PS100077:1 failed, hr=0x80040102" in messages
    assert cmg.log.count("manifest") == 0


def test_on_prem_dp_locality_is_checked(cmg):
    with pytest.raises(ValueError, match="locality 'NEARBY'"):
        cmg.add_on_prem_dp("PS1DP.contoso.test", locality="NEARBY")
    cmg.add_on_prem_dp("PS1DP.contoso.test")
    cmg.clear()
    assert cmg.on_prem_dps == []


def test_request_log_records_the_gateway_latency(http, cmg, distributed):
    locate(http, cmg, "PS100012", 2)
    [entry] = cmg.log.entries
    assert 0 < entry.elapsed < 10


def test_issued_secrets_since_a_mark_are_those_of_the_run_only(cmg) -> None:
    mark = cmg.secrets_issued
    token = cmg.issue_token("GUID:secret-mark")
    again = cmg.issue_token("GUID:secret-mark-2")
    assert cmg.issued_secrets(since=mark) == [token.rsplit(".", 1)[1], again.rsplit(".", 1)[1]]
    assert cmg.issued_secrets(since=cmg.secrets_issued) == []
    assert cmg.issued_secrets()[-2:] == cmg.issued_secrets(since=mark)
