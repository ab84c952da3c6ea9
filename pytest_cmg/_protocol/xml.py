"""XML parsing for bytes that came over the wire.

The gateway parses what clients send and the client parses what the gateway sends; neither side
may be talked into expanding entities (XXE, billion laughs). Rather than trust the parser's
defaults, any document that declares a DTD or an entity is refused before parsing.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

__all__ = ["parse_untrusted"]

_FORBIDDEN = ("<!DOCTYPE", "<!ENTITY")


def parse_untrusted(text: str) -> ET.Element:
    """Parse ``text`` as one XML element; raises ``ValueError`` for DTDs, entities or bad XML."""
    upper = text.upper()
    for marker in _FORBIDDEN:
        if marker in upper:
            msg = f"document declares {marker[2:]}, which is refused"
            raise ValueError(msg)
    try:
        return ET.fromstring(text)  # noqa: S314 - DTDs and entities were refused above
    except ET.ParseError as exc:
        msg = f"malformed XML ({exc})"
        raise ValueError(msg) from exc
