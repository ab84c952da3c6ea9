"""One request and its answer as the site sees them: no socket, no stream.

:class:`SiteRequest` is what the front door (or the in-process transport) parsed;
:class:`SiteResponse` is what it writes back. :class:`Refusal` is how the site's decisions
answer with an error status the product would give (docs/emulation.md, "Refusals").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qsl

from .._errors import PytestCmgError

__all__ = ["Refusal", "SiteRequest", "SiteResponse", "default_reason", "query_fields"]

_MAX_QUERY_FIELDS = 64


@dataclass(frozen=True)
class SiteRequest:
    """One request as the front door parsed it: no socket, no stream.

    ``target`` is the request-target's path and query exactly as sent (origin form; the front
    door turns the absolute form into it). ``body_length`` is what the client declared or sent;
    ``body`` holds it only when it was within the endpoint's limit (``body_complete``), so a
    too-long body is refused without ever being buffered.
    """

    method: str
    target: str
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    body_length: int = 0
    body_complete: bool = True
    #: DER of the client certificate the TLS handshake verified, if one was presented.
    peer_certificate: bytes | None = None
    client_address: str = "127.0.0.1"

    def header(self, name: str, default: str = "") -> str:
        """The first value of a header, case-insensitively (as HTTP.sys hands it to IIS)."""
        wanted = name.lower()
        return next((value for key, value in self.headers if key.lower() == wanted), default)

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query_string(self) -> str:
        return self.target.partition("?")[2]


@dataclass
class SiteResponse:
    """What the site answers; the front door writes it (or, for ``drop``, writes nothing)."""

    status: int
    reason: str
    body: bytes = b""
    content_type: str = "text/plain"
    headers: dict[str, str] = field(default_factory=dict)
    #: Close the connection without any response (a scripted ``drop``).
    drop: bool = False
    #: Send only this many body bytes of the answer, then close (a scripted ``truncate``).
    truncate: int | None = None
    #: Close the connection after the answer (a refused body, a truncated answer).
    close: bool = False


class Refusal(PytestCmgError):
    """Raised inside the site's logic to answer with an error status and log why."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}
        super().__init__(detail)


def query_fields(query: str) -> dict[str, str]:
    """A query as the request log and the anonymous endpoints read it (first value wins).

    Bounded: HTTP.sys limits the URL, and a query of thousands of fields must not cost more
    than its length (``max_num_fields``); undecodable escapes are kept replaced, not refused,
    since only the manifest call gives its parameters a meaning that can be wrong.
    """
    fields: dict[str, str] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, max_num_fields=_MAX_QUERY_FIELDS)
    except ValueError:
        pairs = parse_qsl(query, keep_blank_values=True)[:_MAX_QUERY_FIELDS]
    for name, value in pairs:
        fields.setdefault(name, value)
    return fields


def default_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Scripted"
