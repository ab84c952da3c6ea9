"""XML parsing for bytes that came over the wire.

The gateway parses what clients send and the client parses what the gateway sends; neither side
may be talked into expanding entities (XXE, billion laughs). Rather than trust the parser's
defaults, any document that declares a DTD or an entity is refused before parsing.

Size is bounded too: a document longer than :data:`MAX_XML_CHARS`, nesting deeper than
:data:`MAX_XML_DEPTH` or holding more than :data:`MAX_XML_ELEMENTS` elements is refused, the
last two while parsing (the text is fed in slices and checked after each), so a hostile
document costs at most one slice more than the bounds allow.
"""

from __future__ import annotations

from xml.etree import ElementTree as ET

from .._errors import InvalidValueError

__all__ = ["MAX_XML_CHARS", "MAX_XML_DEPTH", "MAX_XML_ELEMENTS", "parse_untrusted"]

_FORBIDDEN = ("<!DOCTYPE", "<!ENTITY")
#: The longest document read, in characters. The largest real one is a content manifest:
#: about 500 characters per file with its SAS URL, so 16 Mi is some 30,000 files.
MAX_XML_CHARS = 16 * 1024 * 1024
#: The deepest element nesting read. A ContentLocationReply, the deepest document of the
#: protocol, goes 6 levels down (Sites/Site/LocationRecords/LocationRecord/Capabilities/Property).
MAX_XML_DEPTH = 32
#: The most elements read: a manifest has one per file; nothing else comes near.
MAX_XML_ELEMENTS = 100_000
#: How much text is parsed between two checks of depth and element count.
_SLICE = 64 * 1024


def parse_untrusted(
    text: str,
    *,
    root: str | None = None,
    max_chars: int = MAX_XML_CHARS,
    max_depth: int = MAX_XML_DEPTH,
    max_elements: int = MAX_XML_ELEMENTS,
) -> ET.Element:
    """Parse ``text`` as one XML element; raises ``ValueError`` (and nothing else) for DTDs,
    entities, bad XML, characters XML cannot hold, a document past one of the bounds, or, when
    ``root`` is given, a root element of another name (every reader of the protocol checks it,
    so the check and its message are written once, here)."""
    if len(text) > max_chars:
        msg = (
            f"document of {len(text)} characters is longer than the {max_chars} an untrusted "
            "XML document may have"
        )
        raise InvalidValueError(msg)
    upper = text.upper()
    for marker in _FORBIDDEN:
        if marker in upper:
            msg = f"document declares {marker[2:]}, which is refused"
            raise InvalidValueError(msg)
    parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
    top: ET.Element | None = None
    depth = elements = offset = 0
    try:
        for offset in range(0, len(text), _SLICE):
            parser.feed(text[offset : offset + _SLICE])
            for item in parser.read_events():
                # Only "start" and "end" were asked for: each is (event, element).
                event, element = item[0], item[-1]
                if event == "end":
                    depth -= 1
                    continue
                if not isinstance(element, ET.Element):
                    continue
                top = element if top is None else top
                depth += 1
                elements += 1
                if depth > max_depth:
                    msg = f"elements nest more than {max_depth} deep (element {elements})"
                    raise InvalidValueError(msg)
                if elements > max_elements:
                    msg = f"document holds more than {max_elements} elements"
                    raise InvalidValueError(msg)
        parser.close()
    except ET.ParseError as exc:
        msg = f"malformed XML ({exc})"
        raise InvalidValueError(msg) from exc
    except UnicodeEncodeError as exc:
        # A lone surrogate: the parser encodes its input as UTF-8 first, and XML has no way
        # to hold one.
        msg = f"character {offset + exc.start} is a lone surrogate, which XML cannot hold"
        raise InvalidValueError(msg) from exc
    if top is None:  # close() refuses an empty document first; kept for the type checker
        msg = "malformed XML (no element found)"
        raise InvalidValueError(msg)
    if root is not None and top.tag != root:
        msg = f"root element is <{top.tag}>, expected <{root}>"
        raise InvalidValueError(msg)
    return top
