"""The CCM messaging envelope: how a client talks to a management point through the CMG.

A request is ``CCM_POST .../ccm_system[_tokenauth]/request`` carrying ``multipart/mixed`` with the
product's fixed boundary: part 1 is a UTF-16 ``<Msg>`` header, part 2 the body as zlib-compressed
UTF-16LE XML with a trailing NUL (or plain UTF-16 when compression is off). Replies use the same
envelope (docs/emulation.md, Product reference: "CCM messages and the content location"). Both
the gateway and the client engine build and parse messages here, so the two sides can never
drift apart.

:func:`decode_message` reads untrusted bytes and raises :class:`EnvelopeError` (a ``ValueError``)
for anything malformed, and nothing else: a message over :data:`MAX_MESSAGE_BYTES`, a body that
inflates past :data:`MAX_BODY_BYTES` (a zlib bomb stops there, unread), a header that is not a
small ``<Msg>`` document. :func:`encode_message` refuses (``ValueError``) a message whose parts
would contain the fixed boundary, which the product cannot change and the reader would cut at.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from .._errors import InvalidValueError, PytestCmgError
from .xml import parse_untrusted

__all__ = [
    "BOUNDARY",
    "CCM_CONTENT_TYPE",
    "MAX_BODY_BYTES",
    "MAX_MESSAGE_BYTES",
    "USER_AGENT",
    "CcmMessage",
    "EnvelopeError",
    "decode_message",
    "encode_message",
]

BOUNDARY = "aAbBcCdDv1234567890VxXyYzZ"
CCM_CONTENT_TYPE = f'multipart/mixed; boundary="{BOUNDARY}"'
USER_AGENT = "ConfigMgr Messaging HTTP Sender"
_UTF16_BOM = b"\xff\xfe"
#: The most a body part may hold once inflated, in bytes of UTF-16 (512 Ki characters). A
#: location request or reply is a few KiB; zlib inflates up to 1,032 times, so without this cap
#: a 64 KiB request could become 64 MiB before anything looks at it.
MAX_BODY_BYTES = 1024 * 1024
#: The longest envelope read: an uncompressed body at its cap, with room for the header part.
MAX_MESSAGE_BYTES = MAX_BODY_BYTES + 64 * 1024
#: The ``<Msg>`` header has some 20 elements, 3 levels deep; past 8 levels or 128 elements it
#: is refused while parsing.
_HEADER_MAX_ELEMENTS = 128
_HEADER_MAX_DEPTH = 8


class EnvelopeError(PytestCmgError, ValueError):
    """The bytes are not a well-formed CCM message; the gateway answers 400.

    Also a ``ValueError``, its only base before it joined the one exception tree.
    """


@dataclass
class CcmMessage:
    """One CCM message: a header (as a dict of the ``<Msg>`` child elements) and an XML body."""

    body: str
    target_endpoint: str = "MP_LocationManager"
    reply_to: str = "direct:client:LS_ReplyLocations"
    message_id: str = field(default_factory=lambda: "{" + str(uuid.uuid4()).upper() + "}")
    source_id: str = ""
    source_host: str = "client"
    compressed: bool = True

    def header_xml(self, body_length: int) -> str:
        msg = ET.Element("Msg", SchemaVersion="1.1", ReplyCompression="zlib")
        values = {
            "ID": self.message_id,
            "SourceID": self.source_id,
            "SourceHost": self.source_host,
            "TargetAddress": f"mp:[http]{self.target_endpoint}",
            "ReplyTo": self.reply_to,
            "Priority": "3",
            "Timeout": "600",
            "ReqVersion": "5931",
            "TargetHost": "mp",
            "TargetEndpoint": self.target_endpoint,
            "ReplyMode": "Sync",
            "Protocol": "http",
            "SentTime": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        for name, value in values.items():
            ET.SubElement(msg, name).text = value
        ET.SubElement(msg, "Body", Type="ByteRange", Offset="0", Length=str(body_length))
        if self.compressed:
            hooks = ET.SubElement(msg, "Hooks")
            ET.SubElement(hooks, "Hook3", Name="zlib-compress")
        ET.SubElement(msg, "Payload", Type="inline")
        return ET.tostring(msg, encoding="unicode")


def _encode_body(body: str, *, compressed: bool) -> bytes:
    # The product sends UTF-16LE with a trailing NUL; the NUL is part of what gets compressed.
    raw = (body + "\x00").encode("utf-16-le")
    return zlib.compress(raw) if compressed else _UTF16_BOM + raw


def _inflate(data: bytes) -> bytes:
    """``zlib.decompress`` that stops at :data:`MAX_BODY_BYTES`: one byte more is a refusal."""
    inflater = zlib.decompressobj()
    try:
        raw = inflater.decompress(data, MAX_BODY_BYTES + 1)
    except zlib.error as exc:
        msg = f"body part is not valid zlib data ({exc})"
        raise EnvelopeError(msg) from exc
    if len(raw) > MAX_BODY_BYTES:
        msg = (
            f"body part inflates to more than {MAX_BODY_BYTES} bytes, the most a CCM body may "
            f"hold ({len(data)} compressed bytes; a location request is a few KiB)"
        )
        raise EnvelopeError(msg)
    if not inflater.eof:
        # All input was consumed below the cap without reaching the end of the stream, as
        # zlib.decompress reports "incomplete or truncated stream".
        msg = "body part is a truncated zlib stream (no end-of-stream marker)"
        raise EnvelopeError(msg)
    return raw


def _decode_body(data: bytes, *, compressed: bool) -> str:
    if compressed:
        raw = _inflate(data)
    else:
        raw = data.removeprefix(_UTF16_BOM)
        if len(raw) > MAX_BODY_BYTES:
            msg = f"body part of {len(raw)} bytes is longer than the {MAX_BODY_BYTES} a CCM body may hold"
            raise EnvelopeError(msg)
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        msg = f"body part is not UTF-16LE text ({exc.reason} at byte {exc.start})"
        raise EnvelopeError(msg) from exc
    # Exactly one NUL is the product's terminator (see _encode_body): stripping only that one
    # gives back any body as it was encoded.
    return text.removesuffix("\x00")


def encode_message(message: CcmMessage) -> bytes:
    """Serialise ``message`` as the product's multipart envelope."""
    body = _encode_body(message.body, compressed=message.compressed)
    header = _UTF16_BOM + message.header_xml(len(body)).encode("utf-16-le")
    crlf = b"\r\n"
    boundary = BOUNDARY.encode("ascii")
    for name, part in (("header", header), ("body", body)):
        if b"--" + boundary in part:
            # The boundary is fixed by the product, so it cannot be changed to one the part
            # lacks; sent anyway, the reader would cut the part there.
            msg = (
                f"CCM message {message.message_id}: the {name} part contains the multipart "
                f"delimiter --{BOUNDARY}; change the text that encodes to it"
            )
            raise InvalidValueError(msg)
    return b"".join(
        [
            b"--" + boundary + crlf,
            b"content-type: text/plain; charset=UTF-16" + crlf + crlf,
            header + crlf,
            b"--" + boundary + crlf,
            b"content-type: application/octet-stream" + crlf + crlf,
            body + crlf,
            b"--" + boundary + b"--" + crlf,
        ]
    )


def _split_parts(data: bytes) -> list[tuple[dict[str, str], bytes]]:
    delimiter = b"--" + BOUNDARY.encode("ascii")
    chunks = data.split(delimiter)
    # chunks[0] is the preamble, the last one starts with "--" (the close delimiter).
    if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
        msg = f"not a multipart message with boundary {BOUNDARY!r}"
        raise EnvelopeError(msg)
    parts = []
    for chunk in chunks[1:-1]:
        head, sep, payload = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            msg = "multipart part without a header block"
            raise EnvelopeError(msg)
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, payload.removesuffix(b"\r\n")))
    return parts


def decode_message(data: bytes) -> CcmMessage:
    """Parse a multipart envelope; raises :class:`EnvelopeError` on any malformation."""
    if len(data) > MAX_MESSAGE_BYTES:
        msg = f"message of {len(data)} bytes is longer than the {MAX_MESSAGE_BYTES} a CCM message may have"
        raise EnvelopeError(msg)
    parts = _split_parts(data)
    if len(parts) != 2:
        msg = f"expected 2 parts (header, body), found {len(parts)}"
        raise EnvelopeError(msg)
    (_, header_bytes), (_, body_bytes) = parts
    try:
        header_text = header_bytes.removeprefix(_UTF16_BOM).decode("utf-16-le")
    except UnicodeDecodeError as exc:
        msg = f"header part is not UTF-16 text ({exc.reason} at byte {exc.start})"
        raise EnvelopeError(msg) from exc
    try:
        header = parse_untrusted(
            header_text, root="Msg", max_elements=_HEADER_MAX_ELEMENTS, max_depth=_HEADER_MAX_DEPTH
        )
    except ValueError as exc:
        msg = f"header is not a <Msg> document ({exc})"
        raise EnvelopeError(msg) from exc
    compressed = header.find("Hooks/Hook3[@Name='zlib-compress']") is not None
    return CcmMessage(
        body=_decode_body(body_bytes, compressed=compressed),
        target_endpoint=header.findtext("TargetEndpoint", ""),
        reply_to=header.findtext("ReplyTo", ""),
        message_id=header.findtext("ID", ""),
        source_id=header.findtext("SourceID", ""),
        source_host=header.findtext("SourceHost", ""),
        compressed=compressed,
    )
