"""Unit tests of ``pytest_cmg._protocol``: formats, paths, tokens and the clock.

Pure tests: no network, no servers, no sleeping. Time moves with :class:`FakeClock`.
"""

from __future__ import annotations

import base64
import dataclasses
import email
import hashlib
import json
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import PureWindowsPath
from urllib.parse import parse_qs, urlsplit
from xml.etree import ElementTree as ET

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from pytest_cmg._gateway.tokens import (
    AUDIENCE,
    CCM_TOKEN_LIFETIME,
    CONTENT_TOKEN_LIFETIME,
    SiteAuthority,
    TokenRejected,
)
from pytest_cmg._protocol import codes
from pytest_cmg._protocol.ccm import (
    BOUNDARY,
    CCM_CONTENT_TYPE,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from pytest_cmg._protocol.clock import FakeClock, SystemClock
from pytest_cmg._protocol.location import (
    CALG_SHA_256,
    SHA256_RSA_OID,
    AccessToken,
    ContentLocationReply,
    ContentLocationRequest,
    LocationRecord,
)
from pytest_cmg._protocol.manifest import ContentManifest, ManifestFile, package_hash
from pytest_cmg._protocol.paths import (
    CCM_METHOD,
    MANIFEST_PATH,
    Endpoint,
    Route,
    classify,
    manifest_url,
    token_auth_path,
)
from pytest_cmg._protocol.xml import parse_untrusted

START = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
ROLE_ID = "72057594037927939"
CLIENT_ID = "GUID:3fb5cf5d-1111-2222-3333-444455556666"
BOUNDARY_BYTES = BOUNDARY.encode("ascii")
CRLF = b"\r\n"


# --------------------------------------------------------------------------------------------
# helpers and fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site_key() -> rsa.RSAPrivateKey:
    # RSA key generation is the slow part of SiteAuthority; do it once per module.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def authority(clock: FakeClock, site_key: rsa.RSAPrivateKey) -> SiteAuthority:
    return SiteAuthority(
        clock=clock, site_guid="11111111-2222-3333-4444-555555555555", key=site_key
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: object) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _jwt_parts(token: str) -> tuple[dict, dict, str]:
    head, claims, sig = token.split(".")
    pad = lambda s: s + "=" * (-len(s) % 4)  # noqa: E731
    return (
        json.loads(base64.urlsafe_b64decode(pad(head))),
        json.loads(base64.urlsafe_b64decode(pad(claims))),
        sig,
    )


def _sign_jwt(key: rsa.RSAPrivateKey, header: object, claims: object) -> str:
    signing_input = _b64url_json(header) + "." + _b64url_json(claims)
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


def _envelope(*parts: tuple[bytes, bytes], boundary: bytes = BOUNDARY_BYTES) -> bytes:
    """A multipart body built by hand: each part is (content-type, payload)."""
    chunks = []
    for content_type, payload in parts:
        chunks += [b"--" + boundary + CRLF, b"content-type: " + content_type + CRLF + CRLF]
        chunks.append(payload + CRLF)
    chunks.append(b"--" + boundary + b"--" + CRLF)
    return b"".join(chunks)


def _utf16(text: str) -> bytes:
    return b"\xff\xfe" + text.encode("utf-16-le")


_MSG_COMPRESSED = (
    "<Msg><TargetEndpoint>MP_LocationManager</TargetEndpoint>"
    '<Hooks><Hook3 Name="zlib-compress"/></Hooks></Msg>'
)
_MSG_PLAIN = "<Msg><TargetEndpoint>MP_LocationManager</TargetEndpoint></Msg>"


def _mime_parts(data: bytes) -> list[email.message.Message]:
    """Split an envelope with the standard library's MIME parser (independent of ccm.py)."""
    wrapped = b"Content-Type: " + CCM_CONTENT_TYPE.encode("ascii") + CRLF + CRLF + data
    message = email.message_from_bytes(wrapped)
    assert message.is_multipart()
    return message.get_payload()


# --------------------------------------------------------------------------------------------
# CCM envelope
# --------------------------------------------------------------------------------------------

BODY_TEXT = (
    '<ContentLocationRequest Name="ファイル"><Package ID="PS100012"/></ContentLocationRequest>'
)


@pytest.mark.parametrize("compressed", [True, False])
def test_envelope_round_trip(compressed: bool) -> None:
    message = CcmMessage(
        body=BODY_TEXT,
        target_endpoint="MP_LocationManager",
        reply_to="direct:WKS001:LS_ReplyLocations",
        source_id=CLIENT_ID,
        source_host="WKS001",
        compressed=compressed,
    )
    decoded = decode_message(encode_message(message))
    assert decoded.body == BODY_TEXT
    assert "ファイル" in decoded.body
    assert decoded.compressed is compressed
    assert decoded.target_endpoint == "MP_LocationManager"
    assert decoded.reply_to == "direct:WKS001:LS_ReplyLocations"
    assert decoded.source_id == CLIENT_ID
    assert decoded.source_host == "WKS001"
    assert decoded.message_id == message.message_id


def test_envelope_round_trip_non_bmp_and_empty_body() -> None:
    for body in ["", "emoji \U0001f600 and ファイル"]:
        assert decode_message(encode_message(CcmMessage(body=body))).body == body


def test_envelope_default_message_id_is_braced_upper_guid() -> None:
    message_id = CcmMessage(body="x").message_id
    assert message_id.startswith("{")
    assert message_id.endswith("}")
    assert message_id == message_id.upper()
    assert len(message_id) == 38
    assert CcmMessage(body="x").message_id != message_id


def test_envelope_uses_the_fixed_boundary() -> None:
    data = encode_message(CcmMessage(body=BODY_TEXT))
    assert BOUNDARY == "aAbBcCdDv1234567890VxXyYzZ"
    assert f'boundary="{BOUNDARY}"' in CCM_CONTENT_TYPE
    assert CCM_CONTENT_TYPE.startswith("multipart/mixed;")
    assert data.startswith(b"--aAbBcCdDv1234567890VxXyYzZ\r\n")
    assert data.endswith(b"--aAbBcCdDv1234567890VxXyYzZ--\r\n")
    assert data.count(b"--aAbBcCdDv1234567890VxXyYzZ") == 3


def test_envelope_parts_decoded_independently() -> None:
    message = CcmMessage(body=BODY_TEXT, source_id=CLIENT_ID)
    header_part, body_part = _mime_parts(encode_message(message))

    assert header_part.get_content_type() == "text/plain"
    assert header_part.get_param("charset").upper() == "UTF-16"
    header_bytes = header_part.get_payload(decode=True)
    assert header_bytes.startswith(b"\xff\xfe")  # UTF-16 BOM
    header = ET.fromstring(header_bytes.decode("utf-16"))
    assert header.tag == "Msg"
    assert header.get("SchemaVersion") == "1.1"
    assert header.get("ReplyCompression") == "zlib"
    assert header.findtext("TargetEndpoint") == "MP_LocationManager"
    assert header.findtext("TargetAddress") == "mp:[http]MP_LocationManager"
    assert header.findtext("ReplyTo") == "direct:client:LS_ReplyLocations"
    assert header.findtext("SourceID") == CLIENT_ID
    assert header.find("Hooks/Hook3").get("Name") == "zlib-compress"

    assert body_part.get_content_type() == "application/octet-stream"
    body_bytes = body_part.get_payload(decode=True)
    assert header.find("Body").get("Length") == str(len(body_bytes))
    raw = zlib.decompress(body_bytes)
    assert raw.endswith(b"\x00\x00")  # UTF-16LE NUL
    text = raw.decode("utf-16-le")
    assert text == BODY_TEXT + "\x00"


def test_envelope_uncompressed_body_is_plain_utf16() -> None:
    header_part, body_part = _mime_parts(
        encode_message(CcmMessage(body="ファイル", compressed=False))
    )
    header = ET.fromstring(header_part.get_payload(decode=True).decode("utf-16"))
    assert header.find("Hooks") is None
    body_bytes = body_part.get_payload(decode=True)
    assert body_bytes.decode("utf-16") == "ファイル\x00"
    with pytest.raises(zlib.error):
        zlib.decompress(body_bytes)


def test_envelope_decodes_hand_built_message() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16(_MSG_COMPRESSED)),
        (b"application/octet-stream", zlib.compress("<Hi/>\x00".encode("utf-16-le"))),
    )
    decoded = decode_message(data)
    assert decoded.body == "<Hi/>"
    assert decoded.compressed is True
    assert decoded.target_endpoint == "MP_LocationManager"
    assert decoded.reply_to == ""


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "not a multipart message"),
        (b"<Msg/>", "not a multipart message"),
        (b"hello world", BOUNDARY),
    ],
)
def test_envelope_not_multipart(data: bytes, fragment: str) -> None:
    with pytest.raises(EnvelopeError, match=fragment):
        decode_message(data)


def test_envelope_wrong_boundary() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16(_MSG_PLAIN)),
        (b"application/octet-stream", _utf16("<Hi/>\x00")),
        boundary=b"someOtherBoundary0000",
    )
    with pytest.raises(EnvelopeError, match="not a multipart message with boundary"):
        decode_message(data)


def test_envelope_missing_close_delimiter() -> None:
    data = encode_message(CcmMessage(body="x")).removesuffix(b"--" + CRLF) + CRLF
    with pytest.raises(EnvelopeError, match="not a multipart message"):
        decode_message(data)


def test_envelope_one_part_only() -> None:
    data = _envelope((b"text/plain; charset=UTF-16", _utf16(_MSG_PLAIN)))
    with pytest.raises(EnvelopeError, match=r"expected 2 parts.*found 1"):
        decode_message(data)


def test_envelope_three_parts() -> None:
    part = (b"text/plain; charset=UTF-16", _utf16(_MSG_PLAIN))
    with pytest.raises(EnvelopeError, match="found 3"):
        decode_message(_envelope(part, part, part))


def test_envelope_part_without_header_block() -> None:
    data = b"--" + BOUNDARY_BYTES + CRLF + b"no blank line here" + CRLF + b"--" + BOUNDARY_BYTES
    data += b"--" + CRLF
    with pytest.raises(EnvelopeError, match="without a header block"):
        decode_message(data)


def test_envelope_bad_zlib() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16(_MSG_COMPRESSED)),
        (b"application/octet-stream", b"this is not zlib"),
    )
    with pytest.raises(EnvelopeError, match="not valid zlib"):
        decode_message(data)


def test_envelope_body_not_utf16() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16(_MSG_COMPRESSED)),
        (b"application/octet-stream", zlib.compress(b"odd")),  # odd byte count
    )
    with pytest.raises(EnvelopeError, match="not UTF-16LE"):
        decode_message(data)


def test_envelope_header_not_msg() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16("<Envelope><TargetEndpoint/></Envelope>")),
        (b"application/octet-stream", _utf16("<Hi/>\x00")),
    )
    with pytest.raises(EnvelopeError, match=r"root element is <Envelope>, expected <Msg>"):
        decode_message(data)


def test_envelope_header_not_xml() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16("<Msg><unclosed></Msg>")),
        (b"application/octet-stream", _utf16("<Hi/>\x00")),
    )
    with pytest.raises(EnvelopeError, match="header is not a <Msg> document"):
        decode_message(data)


def test_envelope_header_not_utf16() -> None:
    data = _envelope(
        (b"text/plain; charset=UTF-16", b"\xff\xfe<\x00M"),  # odd length after the BOM
        (b"application/octet-stream", _utf16("<Hi/>\x00")),
    )
    with pytest.raises(EnvelopeError, match="header part is not UTF-16"):
        decode_message(data)


def test_envelope_header_with_doctype_is_refused() -> None:
    header = '<!DOCTYPE Msg [<!ENTITY x "boom">]><Msg><TargetEndpoint>&x;</TargetEndpoint></Msg>'
    data = _envelope(
        (b"text/plain; charset=UTF-16", _utf16(header)),
        (b"application/octet-stream", _utf16("<Hi/>\x00")),
    )
    with pytest.raises(EnvelopeError, match="DOCTYPE"):
        decode_message(data)


def test_envelope_error_is_a_value_error() -> None:
    assert issubclass(EnvelopeError, ValueError)


# --------------------------------------------------------------------------------------------
# ContentLocationRequest
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_azure", [True, False])
@pytest.mark.parametrize("use_internet_dp", [True, False])
def test_location_request_round_trip(use_azure: bool, use_internet_dp: bool) -> None:
    request = ContentLocationRequest(
        package_id="PS100012",
        version=7,
        site_code="PS1",
        use_azure=use_azure,
        use_internet_dp=use_internet_dp,
        location_type="SMSUpdate",
    )
    xml = request.to_xml()
    root = ET.fromstring(xml)
    assert root.tag == "ContentLocationRequest"
    assert root.find("Package").get("ID") == "PS100012"
    assert root.find("Package").get("Version") == "7"
    assert root.find("AssignedSite").get("SiteCode") == "PS1"
    info = root.find("ClientLocationInfo")
    assert info.get("UseAzure") == ("1" if use_azure else "0")
    assert info.get("UseInternetDP") == ("1" if use_internet_dp else "0")
    assert info.get("LocationType") == "SMSUpdate"
    assert info.get("DPTokenAuth") == "1"

    parsed = ContentLocationRequest.from_xml(xml)
    assert parsed == request
    assert isinstance(parsed.version, int)


def test_location_request_defaults() -> None:
    request = ContentLocationRequest("UID:Content_1234", 1, "P01")
    parsed = ContentLocationRequest.from_xml(request.to_xml())
    assert parsed.use_azure is True
    assert parsed.use_internet_dp is True
    assert parsed.location_type == "SMSPackage"
    assert parsed.package_id == "UID:Content_1234"


def test_location_request_parses_product_sample() -> None:
    # Trimmed from protocol.md section 1.4 (an intranet client: UseAzure=1, UseInternetDP=0).
    xml = (
        '<ContentLocationRequest SchemaVersion="1.00" BGRVersion="1" ClientInOperation="PT0M">'
        '<Package ID="CAS00015" Version="1" DeploymentFlags="9223372036855313105"/>'
        '<AssignedSite SiteCode="P01"/>'
        '<ClientLocationInfo LocationType="SMSPackage" UseAzure="1" UseInternetDP="0">'
        '<ADSite Name="Default-First-Site-Name"/></ClientLocationInfo>'
        "</ContentLocationRequest>"
    )
    assert ContentLocationRequest.from_xml(xml) == ContentLocationRequest(
        "CAS00015", 1, "P01", use_azure=True, use_internet_dp=False
    )


_REQUEST_OK = (
    '<ContentLocationRequest><Package ID="P" Version="1"/><AssignedSite SiteCode="S"/>'
    "<ClientLocationInfo/></ContentLocationRequest>"
)


@pytest.mark.parametrize(
    ("xml", "fragment"),
    [
        (
            '<ContentLocationRequest><AssignedSite SiteCode="S"/><ClientLocationInfo/>'
            "</ContentLocationRequest>",
            "<ContentLocationRequest> has no <Package> element",
        ),
        (
            '<ContentLocationRequest><Package ID="P" Version="1"/><ClientLocationInfo/>'
            "</ContentLocationRequest>",
            "no <AssignedSite> element",
        ),
        (
            '<ContentLocationRequest><Package ID="P" Version="1"/><AssignedSite SiteCode="S"/>'
            "</ContentLocationRequest>",
            "no <ClientLocationInfo> element",
        ),
        (
            _REQUEST_OK.replace('Version="1"', 'Version="one"'),
            "<Package Version> is not an integer: 'one'",
        ),
        (_REQUEST_OK.replace(' Version="1"', ""), "Version"),
        (_REQUEST_OK.replace(' ID="P"', ""), "<Package> has no ID attribute"),
        (_REQUEST_OK.replace(' SiteCode="S"', ""), "<AssignedSite> has no SiteCode attribute"),
        ("<ContentLocationReply/>", "root element is <ContentLocationReply>"),
        ("<ContentLocationRequest>", "malformed XML"),
    ],
)
def test_location_request_parse_errors(xml: str, fragment: str) -> None:
    assert ContentLocationRequest.from_xml(_REQUEST_OK).version == 1  # the base parses
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ContentLocationRequest.from_xml(xml)


def test_location_request_refuses_dtd() -> None:
    xml = '<!DOCTYPE r [<!ENTITY v "1">]>' + _REQUEST_OK.replace('Version="1"', 'Version="&v;"')
    with pytest.raises(ValueError, match="DOCTYPE"):
        ContentLocationRequest.from_xml(xml)


# --------------------------------------------------------------------------------------------
# ContentLocationReply
# --------------------------------------------------------------------------------------------


def _cloud_record(**changes: object) -> LocationRecord:
    token = AccessToken(
        tid=CLIENT_ID,
        iss="mp.contoso.com",
        alg=SHA256_RSA_OID,
        st="2024-05-01T08:00:00",
        et="2024-05-01T16:00:00",
        signature="c2lnbmF0dXJl",
    )
    record = LocationRecord(
        url=manifest_url("https://cmg.contoso.com", "PS100012", "PS100012"),
        server_remote_name="cmg.contoso.com",
        dp_type="CLOUD",
        locality="REMOTE",
        version=3,
        access_token=token,
    )
    return dataclasses.replace(record, **changes)


def test_empty_reply_is_fallback() -> None:
    reply = ContentLocationReply(site_code="PS1")
    root = ET.fromstring(reply.to_xml())
    assert root.tag == "ContentLocationReply"
    mp_site = root.find("Sites/Site/MPSite")
    assert mp_site is not None
    assert mp_site.get("SiteLocality") == "FALLBACK"
    assert mp_site.get("SiteCode") == "PS1"
    assert mp_site.get("MasterSiteCode") == "PS1"
    records = root.find("Sites/Site/LocationRecords")
    assert records is not None
    assert len(records) == 0
    assert (records.text or "").strip() == ""
    assert root.find("BoundaryGroups/DOINCServers") is not None
    assert root.find("RelatedContentIDs") is not None

    parsed = ContentLocationReply.from_xml(reply.to_xml())
    assert parsed.records == ()
    assert parsed.site_code == "PS1"


def test_empty_reply_parses_product_sample() -> None:
    # Verbatim shape from protocol.md section 1.5 (S24).
    xml = (
        '<ContentLocationReply SchemaVersion="1.00" BGRVersion="1"><BoundaryGroups '
        'BoundaryGroupListRetrieveTime="" IsOnVPN="0"><DOINCServers/></BoundaryGroups>'
        '<ContentInfo/><Sites><Site><MPSite SiteCode="ABC" MasterSiteCode="ABC" '
        'SiteLocality="FALLBACK"/><LocationRecords/></Site></Sites><RelatedContentIDs/>'
        "</ContentLocationReply>"
    )
    parsed = ContentLocationReply.from_xml(xml)
    assert parsed == ContentLocationReply(site_code="ABC")


def test_reply_with_cloud_record_xml() -> None:
    record = _cloud_record()
    reply = ContentLocationReply(site_code="PS1", package_hash="AB" * 32, records=(record,))
    root = ET.fromstring(reply.to_xml())
    assert root.get("HashAlgorithm") == "32780"
    assert str(CALG_SHA_256) == "32780"
    assert root.get("Hash") == "AB" * 32
    hash_node = root.find("ContentInfo/ContentHashValues/Hash")
    assert hash_node.get("Algorithm") == "32780"
    assert hash_node.get("HashString") == "AB" * 32
    assert root.find("Sites/Site/MPSite").get("SiteLocality") == "LOCAL"
    nodes = root.findall("Sites/Site/LocationRecords/LocationRecord")
    assert len(nodes) == 1
    node = nodes[0]
    assert node.find("URL").get("Name") == record.url
    assert node.findtext("DPType") == "CLOUD"
    assert node.findtext("Locality") == "REMOTE"
    assert node.findtext("Version") == "3"
    assert node.findtext("ServerRemoteName") == "cmg.contoso.com"
    token = node.find("AccessToken")
    assert token.get("tid") == CLIENT_ID
    assert token.get("alg") == "1.2.840.113549.1.1.11"
    assert token.get("Signature") == "c2lnbmF0dXJl"


def test_reply_with_cloud_record_round_trip() -> None:
    record = _cloud_record()
    reply = ContentLocationReply(site_code="PS1", package_hash="CD" * 32, records=(record,))
    parsed = ContentLocationReply.from_xml(reply.to_xml())
    assert parsed == reply
    (got,) = parsed.records
    assert got.url == record.url
    assert got.dp_type == "CLOUD"
    assert got.is_cloud
    assert got.locality == "REMOTE"
    assert got.version == 3
    assert got.access_token == record.access_token
    assert got.access_token.st == "2024-05-01T08:00:00"
    assert got.access_token.et == "2024-05-01T16:00:00"


def test_reply_keeps_record_order_and_optional_token() -> None:
    server = _cloud_record(
        url="http://dp.contoso.com/SMS_DP_SMSPKG$/PS100012",
        server_remote_name="dp.contoso.com",
        dp_type="SERVER",
        locality="LOCAL",
        access_token=None,
    )
    cloud = _cloud_record()
    reply = ContentLocationReply(site_code="PS1", package_hash="00", records=(server, cloud))
    parsed = ContentLocationReply.from_xml(reply.to_xml())
    assert [r.dp_type for r in parsed.records] == ["SERVER", "CLOUD"]
    assert parsed.records[0].access_token is None
    assert not parsed.records[0].is_cloud
    assert parsed.records[1].access_token is not None


def test_reply_parse_errors() -> None:
    with pytest.raises(ValueError, match="root element is <ContentLocationRequest>"):
        ContentLocationReply.from_xml("<ContentLocationRequest/>")
    xml = ContentLocationReply("PS1", "00", (_cloud_record(),)).to_xml()
    root = ET.fromstring(xml)
    node = root.find("Sites/Site/LocationRecords/LocationRecord")
    node.remove(node.find("URL"))
    with pytest.raises(ValueError, match="<LocationRecord> has no <URL> element"):
        ContentLocationReply.from_xml(ET.tostring(root, encoding="unicode"))
    root = ET.fromstring(xml)
    del root.find("Sites/Site/LocationRecords/LocationRecord/AccessToken").attrib["et"]
    with pytest.raises(ValueError, match="<AccessToken> has no et attribute"):
        ContentLocationReply.from_xml(ET.tostring(root, encoding="unicode"))


# --------------------------------------------------------------------------------------------
# ContentManifest
# --------------------------------------------------------------------------------------------

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()
SHA_C = hashlib.sha256(b"c").hexdigest()
FILES = (
    ManifestFile("sources/install.wim", 16_777_216, SHA_A),
    ManifestFile("setup.exe", 1024, SHA_B),
    ManifestFile("sources/ファイル.txt", 0, SHA_C),
)


def test_package_hash_known_value() -> None:
    # Recomputed here from the documented canonical form, sorted by UTF-8 bytes of the path.
    lines = sorted(
        f"{f.relpath}\t{f.size}\t{f.sha256}\n".encode() for f in FILES
    )  # relpath first, so sorting the lines sorts by path (no path is a prefix of another)
    expected = hashlib.sha256(b"".join(lines)).hexdigest().upper()
    assert package_hash(FILES) == expected
    assert len(expected) == 64
    assert package_hash([]) == hashlib.sha256(b"").hexdigest().upper()


def test_package_hash_ignores_file_order_and_sha_case() -> None:
    reference = package_hash(FILES)
    assert package_hash(tuple(reversed(FILES))) == reference
    assert package_hash([FILES[1], FILES[2], FILES[0]]) == reference
    upper = tuple(dataclasses.replace(f, sha256=f.sha256.upper()) for f in FILES)
    assert package_hash(upper) == reference
    with_urls = tuple(dataclasses.replace(f, url="https://blob/x?sig=1") for f in FILES)
    assert package_hash(with_urls) == reference


@pytest.mark.parametrize(
    "change",
    [
        {"relpath": "sources/install2.wim"},
        {"size": 16_777_217},
        {"sha256": SHA_B},
    ],
)
def test_package_hash_changes_with_any_field(change: dict) -> None:
    reference = package_hash(FILES)
    for index in range(len(FILES)):
        files = list(FILES)
        files[index] = dataclasses.replace(files[index], **change)
        if files[index] == FILES[index]:
            continue
        assert package_hash(files) != reference, (index, change)


def test_package_hash_changes_when_a_file_is_added_or_removed() -> None:
    assert package_hash(FILES[:2]) != package_hash(FILES)
    assert package_hash((*FILES, ManifestFile("extra", 0, SHA_A))) != package_hash(FILES)


def test_manifest_hash_computed_when_not_given() -> None:
    manifest = ContentManifest("PS100012", 3, FILES)
    assert manifest.hash == package_hash(FILES)
    explicit = ContentManifest("PS100012", 3, FILES, hash="DEADBEEF")
    assert explicit.hash == "DEADBEEF"
    assert manifest.total_size == 16_777_216 + 1024


def test_manifest_round_trip() -> None:
    manifest = ContentManifest("PS100012", 3, FILES)
    xml = manifest.to_xml()
    root = ET.fromstring(xml)
    assert root.tag == "ContentManifest"
    assert root.get("HashAlgorithm") == "32780"
    assert root.get("PackageID") == "PS100012"
    assert root.get("Version") == "3"
    assert root.get("Hash") == manifest.hash
    assert [n.get("RelPath") for n in root.iterfind("File")] == [f.relpath for f in FILES]
    assert all(n.get("Url") is None for n in root.iterfind("File"))
    assert ContentManifest.from_xml(xml) == manifest


def test_manifest_from_xml_lowercases_sha_and_computes_missing_hash() -> None:
    xml = (
        '<ContentManifest PackageID="P" Version="2" HashAlgorithm="32780">'
        f'<File RelPath="a.bin" Size="1" Hash="{SHA_A.upper()}"/></ContentManifest>'
    )
    manifest = ContentManifest.from_xml(xml)
    assert manifest.files == (ManifestFile("a.bin", 1, SHA_A),)
    assert manifest.hash == package_hash(manifest.files)
    assert manifest.version == 2


def test_manifest_with_urls() -> None:
    manifest = ContentManifest("PS100012", 3, FILES)
    urls = {f.relpath: f"https://blob.test/c/{i}?sig=x&se=1" for i, f in enumerate(FILES)}
    signed = manifest.with_urls(urls)
    assert [f.url for f in signed.files] == [urls[f.relpath] for f in FILES]
    assert [f.url for f in manifest.files] == ["", "", ""]  # the original is untouched
    assert signed.hash == manifest.hash
    parsed = ContentManifest.from_xml(signed.to_xml())
    assert parsed == signed
    assert parsed.files[0].url == urls[FILES[0].relpath]
    with pytest.raises(KeyError):
        manifest.with_urls({FILES[0].relpath: "https://x"})


def _manifest_with_relpath(relpath: str) -> str:
    root = ET.Element(
        "ContentManifest", PackageID="P", Version="1", HashAlgorithm="32780", Hash="00"
    )
    ET.SubElement(root, "File", RelPath="ok.txt", Size="1", Hash=SHA_A)
    ET.SubElement(root, "File", RelPath=relpath, Size="1", Hash=SHA_A)
    return ET.tostring(root, encoding="unicode")


@pytest.mark.parametrize(
    "relpath",
    ["../x", "a/../../x", "..", "/abs", "//server/share/x", "a//b", "a\\b", "..\\x", "", "a/"],
)
def test_manifest_refuses_unsafe_relpath(relpath: str) -> None:
    with pytest.raises(ValueError, match="unsafe RelPath"):
        ContentManifest.from_xml(_manifest_with_relpath(relpath))


@pytest.mark.parametrize("relpath", ["C:/Windows/System32/evil.dll", "D:evil.dll"])
def test_manifest_refuses_windows_drive_relpath(relpath: str) -> None:
    # On a Windows client, joining a drive-qualified path discards the package folder.
    joined = PureWindowsPath("C:/cache/PS100012.1") / relpath
    assert not str(joined).lower().startswith("c:\\cache\\ps100012.1")
    with pytest.raises(ValueError, match="unsafe RelPath"):
        ContentManifest.from_xml(_manifest_with_relpath(relpath))


def test_manifest_accepts_nested_relpath() -> None:
    manifest = ContentManifest.from_xml(_manifest_with_relpath("sources/sxs/ファイル.cab"))
    assert manifest.files[1].relpath == "sources/sxs/ファイル.cab"


def test_manifest_refuses_missing_relpath_attribute() -> None:
    xml = (
        '<ContentManifest PackageID="P" Version="1" HashAlgorithm="32780">'
        f'<File Size="1" Hash="{SHA_A}"/></ContentManifest>'
    )
    with pytest.raises(ValueError, match="unsafe RelPath ''"):
        ContentManifest.from_xml(xml)


@pytest.mark.parametrize("algorithm", ["32772", "sha256", ""])
def test_manifest_refuses_wrong_hash_algorithm(algorithm: str) -> None:
    xml = _manifest_with_relpath("b.txt").replace(
        'HashAlgorithm="32780"', f'HashAlgorithm="{algorithm}"'
    )
    with pytest.raises(ValueError, match=r"HashAlgorithm.*is not 32780"):
        ContentManifest.from_xml(xml)


def test_manifest_refuses_missing_hash_algorithm() -> None:
    xml = _manifest_with_relpath("b.txt").replace(' HashAlgorithm="32780"', "")
    with pytest.raises(ValueError, match="HashAlgorithm None"):
        ContentManifest.from_xml(xml)


def test_manifest_other_parse_errors() -> None:
    with pytest.raises(ValueError, match="root element is <Manifest>"):
        ContentManifest.from_xml('<Manifest HashAlgorithm="32780"/>')
    xml = _manifest_with_relpath("b.txt").replace(
        'RelPath="b.txt" Size="1"', 'RelPath="b.txt" Size="big"'
    )
    with pytest.raises(ValueError, match=r"RelPath='b\.txt'> has no integer Size"):
        ContentManifest.from_xml(xml)


# --------------------------------------------------------------------------------------------
# parse_untrusted
# --------------------------------------------------------------------------------------------

BILLION_LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol1 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol2 "&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;&lol1;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol4 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
 <!ENTITY lol5 "&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;&lol4;">
 <!ENTITY lol6 "&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;&lol5;">
 <!ENTITY lol7 "&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;&lol6;">
 <!ENTITY lol8 "&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;&lol7;">
 <!ENTITY lol9 "&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;&lol8;">
]>
<lolz>&lol9;</lolz>"""

XXE = """<?xml version="1.0"?>
<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>
<ContentLocationRequest><Package ID="&xxe;" Version="1"/></ContentLocationRequest>"""


@pytest.mark.parametrize(
    "text",
    [
        BILLION_LAUGHS,
        XXE,
        XXE.replace("DOCTYPE", "doctype"),
        '<!DOCTYPE a SYSTEM "http://evil.test/a.dtd"><a/>',
        '<a><!ENTITY x "y"></a>',
    ],
    ids=["billion-laughs", "xxe", "lowercase-doctype", "external-dtd", "bare-entity"],
)
def test_parse_untrusted_refuses_dtd_and_entities(text: str) -> None:
    with pytest.raises(ValueError, match="refused"):
        parse_untrusted(text)


@pytest.mark.parametrize(
    "text", ["", "<a>", "<a></b>", "not xml", "<a/><b/>", "<a>&undefined;</a>"]
)
def test_parse_untrusted_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="malformed XML"):
        parse_untrusted(text)


def test_parse_untrusted_parses_ordinary_documents() -> None:
    root = parse_untrusted('<?xml version="1.0"?><a x="1"><b>ファイル &amp; &#x41;</b></a>')
    assert root.tag == "a"
    assert root.get("x") == "1"
    assert root.findtext("b") == "ファイル & A"


# --------------------------------------------------------------------------------------------
# SiteAuthority: CCM tokens
# --------------------------------------------------------------------------------------------


def test_ccm_token_fresh_verifies(authority: SiteAuthority) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    claims = authority.verify_ccm_token(token)
    assert claims["UniqueId"] == CLIENT_ID
    assert claims["aud"] == AUDIENCE == "urn:sccm:service"
    assert claims["iss"] == authority.issuer
    assert authority.issuer == "urn:sccm:oauth2:11111111-2222-3333-4444-555555555555"
    assert claims["nbf"] == int(START.timestamp())
    assert claims["exp"] == int((START + timedelta(hours=8)).timestamp())
    assert CCM_TOKEN_LIFETIME == timedelta(hours=8)


def test_ccm_token_header(authority: SiteAuthority) -> None:
    header, _, signature = _jwt_parts(authority.issue_ccm_token(CLIENT_ID))
    assert header["alg"] == "RS256"
    assert header["typ"] == "JWT"
    assert header["x5t"] == authority.thumbprint
    assert signature
    assert "=" not in signature


def test_ccm_token_verifies_just_before_expiry(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    clock.advance(CCM_TOKEN_LIFETIME - timedelta(seconds=1))
    assert authority.verify_ccm_token(token)["UniqueId"] == CLIENT_ID


@pytest.mark.parametrize(
    "elapsed", [timedelta(hours=8), timedelta(hours=8, seconds=1), timedelta(days=3)]
)
def test_ccm_token_expired(authority: SiteAuthority, clock: FakeClock, elapsed: timedelta) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    clock.advance(elapsed)
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(token)
    assert "expired" in info.value.reason
    assert "IDX10223" in info.value.reason


def test_ccm_token_custom_lifetime(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_ccm_token(CLIENT_ID, lifetime=timedelta(minutes=5))
    clock.advance(299)
    authority.verify_ccm_token(token)
    clock.advance(1)
    with pytest.raises(TokenRejected, match="expired"):
        authority.verify_ccm_token(token)


def test_ccm_token_not_yet_valid(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_ccm_token(CLIENT_ID, not_before=START + timedelta(hours=1))
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(token)
    assert "not yet valid" in info.value.reason
    clock.advance(timedelta(hours=1))
    assert authority.verify_ccm_token(token)["UniqueId"] == CLIENT_ID
    _, claims, _ = _jwt_parts(token)
    assert claims["exp"] - claims["nbf"] == 8 * 3600


def test_ccm_token_wrong_audience(authority: SiteAuthority) -> None:
    token = authority.issue_ccm_token(CLIENT_ID, audience="urn:other:service")
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(token)
    assert "audience" in info.value.reason
    assert "urn:other:service" in info.value.reason


def test_ccm_token_from_another_site_has_bad_signature(
    authority: SiteAuthority, clock: FakeClock, other_key: rsa.RSAPrivateKey
) -> None:
    # Same site GUID (same issuer) but another key: only the signature can tell them apart.
    impostor = SiteAuthority(clock=clock, site_guid=authority.site_guid, key=other_key)
    token = impostor.issue_ccm_token(CLIENT_ID)
    assert impostor.verify_ccm_token(token)["UniqueId"] == CLIENT_ID
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(token)
    assert "signature" in info.value.reason


def test_ccm_token_another_site_default_guid_rejected(
    authority: SiteAuthority, clock: FakeClock, other_key: rsa.RSAPrivateKey
) -> None:
    other = SiteAuthority(clock=clock, key=other_key)
    assert other.issuer != authority.issuer
    with pytest.raises(TokenRejected, match="signature"):
        authority.verify_ccm_token(other.issue_ccm_token(CLIENT_ID))


def test_ccm_token_wrong_issuer_same_key(
    authority: SiteAuthority, clock: FakeClock, site_key: rsa.RSAPrivateKey
) -> None:
    sibling = SiteAuthority(
        clock=clock, site_guid="99999999-0000-0000-0000-000000000000", key=site_key
    )
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(sibling.issue_ccm_token(CLIENT_ID))
    assert "issuer" in info.value.reason


def test_ccm_token_alg_none(authority: SiteAuthority) -> None:
    _, claims, _ = _jwt_parts(authority.issue_ccm_token(CLIENT_ID))
    forged = _b64url_json({"alg": "none", "typ": "JWT"}) + "." + _b64url_json(claims) + "."
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(forged)
    assert "alg" in info.value.reason
    assert "'none'" in info.value.reason
    assert "RS256" in info.value.reason


@pytest.mark.parametrize("alg", ["HS256", "RS512", "None", None])
def test_ccm_token_other_algs_rejected_even_with_valid_signature(
    authority: SiteAuthority, alg: str | None
) -> None:
    _, claims, signature = _jwt_parts(authority.issue_ccm_token(CLIENT_ID))
    forged = _b64url_json({"alg": alg}) + "." + _b64url_json(claims) + "." + signature
    with pytest.raises(TokenRejected, match="is not RS256"):
        authority.verify_ccm_token(forged)


def test_ccm_token_header_not_object(authority: SiteAuthority) -> None:
    _, claims, signature = _jwt_parts(authority.issue_ccm_token(CLIENT_ID))
    forged = _b64url_json(["RS256"]) + "." + _b64url_json(claims) + "." + signature
    with pytest.raises(TokenRejected, match="is not RS256"):
        authority.verify_ccm_token(forged)


def test_ccm_token_tampered_claims(authority: SiteAuthority) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    head, _, signature = token.split(".")
    _, claims, _ = _jwt_parts(token)
    claims["UniqueId"] = "GUID:someone-else"
    forged = head + "." + _b64url_json(claims) + "." + signature
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(forged)
    assert "signature" in info.value.reason


def test_ccm_token_extended_expiry_rejected(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    head, _, signature = token.split(".")
    _, claims, _ = _jwt_parts(token)
    claims["exp"] += 86_400 * 365
    clock.advance(timedelta(hours=9))
    with pytest.raises(TokenRejected, match="signature"):
        authority.verify_ccm_token(head + "." + _b64url_json(claims) + "." + signature)


def test_ccm_token_tampered_signature(authority: SiteAuthority) -> None:
    token = authority.issue_ccm_token(CLIENT_ID)
    head, body, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    forged = f"{head}.{body}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"
    with pytest.raises(TokenRejected, match="signature"):
        authority.verify_ccm_token(forged)
    with pytest.raises(TokenRejected, match="signature"):
        authority.verify_ccm_token(f"{head}.{body}.")


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("", "three-part"),
        ("abc", "three-part"),
        ("a.b", "three-part"),
        ("a.b.c.d", "three-part"),
        ("!!!!.@@@@.####", "not decodable"),
        ("a.b.c", "not decodable"),  # 'a' is not valid base64 (1 mod 4)
        (_b64url(b"not json") + "." + _b64url(b"{}") + ".", "not decodable"),
        (_b64url(b"\xff\xfe\xfd") + "." + _b64url(b"{}") + ".", "not decodable"),
    ],
)
def test_ccm_token_garbage(authority: SiteAuthority, token: str, fragment: str) -> None:
    with pytest.raises(TokenRejected) as info:
        authority.verify_ccm_token(token)
    assert fragment in info.value.reason
    assert str(info.value) == info.value.reason


def test_ccm_token_hand_signed_claims_not_object(
    authority: SiteAuthority, site_key: rsa.RSAPrivateKey
) -> None:
    token = _sign_jwt(site_key, {"alg": "RS256"}, ["UniqueId", CLIENT_ID])
    with pytest.raises(TokenRejected, match="claims are not an object"):
        authority.verify_ccm_token(token)


def test_ccm_token_hand_signed_without_exp_is_expired(
    authority: SiteAuthority, site_key: rsa.RSAPrivateKey
) -> None:
    claims = {"UniqueId": CLIENT_ID, "aud": AUDIENCE, "iss": authority.issuer}
    token = _sign_jwt(site_key, {"alg": "RS256"}, claims)
    with pytest.raises(TokenRejected, match="expired"):
        authority.verify_ccm_token(token)
    claims["exp"] = int((START + timedelta(minutes=1)).timestamp())
    assert authority.verify_ccm_token(_sign_jwt(site_key, {"alg": "RS256"}, claims)) == claims


def test_thumbprint_is_stable_and_key_specific(
    authority: SiteAuthority, clock: FakeClock, other_key: rsa.RSAPrivateKey
) -> None:
    assert authority.thumbprint == authority.thumbprint
    assert len(base64.urlsafe_b64decode(authority.thumbprint + "=")) == 20  # SHA-1
    assert SiteAuthority(clock=clock, key=other_key).thumbprint != authority.thumbprint


# --------------------------------------------------------------------------------------------
# SiteAuthority: content access tokens
# --------------------------------------------------------------------------------------------

PID = "PS100012"
CID = "PS100012"
ISS = "mp.contoso.com"


def _access_args(token: AccessToken) -> dict[str, str]:
    return {
        "pid": PID,
        "cid": CID,
        "tid": token.tid,
        "iss": token.iss,
        "st": token.st,
        "et": token.et,
        "signature": token.signature,
    }


def test_access_token_issue_and_verify(authority: SiteAuthority) -> None:
    token = authority.issue_access_token(PID, CID, CLIENT_ID, ISS)
    assert token.tid == CLIENT_ID
    assert token.iss == ISS
    assert token.alg == SHA256_RSA_OID == "1.2.840.113549.1.1.11"
    assert token.st == "2024-05-01T08:00:00"
    assert token.et == "2024-05-01T16:00:00"
    assert CONTENT_TOKEN_LIFETIME == timedelta(hours=8)
    end = authority.verify_access(**_access_args(token))
    assert end == datetime(2024, 5, 1, 16, 0, 0, tzinfo=UTC)
    assert end.tzinfo is not None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("pid", "PS100013"),
        ("cid", "PS100013"),
        ("tid", "GUID:someone-else"),
        ("iss", "evil.contoso.com"),
        ("st", "2024-05-01T07:00:00"),
        ("et", "2024-05-02T16:00:00"),
        ("et", "2099-01-01T00:00:00"),
    ],
)
def test_access_token_tampered_parameter(authority: SiteAuthority, field: str, value: str) -> None:
    args = _access_args(authority.issue_access_token(PID, CID, CLIENT_ID, ISS))
    assert args[field] != value
    args[field] = value
    with pytest.raises(TokenRejected) as info:
        authority.verify_access(**args)
    assert "signature does not match" in info.value.reason


def test_access_token_tampered_signature(authority: SiteAuthority) -> None:
    args = _access_args(authority.issue_access_token(PID, CID, CLIENT_ID, ISS))
    signature = args["signature"]
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    args["signature"] = signature[:middle] + flipped + signature[middle + 1 :]
    with pytest.raises(TokenRejected, match="signature does not match"):
        authority.verify_access(**args)
    args["signature"] = ""
    with pytest.raises(TokenRejected, match="signature"):
        authority.verify_access(**args)
    args["signature"] = "abcde"  # 1 mod 4: not decodable
    with pytest.raises(TokenRejected, match="not base64url"):
        authority.verify_access(**args)


def test_access_token_from_another_site(
    authority: SiteAuthority, clock: FakeClock, other_key: rsa.RSAPrivateKey
) -> None:
    other = SiteAuthority(clock=clock, site_guid=authority.site_guid, key=other_key)
    token = other.issue_access_token(PID, CID, CLIENT_ID, ISS)
    assert other.verify_access(**_access_args(token))
    with pytest.raises(TokenRejected, match="signature does not match"):
        authority.verify_access(**_access_args(token))


def test_access_token_expiry(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_access_token(PID, CID, CLIENT_ID, ISS)
    clock.advance(CONTENT_TOKEN_LIFETIME - timedelta(seconds=1))
    assert authority.verify_access(**_access_args(token)) == START + CONTENT_TOKEN_LIFETIME
    clock.advance(1)  # exactly et
    with pytest.raises(TokenRejected) as info:
        authority.verify_access(**_access_args(token))
    assert "expired" in info.value.reason


def test_access_token_custom_lifetime(authority: SiteAuthority, clock: FakeClock) -> None:
    token = authority.issue_access_token(PID, CID, CLIENT_ID, ISS, lifetime=timedelta(minutes=10))
    assert token.et == "2024-05-01T08:10:00"
    clock.advance(timedelta(minutes=10))
    with pytest.raises(TokenRejected, match="expired"):
        authority.verify_access(**_access_args(token))


def test_access_token_not_yet_valid(authority: SiteAuthority, site_key: rsa.RSAPrivateKey) -> None:
    # A sibling authority (same key and GUID) whose clock runs an hour ahead issues the token.
    ahead = SiteAuthority(
        clock=FakeClock(START + timedelta(hours=1)), site_guid=authority.site_guid, key=site_key
    )
    token = ahead.issue_access_token(PID, CID, CLIENT_ID, ISS)
    with pytest.raises(TokenRejected) as info:
        authority.verify_access(**_access_args(token))
    assert "not yet valid" in info.value.reason


def test_access_token_signed_bad_window_format(
    authority: SiteAuthority, site_key: rsa.RSAPrivateKey
) -> None:
    st, et = "yesterday", "tomorrow"
    data = "\n".join([PID, CID, CLIENT_ID, ISS, st, et]).encode()
    signature = _b64url(site_key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
    with pytest.raises(TokenRejected, match="is not %Y-%m-%dT%H:%M:%S"):
        authority.verify_access(PID, CID, CLIENT_ID, ISS, st, et, signature)


# --------------------------------------------------------------------------------------------
# paths
# --------------------------------------------------------------------------------------------


def test_token_auth_path() -> None:
    assert (
        token_auth_path(ROLE_ID) == f"/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system_tokenauth/request"
    )


def test_classify_location() -> None:
    assert CCM_METHOD == "CCM_POST"
    assert classify("CCM_POST", token_auth_path(ROLE_ID)) == Route("location", "token", ROLE_ID)
    assert Endpoint.LOCATION == "location"
    # The product logs the path in both casings (ccm_system_TokenAuth / ccm_system_tokenauth).
    mixed = f"/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system_TokenAuth/request"
    assert classify("CCM_POST", mixed) == Route("location", "token", ROLE_ID)
    mutual = f"/CCM_Proxy_MutualAuth/{ROLE_ID}/ccm_system/request"
    assert classify("CCM_POST", mutual) == Route("location", "certificate", ROLE_ID)


@pytest.mark.parametrize("method", ["GET", "POST", "HEAD", "PUT", "ccm_post"])
def test_classify_location_path_with_other_method(method: str) -> None:
    assert classify(method, token_auth_path(ROLE_ID)) is None


def test_classify_manifest() -> None:
    assert MANIFEST_PATH == "/downloadrestservice.svc/getcontentxmlsecure"
    assert classify("GET", MANIFEST_PATH) == Route("manifest", "none")
    assert classify("GET", "/DownloadRestService.svc/GetContentXmlSecure") == Route("manifest", "none")
    assert Endpoint.MANIFEST == "manifest"
    for method in ("CCM_POST", "POST", "HEAD", "PROPFIND"):
        assert classify(method, MANIFEST_PATH) is None, method


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("CCM_POST", f"/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system/request"),
        ("CCM_POST", "/CCM_Proxy_ServerAuth/123/ccm_system/request"),
        ("CCM_POST", f"/CCM_Proxy_MutualAuth/{ROLE_ID}/ccm_system_tokenauth/request"),
        ("CCM_POST", f"/CCM_Proxy_ServerAuth/{ROLE_ID}/CCM_STS"),
        ("CCM_POST", "/CCM_Proxy_ServerAuth/abc/ccm_system_tokenauth/request"),
        ("CCM_POST", "/CCM_Proxy_ServerAuth//ccm_system_tokenauth/request"),
        ("CCM_POST", f"/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system_tokenauth/request/"),
        ("CCM_POST", f"/x/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system_tokenauth/request"),
        ("CCM_POST", f"/CCM_Proxy_ServerAuth/{ROLE_ID}/../1/ccm_system_tokenauth/request"),
        ("CCM_POST", "/../etc/passwd"),
        ("GET", "/../etc/passwd"),
        ("GET", "/downloadrestservice.svc/other"),
        ("GET", "/downloadrestservice.svc/getcontentxmlsecure/"),
        ("GET", "/downloadrestservice.svc/getcontentxmlsecure/../../etc/passwd"),
        ("GET", "/downloadrestservice.svc"),
        ("GET", "/"),
        ("GET", ""),
        ("POST", "/CCM_Proxy_ServerAuth/ServiceMetadata"),
    ],
)
def test_classify_unpublished(method: str, path: str) -> None:
    assert classify(method, path) is None


@pytest.mark.parametrize(
    "path",
    [
        f"/CCM_Proxy_ServerAuth/{ROLE_ID}/ccm_system_tokenauth/request\n",
        "/CCM_Proxy_ServerAuth/\u0661\u0662\u0663/ccm_system_tokenauth/request",  # Arabic-Indic digits
    ],
    ids=["trailing-newline", "non-ascii-digits"],
)
def test_classify_rejects_near_miss_location_paths(path: str) -> None:
    # URL filtering must be exact: only ASCII role IDs and nothing after "request".
    assert classify("CCM_POST", path) is None


def test_manifest_url_quotes_pid_and_cid() -> None:
    url = manifest_url("https://cmg.contoso.com/", "UID:Content_a b/c", "x&y=z#?")
    parts = urlsplit(url)
    assert parts.scheme == "https"
    assert parts.netloc == "cmg.contoso.com"
    assert parts.path == MANIFEST_PATH
    assert parts.fragment == ""
    assert parse_qs(parts.query) == {"pid": ["UID:Content_a b/c"], "cid": ["x&y=z#?"]}
    assert parts.query == "pid=UID%3AContent_a%20b%2Fc&cid=x%26y%3Dz%23%3F"
    assert "+" not in url


def test_manifest_url_simple() -> None:
    expected = "https://cmg.contoso.com:443/downloadrestservice.svc/getcontentxmlsecure?pid=CMG00013&cid=CMG00013"
    assert manifest_url("https://cmg.contoso.com:443", "CMG00013", "CMG00013") == expected
    assert manifest_url("https://cmg.contoso.com:443//", "CMG00013", "CMG00013") == expected
    assert classify("GET", urlsplit(expected).path) == Route("manifest", "none")


# --------------------------------------------------------------------------------------------
# clock and codes
# --------------------------------------------------------------------------------------------


def test_fake_clock_moves_only_when_told() -> None:
    clock = FakeClock(START)
    assert clock.now() == START
    assert clock.now() == START
    assert clock.advance(90) == START + timedelta(seconds=90)
    assert clock.advance(timedelta(hours=1)) == START + timedelta(hours=1, seconds=90)
    assert clock.advance(0.5) == START + timedelta(hours=1, seconds=90.5)
    assert clock.now() == START + timedelta(hours=1, seconds=90.5)


def test_clocks_are_timezone_aware() -> None:
    assert FakeClock().now().tzinfo is not None
    assert SystemClock().now().tzinfo is not None
    assert abs(FakeClock().now() - SystemClock().now()) < timedelta(minutes=1)


def test_codes_match_the_product() -> None:
    assert codes.NO_LOCATIONS == 0x80040102 == 2147746050
    assert codes.NO_LOCATIONS - 2**32 == -2147221246
    assert codes.BAD_HTTP_STATUS == 0x87D0027E
    assert codes.HASH_MISMATCH == 0x80091007
    assert codes.describe(codes.BAD_HTTP_STATUS) == "Bad HTTP status code"
    assert codes.describe(codes.NO_LOCATIONS).startswith("No content locations")
    assert (
        codes.describe(codes.HASH_MISMATCH)
        == "Hash could not be matched for the downloaded content"
    )
    assert codes.describe(0x12345678) == "Unknown error"
    exported = [getattr(codes, name) for name in codes.__all__ if name != "describe"]
    assert len(set(exported)) == len(exported)
    assert all(codes.describe(code) != "Unknown error" for code in exported)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("sv=2021&se=2026-11-22T21%3A00%3A00Z&sig=x", "2026-11-22T21:00:00+00:00"),
        ("se=2026-11-22T21:00Z", "2026-11-22T21:00:00+00:00"),
        ("se=2026-11-23", "2026-11-23T00:00:00+00:00"),
        ("sv=2021&sig=x", None),
        ("se=tomorrow", None),
    ],
)
def test_sas_expiry_reads_se_as_utc(query, expected):
    from datetime import UTC, datetime

    from pytest_cmg._protocol.manifest import sas_expiry

    value = sas_expiry(f"https://account.blob.core.windows.net/c/b.bin?{query}")
    if expected is None:
        assert value is None
    else:
        assert datetime.fromtimestamp(value, UTC).isoformat() == expected
