"""The site served in process through ``responses``: the same decisions, no socket."""

from __future__ import annotations

import pytest
import requests
import responses

from pytest_cmg import CmgSite
from pytest_cmg._protocol.ccm import CCM_CONTENT_TYPE, CcmMessage, decode_message, encode_message
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest

CLIENT = "GUID:inprocess-client"


def locate(site, token=None):
    body = encode_message(
        CcmMessage(body=ContentLocationRequest("PS100001", 1, site.site_code).to_xml())
    )
    return requests.request(
        "CCM_POST",
        site.location_url,
        data=body,
        headers={
            "Content-Type": CCM_CONTENT_TYPE,
            "Authorization": f"Bearer {token or site.issue_token(CLIENT)}",
        },
        timeout=5,
    )


def test_requests_code_gets_the_sites_answers_without_a_socket():
    site = CmgSite()
    with responses.RequestsMock() as mock:
        site.mount(mock)
        metadata = requests.get(site.url + "/CCM_Proxy_ServerAuth/ServiceMetadata", timeout=5)
        located = locate(site)
        refused = locate(site, token="not-a-token")
        unpublished = requests.get(site.url + "/SMS_DP_SMSPKG$/Datalib", timeout=5)
    assert metadata.status_code == 200
    assert b"ServiceMetadata" in metadata.content
    assert located.status_code == 200
    reply = ContentLocationReply.from_xml(decode_message(located.content).body)
    assert reply.records == ()  # no cloud DP: the empty fallback reply
    assert refused.status_code == 401
    assert unpublished.status_code == 404
    assert [(e.endpoint, e.status, e.client_id) for e in site.log.entries] == [
        ("metadata", 200, ""),
        ("location", 200, CLIENT),
        ("location", 401, ""),
        (None, 404, ""),
    ]


def test_scripted_faults_apply_in_process():
    site = CmgSite()
    site.fail("location", status=503, retry_after="7")
    site.fail("location", request=2, drop=True)
    with responses.RequestsMock() as mock:
        site.mount(mock)
        busy = locate(site)
        with pytest.raises(requests.ConnectionError, match="dropped"):
            locate(site)
        assert locate(site).status_code == 200
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "7"
    assert site.faults.pending == []


def test_the_mutual_auth_path_sees_the_certificate_given_to_mount():
    site = CmgSite()
    with responses.RequestsMock() as mock:
        site.mount(mock)
        answer = requests.request("CCM_POST", site.mutual_location_url, data=b"x", timeout=5)
    assert answer.status_code == 403
    assert site.log.entries[-1].detail == "mutual-auth path without a certificate"


def test_an_unused_mount_fails_like_any_unfired_responses_registration():
    site = CmgSite()
    with pytest.raises(AssertionError, match="Not all requests have been executed"), responses.RequestsMock() as mock:
        site.mount(mock)


def test_a_certificate_given_to_mount_authenticates_the_mutual_path():
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from pytest_cmg import FakeCMG

    with FakeCMG() as cmg:  # started only for its TLS material; requests stay in process
        credentials = cmg.issue_client_certificate(CLIENT)
        der = x509.load_pem_x509_certificate(credentials.cert.read_bytes()).public_bytes(Encoding.DER)
        body = encode_message(
            CcmMessage(body=ContentLocationRequest("PS100001", 1, cmg.site_code).to_xml())
        )
        with responses.RequestsMock() as mock:
            cmg.mount(mock, peer_certificate=der)
            answer = requests.request("CCM_POST", cmg.mutual_location_url, data=body, timeout=5)
    assert answer.status_code == 200
    assert (cmg.log.entries[-1].auth, cmg.log.entries[-1].client_id) == ("certificate", CLIENT)
