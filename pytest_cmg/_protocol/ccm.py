"""The CCM messaging envelope: how a client talks to a management point through the CMG.

A request is ``CCM_POST .../ccm_system[_tokenauth]/request`` carrying ``multipart/mixed`` with the
product's fixed boundary: part 1 is a UTF-16 ``<Msg>`` header, part 2 the body as zlib-compressed
UTF-16LE XML with a trailing NUL (or plain UTF-16 when compression is off). Replies use the same
envelope (protocol.md section 1.2). Both the gateway and the client engine build and parse messages
here, so the two sides can never drift apart.
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from xml.etree import ElementTree as ET

from .xml import parse_untrusted

__all__ = [
    "BOUNDARY",
    "CCM_CONTENT_TYPE",
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


class EnvelopeError(ValueError):
    """The bytes are not a well-formed CCM message; the gateway answers 400."""


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


def _decode_body(data: bytes, *, compressed: bool) -> str:
    if compressed:
        try:
            raw = zlib.decompress(data)
        except zlib.error as exc:
            msg = f"body part is not valid zlib data ({exc})"
            raise EnvelopeError(msg) from exc
    else:
        raw = data.removeprefix(_UTF16_BOM)
    try:
        text = raw.decode("utf-16-le")
    except UnicodeDecodeError as exc:
        msg = f"body part is not UTF-16LE text ({exc})"
        raise EnvelopeError(msg) from exc
    return text.rstrip("\x00")


def encode_message(message: CcmMessage) -> bytes:
    """Serialise ``message`` as the product's multipart envelope."""
    body = _encode_body(message.body, compressed=message.compressed)
    header = _UTF16_BOM + message.header_xml(len(body)).encode("utf-16-le")
    crlf = b"\r\n"
    boundary = BOUNDARY.encode("ascii")
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
    parts = _split_parts(data)
    if len(parts) != 2:
        msg = f"expected 2 parts (header, body), found {len(parts)}"
        raise EnvelopeError(msg)
    (_, header_bytes), (_, body_bytes) = parts
    try:
        header_text = header_bytes.removeprefix(_UTF16_BOM).decode("utf-16-le")
    except UnicodeDecodeError as exc:
        msg = f"header part is not UTF-16 text ({exc})"
        raise EnvelopeError(msg) from exc
    try:
        header = parse_untrusted(header_text)
    except ValueError as exc:
        msg = f"header is not a <Msg> document ({exc})"
        raise EnvelopeError(msg) from exc
    if header.tag != "Msg":
        msg = f"header root is <{header.tag}>, expected <Msg>"
        raise EnvelopeError(msg)
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
