"""Property-based tests of the parsers that read untrusted input (issue 10, item 2 and part 6).

For each parser: arbitrary and mutated input yields its documented error type or a valid
result, never another exception (RecursionError, UnicodeError, OverflowError, MemoryError...);
encoding then decoding gives back the same value; deep nesting and oversize input are refused
quickly and without growing memory. The parsers and their error types:

* ``ccm.decode_message``: :class:`EnvelopeError`;
* ``ContentLocationRequest.from_xml`` (and ``ContentLocationReply.from_xml``): ``ValueError``;
* ``SiteAuthority.verify_ccm_token``, ``AzureADDirectory.verify``, ``verify_access``:
  :class:`TokenRejected` (``is_azure_ad_token`` never raises);
* ``ManifestQuery.parse``: ``ValueError``.

Each property has a bounded number of examples and a deadline, so the file runs in seconds.
"""

from __future__ import annotations

import base64
import json
import math
import time
import tracemalloc
import zlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pytest_cmg._gateway.tokens import (
    AAD_RESOURCE,
    AUDIENCE,
    AzureADDirectory,
    AzureADTenant,
    SiteAuthority,
    TokenRejected,
    is_azure_ad_token,
)
from pytest_cmg._protocol import location
from pytest_cmg._protocol.ccm import (
    BOUNDARY,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from pytest_cmg._protocol.clock import FakeClock
from pytest_cmg._protocol.location import ContentLocationReply, ContentLocationRequest
from pytest_cmg._protocol.xml import parse_untrusted

if TYPE_CHECKING:
    from collections.abc import Callable

START = datetime(2024, 5, 1, 8, 0, 0, tzinfo=UTC)
NOW = START.timestamp()
CLIENT_ID = "GUID:3fb5cf5d-1111-2222-3333-444455556666"

#: Fast properties (pure parsing): many examples, a deadline well above one example's cost.
FAST = settings(
    max_examples=300,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: Properties that sign with RSA per example.
SIGNING = settings(
    max_examples=120,
    deadline=timedelta(milliseconds=1000),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
#: How long refusing one hostile input may take. Generous for two shared cores; what it guards
#: against is parsing a 5,000-deep or 64 MiB input in full, which takes far longer or crashes.
#: How many times the CPU of reading a benign document a refusal may cost. Measured: every
#: refusal here costs at most 0.6 times; the 200,000-element flood read to its end instead (the
#: element bound turned off) costs 14 times, and with xml.dom.minidom 30 times.
QUICK_RATIO = 5.0

# One key per role for the whole module: generating RSA keys is the slow part.
SITE_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
CLOCK = FakeClock(START)
AUTHORITY = SiteAuthority(
    clock=CLOCK, site_guid="11111111-2222-3333-4444-555555555555", key=SITE_KEY
)
TENANT = AzureADTenant(clock=CLOCK, tenant_id="99999999-8888-7777-6666-555555555555")
TENANT.keys = {"kid-1": SITE_KEY}
TENANT.kid = "kid-1"
DIRECTORY = AzureADDirectory(clock=CLOCK)
DIRECTORY.onboard(TENANT)


# --- helpers and strategies -------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_json(value: object) -> str:
    return _b64url(json.dumps(value, separators=(",", ":")).encode())


def _sign_jwt(key: rsa.RSAPrivateKey, header: object, claims: object) -> str:
    signing_input = _b64url_json(header) + "." + _b64url_json(claims)
    signature = key.sign(signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256())
    return signing_input + "." + _b64url(signature)


def _deep_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _deep_token(depth: int) -> str:
    segment = _b64url(_deep_json(depth))
    return f"{segment}.{segment}.{_b64url(b'sig')}"


#: Characters XML 1.0 can hold, as ElementTree writes them: no surrogates, no controls other
#: than tab and newline (a carriage return in text is read back as a newline), no U+FFFE/FFFF.
XML_CHAR = st.characters(
    blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff"
) | st.sampled_from("\t\n")
XML_TEXT = st.text(XML_CHAR, max_size=40)
#: Any JSON value Python's json module writes, NaN and infinities included.
JSON_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**300, max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
JSON_VALUE = st.recursive(
    JSON_SCALAR,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """``original`` after a few byte-level edits: flips, insertions, deletions, cuts, copies."""
    data = bytearray(original)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "duplicate", "splice"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
        elif op == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        else:
            data[at:at] = draw(
                st.sampled_from([b"--" + BOUNDARY.encode(), b"\r\n\r\n", b"\x00", b"<", b"&", b"%"])
            )
    return bytes(data)


def _mutated_text(original: str) -> st.SearchStrategy[str]:
    return mutated(original.encode("utf-8")).map(
        lambda data: data.decode("utf-8", "surrogateescape")
    )


def _cpu_seconds(action: Callable[[], object]) -> float:
    """This thread's CPU seconds for ``action()``, best of three: other processes on the machine
    do not count (wall time under a loaded CI worker measured 1 s for a 0.2 s refusal)."""
    best = float("inf")
    for _ in range(3):
        started = time.thread_time()
        action()
        best = min(best, time.thread_time() - started)
    return best


#: A benign document read in full (20,000 elements, 160 KB): the baseline a refusal is held
#: against, measured in the same process, so the bound scales with the machine.
_BENIGN = "<a>" + "<b>x</b>" * 20_000 + "</a>"


def assert_refused_quickly(refusal: Callable[[], object]) -> None:
    """``refusal`` (which raises what the test expects, caught inside it) costs at most
    :data:`QUICK_RATIO` times reading :data:`_BENIGN`: a bound that acts late, or a parser that
    recurses or inflates first, costs hundreds of times more."""
    baseline = _cpu_seconds(lambda: parse_untrusted(_BENIGN, root="a"))
    spent = _cpu_seconds(refusal)
    assert spent <= QUICK_RATIO * baseline, (
        f"the refusal took {spent * 1000:.1f} ms of CPU, {spent / baseline:.0f} times reading a "
        f"benign 160 KB document ({baseline * 1000:.2f} ms); the bound is {QUICK_RATIO:g} times"
    )


def _bounded_peak(action: object) -> tuple[float, int]:
    """Seconds and peak traced bytes of ``action()``."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        action()  # type: ignore[operator]
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return elapsed, peak


# --- CCM envelope ---------------------------------------------------------------------------

_REQUEST_XML = ContentLocationRequest("PS100012", 3, "PS1").to_xml()
_VALID_COMPRESSED = encode_message(CcmMessage(body=_REQUEST_XML))
_VALID_PLAIN = encode_message(CcmMessage(body=_REQUEST_XML, compressed=False))


def _decodes_or_refuses(data: bytes) -> None:
    try:
        message = decode_message(data)
    except EnvelopeError:
        return
    assert isinstance(message, CcmMessage)
    assert isinstance(message.body, str)


@FAST
@given(st.binary(max_size=2048))
def test_decode_message_arbitrary_bytes(data: bytes) -> None:
    _decodes_or_refuses(data)


@FAST
@given(st.one_of(mutated(_VALID_COMPRESSED), mutated(_VALID_PLAIN)))
def test_decode_message_mutated(data: bytes) -> None:
    _decodes_or_refuses(data)


@FAST
@given(
    header=st.one_of(
        st.binary(max_size=300), XML_TEXT.map(lambda t: b"\xff\xfe" + t.encode("utf-16-le"))
    ),
    body=st.one_of(st.binary(max_size=300), st.binary(max_size=300).map(zlib.compress)),
    compressed=st.booleans(),
)
def test_decode_message_well_framed_garbage(header: bytes, body: bytes, compressed: bool) -> None:
    """The framing is right, the parts are not: each part's own decoder must refuse it."""
    hooks = '<Hooks><Hook3 Name="zlib-compress"/></Hooks>' if compressed else ""
    header = header or (b"\xff\xfe" + f"<Msg><ID>x</ID>{hooks}</Msg>".encode("utf-16-le"))
    delimiter = b"--" + BOUNDARY.encode()
    data = (
        delimiter
        + b"\r\ncontent-type: text/plain\r\n\r\n"
        + header
        + b"\r\n"
        + delimiter
        + b"\r\ncontent-type: application/octet-stream\r\n\r\n"
        + body
        + b"\r\n"
        + delimiter
        + b"--\r\n"
    )
    _decodes_or_refuses(data)


@FAST
@given(
    body=st.text(st.characters(blacklist_categories=("Cs",)), max_size=200),
    message_id=XML_TEXT,
    source_id=XML_TEXT,
    source_host=XML_TEXT,
    target=XML_TEXT,
    reply_to=XML_TEXT,
    compressed=st.booleans(),
)
@example(
    body="<a/>\x00",
    message_id="{1}",
    source_id="",
    source_host="h",
    target="t",
    reply_to="r",
    compressed=True,
)
def test_ccm_message_round_trips(
    body: str,
    message_id: str,
    source_id: str,
    source_host: str,
    target: str,
    reply_to: str,
    compressed: bool,
) -> None:
    message = CcmMessage(
        body=body,
        target_endpoint=target,
        reply_to=reply_to,
        message_id=message_id,
        source_id=source_id,
        source_host=source_host,
        compressed=compressed,
    )
    assert decode_message(encode_message(message)) == message


def test_encode_message_refuses_a_body_holding_the_boundary() -> None:
    # The boundary is fixed; a part holding it would be cut there by every reader.
    body = ("--" + BOUNDARY).encode("ascii").decode("utf-16-le")  # UTF-16LE text of those bytes
    with pytest.raises(ValueError, match="delimiter"):
        encode_message(CcmMessage(body=body, compressed=False))


def _bomb(inflated: int) -> bytes:
    """A zlib stream of ``inflated`` zero bytes, built without holding them in memory."""
    deflater = zlib.compressobj(9)
    chunk = b"\x00" * (1024 * 1024)
    parts = [deflater.compress(chunk) for _ in range(inflated // len(chunk))]
    return b"".join([*parts, deflater.flush()])


def test_zlib_bomb_is_refused_without_inflating_it() -> None:
    bomb = _bomb(64 * 1024 * 1024)  # 64 MiB of zeros in some 64 KiB: the gateway's body limit
    assert len(bomb) <= 70 * 1024
    header = CcmMessage(body="").header_xml(len(bomb)).encode("utf-16-le")
    delimiter = b"--" + BOUNDARY.encode()
    data = (
        delimiter
        + b"\r\ncontent-type: text/plain\r\n\r\n\xff\xfe"
        + header
        + b"\r\n"
        + delimiter
        + b"\r\ncontent-type: application/octet-stream\r\n\r\n"
        + bomb
        + b"\r\n"
        + delimiter
        + b"--\r\n"
    )
    caught: list[BaseException] = []

    def decode() -> None:
        try:
            decode_message(data)
        except EnvelopeError as exc:
            caught.append(exc)

    _, peak = _bounded_peak(decode)
    assert caught, "a 64 MiB zlib bomb was decoded instead of refused"
    assert "inflates to more than" in str(caught[0])
    assert_refused_quickly(decode)
    assert peak < 8 * 1024 * 1024, f"refusing the bomb still allocated {peak} bytes"


def test_deep_or_oversize_envelopes_are_refused_quickly() -> None:
    deep_header = "<Msg>" + "<x>" * 5000 + "</x>" * 5000 + "</Msg>"
    delimiter = b"--" + BOUNDARY.encode()
    deep = (
        delimiter
        + b"\r\ncontent-type: text/plain\r\n\r\n\xff\xfe"
        + deep_header.encode("utf-16-le")
        + b"\r\n"
        + delimiter
        + b"\r\ncontent-type: application/octet-stream\r\n\r\n\xff\xfe<\x00a\x00/\x00>\x00\r\n"
        + delimiter
        + b"--\r\n"
    )
    oversize = delimiter + b"\r\n" + b"x" * (4 * 1024 * 1024) + b"\r\n" + delimiter + b"--\r\n"
    for data, fragment in ((deep, "deep"), (oversize, "longer than")):

        def refuse(data: bytes = data, fragment: str = fragment) -> None:
            with pytest.raises(EnvelopeError, match=fragment):
                decode_message(data)

        assert_refused_quickly(refuse)


# --- ContentLocationRequest and Reply ---------------------------------------------------------


def _request_or_refusal(text: str) -> None:
    try:
        request = ContentLocationRequest.from_xml(text)
    except ValueError:
        return
    assert isinstance(request.version, int)
    assert isinstance(request.package_id, str)


@FAST
@given(st.text(max_size=400))
def test_location_request_arbitrary_text(text: str) -> None:
    _request_or_refusal(text)


@FAST
@given(_mutated_text(_REQUEST_XML))
def test_location_request_mutated(text: str) -> None:
    _request_or_refusal(text)


@FAST
@given(
    version=st.one_of(
        st.text(max_size=12),
        st.integers().map(str),
        st.sampled_from(["\u0661", " 7", "7_0", "9" * 5000]),
    ),
    package_id=st.text(max_size=20),
    site=st.text(max_size=8),
)
def test_location_request_odd_attribute_values(version: str, package_id: str, site: str) -> None:
    """Built from the grammar with any attribute text: reach the attribute checks, not only
    the XML parser. A Version that is not plain ASCII digits is refused, never half-read."""
    from xml.etree import ElementTree as ET

    root = ET.Element("ContentLocationRequest")
    try:
        ET.SubElement(root, "Package", ID=package_id, Version=version)
        ET.SubElement(root, "AssignedSite", SiteCode=site)
        ET.SubElement(root, "ClientLocationInfo", UseAzure="1")
        text = ET.tostring(root, encoding="unicode")
    except ValueError:
        return
    try:
        request = ContentLocationRequest.from_xml(text)
    except ValueError:
        return
    assert str(request.version) == version


@FAST
@given(
    package_id=XML_TEXT,
    version=st.integers(min_value=-(10**10) + 1, max_value=10**10 - 1),
    site_code=XML_TEXT,
    use_azure=st.booleans(),
    use_internet_dp=st.booleans(),
    location_type=XML_TEXT,
)
def test_location_request_round_trips(
    package_id: str,
    version: int,
    site_code: str,
    use_azure: bool,
    use_internet_dp: bool,
    location_type: str,
) -> None:
    request = ContentLocationRequest(
        package_id,
        version,
        site_code,
        use_azure=use_azure,
        use_internet_dp=use_internet_dp,
        location_type=location_type,
    )
    assert ContentLocationRequest.from_xml(request.to_xml()) == request


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("<x>" * 5000 + "</x>" * 5000, "deep"),
        ("<x/>" * 200_000, "elements"),
    ],
    ids=["5000-deep", "200000-elements"],
)
def test_location_request_deep_or_flooded_is_refused_quickly(extra: str, fragment: str) -> None:
    # Valid otherwise: the refusal can only come from the bounds.
    text = _REQUEST_XML.replace("</ContentLocationRequest>", extra + "</ContentLocationRequest>")

    def refuse() -> None:
        with pytest.raises(ValueError, match=fragment):
            ContentLocationRequest.from_xml(text)

    assert_refused_quickly(refuse)


def test_location_request_entities_and_surrogates_are_value_errors() -> None:
    laughs = '<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaa">]><ContentLocationRequest>&a;</ContentLocationRequest>'
    with pytest.raises(ValueError, match="DOCTYPE"):
        ContentLocationRequest.from_xml(laughs)
    with pytest.raises(ValueError, match="surrogate"):
        ContentLocationRequest.from_xml(_REQUEST_XML.replace('SiteCode="PS1"', 'SiteCode="\ud800"'))


@FAST
@given(st.text(max_size=400))
def test_location_reply_arbitrary_text(text: str) -> None:
    try:
        ContentLocationReply.from_xml(text)
    except ValueError:
        pass


# --- site CCM tokens --------------------------------------------------------------------------


def _site_verdict(token: str, *, for_registration: bool = False) -> dict[str, object] | None:
    """The claims of an accepted token (checked for sanity), None for a refused one."""
    try:
        claims = AUTHORITY.verify_ccm_token(token, for_registration=for_registration)
    except TokenRejected as exc:
        assert exc.reason
        return None
    # An accepted token is inside its window with real numbers: NaN or a string would compare
    # false both ways and never expire.
    exp = claims.get("exp", 0)
    assert isinstance(exp, int | float) and not isinstance(exp, bool) and math.isfinite(exp)
    assert NOW < exp
    nbf = claims.get("nbf", 0)
    assert isinstance(nbf, int | float) and not isinstance(nbf, bool) and nbf <= NOW
    assert isinstance(claims["UniqueId"], str)
    return claims


@FAST
@given(st.text(max_size=300))
def test_site_token_arbitrary_text(token: str) -> None:
    assert _site_verdict(token) is None
    assert isinstance(is_azure_ad_token(token), bool)


@FAST
@given(header=JSON_VALUE, claims=JSON_VALUE, signature=st.binary(max_size=300))
def test_site_token_arbitrary_json_segments(
    header: object, claims: object, signature: bytes
) -> None:
    token = f"{_b64url_json(header)}.{_b64url_json(claims)}.{_b64url(signature)}"
    assert _site_verdict(token) is None
    assert isinstance(is_azure_ad_token(token), bool)


@FAST
@given(_mutated_text(AUTHORITY.issue_ccm_token(CLIENT_ID)))
def test_site_token_mutated(token: str) -> None:
    claims = _site_verdict(token)
    assert claims is None or claims["UniqueId"] == CLIENT_ID


@SIGNING
@given(
    nbf=st.one_of(st.none(), JSON_SCALAR, st.just(NOW - 60)),
    exp=st.one_of(st.none(), JSON_SCALAR, st.just(NOW + 3600)),
    token_type=st.sampled_from(["ClientToken", "BulkRegistration", None]),
    unique_id=st.one_of(st.just(CLIENT_ID), JSON_VALUE),
    extra=st.dictionaries(st.text(max_size=8), JSON_VALUE, max_size=3),
)
@example(nbf=None, exp="tomorrow", token_type=None, unique_id=CLIENT_ID, extra={})
@example(nbf=None, exp=10**400, token_type=None, unique_id=CLIENT_ID, extra={})
@example(nbf=None, exp=float("nan"), token_type=None, unique_id=CLIENT_ID, extra={})
@example(nbf=[1], exp=NOW + 3600, token_type=None, unique_id=CLIENT_ID, extra={})
@example(nbf=None, exp=NOW + 3600, token_type="BulkRegistration", unique_id=["x"], extra={})
def test_site_token_signed_by_the_site_with_any_claims(
    nbf: object,
    exp: object,
    token_type: str | None,
    unique_id: object,
    extra: dict[str, object],
) -> None:
    """Past the signature, claim values are still data to check, not to trust to float() or
    to a set lookup (a list UniqueId on a bulk token was a TypeError)."""
    claims: dict[str, object] = {**extra, "aud": AUDIENCE, "iss": AUTHORITY.issuer}
    for name, value in (("nbf", nbf), ("exp", exp), ("Type", token_type), ("UniqueId", unique_id)):
        if value is not None:
            claims[name] = value
    token = _sign_jwt(SITE_KEY, {"alg": "RS256"}, claims)
    _site_verdict(token)
    _site_verdict(token, for_registration=True)


@SIGNING
@given(client_id=st.text(max_size=64), lifetime=st.integers(min_value=1, max_value=10**6))
def test_site_token_round_trips(client_id: str, lifetime: int) -> None:
    token = AUTHORITY.issue_ccm_token(client_id, lifetime=timedelta(seconds=lifetime))
    claims = _site_verdict(token)
    assert claims is not None
    assert claims["UniqueId"] == client_id
    assert is_azure_ad_token(token) is False


@pytest.mark.parametrize("depth", [20, 2000, 5000])
def test_deeply_nested_tokens_are_refused_quickly(depth: int) -> None:
    """Issue 10 item 2: a JWT nesting JSON 5,000 deep was a RecursionError (answered 500)."""
    token = _deep_token(depth)
    for verify in (AUTHORITY.verify_ccm_token, DIRECTORY.verify):

        def refuse(verify: Callable[[str], object] = verify) -> None:
            with pytest.raises(TokenRejected):
                verify(token)

        assert_refused_quickly(refuse)
    assert is_azure_ad_token(token) is False


def test_deep_claims_behind_a_valid_header_are_refused() -> None:
    # An Azure AD-looking header and 5,000 levels in the claims only: is_azure_ad_token reads
    # the claims first and must not recurse either.
    token = f"{_b64url_json({'alg': 'RS256', 'kid': 'kid-1'})}.{_b64url(_deep_json(5000))}.{_b64url(b'x')}"
    assert is_azure_ad_token(token) is False
    with pytest.raises(TokenRejected):
        AUTHORITY.verify_ccm_token(token)
    with pytest.raises(TokenRejected):
        DIRECTORY.verify(token)


@pytest.mark.parametrize(
    ("token", "fragment"),
    [
        ("e30." * 2 + "x" * (64 * 1024), "longer than"),
        ("e30.e30!.", "base64url"),  # lenient decoding would drop the "!" and read {}
        ("e30=.e30.", "base64url"),  # padding is not part of a JWT
        (
            _b64url(b"\xff\xfe{\x00}\x00") + ".e30.",
            "UTF-8",
        ),  # UTF-16 JSON: json.loads would read it
        ("e30.e30.e30.e30", "three-part"),
        (_b64url_json({"alg": "RS256"}) + "." + _b64url(b"[" * 9 + b"]" * 9) + ".", "levels deep"),
    ],
    ids=["oversize", "bad-base64", "padded", "utf16-json", "four-segments", "nine-deep"],
)
def test_malformed_site_tokens_name_the_rule(token: str, fragment: str) -> None:
    with pytest.raises(TokenRejected) as info:
        AUTHORITY.verify_ccm_token(token)
    assert fragment in info.value.reason


# --- Azure AD tokens --------------------------------------------------------------------------


def _aad_verdict(token: str) -> dict[str, object] | None:
    try:
        claims = DIRECTORY.verify(token)
    except TokenRejected as exc:
        assert exc.reason
        return None
    assert claims["tid"] == TENANT.tenant_id and claims["deviceid"]
    exp, nbf = claims["exp"], claims["nbf"]
    assert isinstance(exp, int | float) and math.isfinite(exp) and NOW - 300 < exp
    assert isinstance(nbf, int | float) and math.isfinite(nbf) and nbf <= NOW + 300
    return claims


@FAST
@given(header=JSON_VALUE, claims=JSON_VALUE, signature=st.binary(max_size=300))
def test_aad_token_arbitrary_json_segments(
    header: object, claims: object, signature: bytes
) -> None:
    token = f"{_b64url_json(header)}.{_b64url_json(claims)}.{_b64url(signature)}"
    assert _aad_verdict(token) is None


@FAST
@given(_mutated_text(TENANT.issue_device_token("device-1")))
def test_aad_token_mutated(token: str) -> None:
    claims = _aad_verdict(token)
    assert claims is None or claims["deviceid"] == "device-1"
    assert isinstance(is_azure_ad_token(token), bool)


@SIGNING
@given(
    nbf=st.one_of(st.none(), JSON_SCALAR, st.just(NOW)),
    exp=st.one_of(st.none(), JSON_SCALAR, st.just(NOW + 3600)),
    device_id=st.one_of(JSON_SCALAR, st.just("device-1")),
    kid=st.one_of(st.just("kid-1"), JSON_SCALAR),
)
@example(nbf=NOW, exp=10**400, device_id="d", kid="kid-1")
@example(nbf=float("nan"), exp=float("inf"), device_id="d", kid="kid-1")
@example(nbf="now", exp=NOW + 3600, device_id="d", kid="kid-1")
def test_aad_token_signed_by_the_tenant_with_any_claims(
    nbf: object, exp: object, device_id: object, kid: object
) -> None:
    claims: dict[str, object] = {
        "aud": AAD_RESOURCE,
        "iss": TENANT.issuer,
        "tid": TENANT.tenant_id,
        "deviceid": device_id,
    }
    for name, value in (("nbf", nbf), ("exp", exp)):
        if value is not None:
            claims[name] = value
    _aad_verdict(_sign_jwt(SITE_KEY, {"alg": "RS256", "kid": kid}, claims))


@SIGNING
@given(device_id=st.text(min_size=1, max_size=64))
def test_aad_token_round_trips(device_id: str) -> None:
    token = TENANT.issue_device_token(device_id)
    assert is_azure_ad_token(token) is True
    claims = _aad_verdict(token)
    assert claims is not None
    assert claims["deviceid"] == device_id


# --- content access token (the manifest request's signature) --------------------------------


@FAST
@given(
    fields=st.lists(st.text(max_size=30), min_size=6, max_size=6),
    signature=st.one_of(st.text(max_size=400), st.binary(max_size=300).map(_b64url)),
)
@example(
    fields=["PS1", "PS1", "\ud800", "i", "2024-05-01T08:00:00", "2024-05-01T16:00:00"],
    signature="AAAA",
)
@example(fields=["PS1"] * 6, signature="A" * (64 * 1024))
def test_verify_access_any_fields(fields: list[str], signature: str) -> None:
    try:
        end = AUTHORITY.verify_access(*fields, signature)
    except TokenRejected as exc:
        assert exc.reason
        return
    assert end.timestamp() > NOW


# --- ManifestQuery ----------------------------------------------------------------------------

#: A value as the client sends it: printable text (no controls, no lone surrogates).
PRINTABLE = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=256)
CONTENT_ID = st.from_regex(r"[A-Za-z0-9_.:{}-]{1,128}", fullmatch=True)
NAMES = ("pid", "cid", "tid", "iss", "alg", "st", "et")


def _query_or_refusal(query: str) -> None:
    try:
        parsed = location.ManifestQuery.parse(query)
    except ValueError:
        return
    for name in NAMES:
        value = getattr(parsed, name)
        assert value and len(value) <= 256
    assert location.is_content_id(parsed.pid)


@FAST
@given(st.text(max_size=400))
def test_manifest_query_arbitrary_text(query: str) -> None:
    _query_or_refusal(query)


@st.composite
def _grammar_query(draw: st.DrawFn) -> str:
    """A query made of the real names (some repeated or missing) and hostile values."""
    value = st.one_of(
        st.text(max_size=20),
        st.sampled_from(
            ["%", "%z", "%zz", "%ff", "%ed%a0%80", "%00", "%0a", "+", "%2B", "a" * 300]
        ),
        CONTENT_ID,
    )
    pairs = draw(
        st.lists(st.tuples(st.sampled_from([*NAMES, "x", "", "pid "]), value), max_size=12)
    )
    separator = draw(st.sampled_from(["&", ";", "&&"]))
    return separator.join(f"{name}={text}" for name, text in pairs)


@FAST
@given(_grammar_query())
def test_manifest_query_from_the_grammar(query: str) -> None:
    _query_or_refusal(query)


@FAST
@given(
    pid=CONTENT_ID,
    cid=PRINTABLE,
    tid=PRINTABLE,
    iss=PRINTABLE,
    alg=PRINTABLE,
    st_=PRINTABLE,
    et=PRINTABLE,
)
def test_manifest_query_round_trips(
    pid: str, cid: str, tid: str, iss: str, alg: str, st_: str, et: str
) -> None:
    query = location.ManifestQuery(pid, cid, tid, iss, alg, st_, et)
    assert location.ManifestQuery.parse(query.encode()) == query


@FAST
@given(
    st.builds(
        lambda pid, rest: location.ManifestQuery(pid, *rest).encode(),
        CONTENT_ID,
        st.lists(st.text(max_size=12, alphabet="ab%+&= "), min_size=6, max_size=6),
    ).flatmap(_mutated_text)
)
def test_manifest_query_mutated(query: str) -> None:
    _query_or_refusal(query)


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("pid=PS1&" + "x=&" * 1000, "fields"),
        ("pid=" + "A" * (1024 * 1024), "longer than"),
        ("pid=PS1&cid=c&tid=%zz&iss=i&alg=a&st=s&et=e", "'%'"),
        ("pid=PS1&cid=c&tid=%ff&iss=i&alg=a&st=s&et=e", "UTF-8"),
        ("pid=PS1&cid=c&tid=a%0Ab&iss=i&alg=a&st=s&et=e", r"U\+000A"),
        ("pid=PS1&cid=c&tid=\udcff&iss=i&alg=a&st=s&et=e", "surrogate"),
    ],
    ids=["1000-fields", "1MiB", "bad-escape", "not-utf8", "newline", "surrogate"],
)
def test_malformed_manifest_queries_are_refused_quickly(query: str, fragment: str) -> None:

    def refuse() -> None:
        with pytest.raises(ValueError, match=fragment):
            location.ManifestQuery.parse(query)

    assert_refused_quickly(refuse)


@given(st.integers(min_value=-(10**9), max_value=10**9))
@example(91 * 86400 * 1000)
@example(2500)
def test_a_shown_duration_reads_back_as_the_same_seconds(millis: int) -> None:
    # Failure messages show virtual time as a scenario writes it (91d, not 7.8624e+06s); what
    # they show must be a duration the language reads back to the same value.
    from pytest_cmg._scenario.spec import parse_duration, show_seconds

    seconds = millis / 1000
    shown = show_seconds(seconds)
    assert parse_duration(shown) == seconds, shown
