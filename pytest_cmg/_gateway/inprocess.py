"""The site's decisions through ``responses``: requests-based code against the fake CMG, in
process, without sockets, TLS or threads.

``responses`` (a design-card dependency) intercepts every ``requests`` call of the process; this
module registers one callback that turns a ``PreparedRequest`` into a :class:`SiteRequest`,
asks :meth:`CmgSite.handle`, and turns the :class:`SiteResponse` back. It is the unit-test
counterpart of the HTTPS front door: the same decisions, the same request log and faults, none
of HTTP.sys's wire checks (``requests`` only ever sends well-formed requests).

What differs from the wire, by construction: a mutual-auth path sees the certificate given to
:func:`mount` (``requests``' ``cert=`` never reaches ``responses``); a scripted ``drop`` raises
``requests.ConnectionError``; a scripted ``truncate`` returns the first bytes with the full
``Content-Length``, which urllib3 reports as an incomplete read; the reason phrase is the
status's standard one (``responses`` does not carry another).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import requests
import responses

from .site import SiteRequest

if TYPE_CHECKING:
    from collections.abc import Callable

    from requests import PreparedRequest

    from .site import CmgSite

    _Callback = Callable[[PreparedRequest], tuple[int, dict[str, str], bytes]]

__all__ = ["mount"]



class _SiteCallback(responses.CallbackResponse):
    """One registration for every method: the site's URL filtering decides what a method may
    do (CCM_POST included), and one registration keeps ``assert_all_requests_are_fired``
    meaningful (one per method would fail a test for the methods it never used)."""

    def __init__(self, pattern: re.Pattern[str], callback: _Callback) -> None:
        super().__init__(method="GET", url=pattern, callback=callback)
        self._pattern = pattern

    def matches(self, request: PreparedRequest) -> tuple[bool, str]:
        if self._pattern.match(str(request.url)) is None:
            return False, "URL does not match"
        return True, ""


def mount(
    site: CmgSite,
    mock: responses.RequestsMock,
    *,
    base_url: str | None = None,
    peer_certificate: bytes | None = None,
) -> None:
    """Answer every request to ``base_url`` (the site's published URL by default) from ``site``.

    :param mock: an active ``responses.RequestsMock`` (or the ``responses`` module's default).
    :param peer_certificate: DER of the client certificate the mutual-auth paths should see.
    """
    root = (base_url or site.url).rstrip("/")
    pattern = re.compile(re.escape(root) + r"(/.*)?$")

    def answer(request: PreparedRequest) -> tuple[int, dict[str, str], bytes]:
        url = urlsplit(request.url or "")
        target = (url.path or "/") + (f"?{url.query}" if url.query else "")
        body = request.body or b""
        if isinstance(body, str):
            body = body.encode("utf-8")
        elif not isinstance(body, bytes):  # a generator or file: read it as the wire would
            body = b"".join(chunk if isinstance(chunk, bytes) else chunk.encode() for chunk in body)
        headers = tuple((name, str(value)) for name, value in request.headers.items())
        if body and not any(name.lower() == "content-length" for name, _ in headers):
            headers = (*headers, ("Content-Length", str(len(body))))
        response = site.handle(
            SiteRequest(
                method=request.method or "GET",
                target=target,
                headers=headers,
                body=body,
                body_length=len(body),
                peer_certificate=peer_certificate,
            )
        )
        if response.drop:
            msg = f"the fake CMG dropped {request.method} {url.path} (a scripted fault)"
            raise requests.ConnectionError(msg)
        payload = response.body if response.truncate is None else response.body[: response.truncate]
        out = {"Content-Type": response.content_type, **response.headers}
        if response.truncate is not None:
            out["Content-Length"] = str(len(response.body))
        return response.status, out, payload

    mock.add(_SiteCallback(pattern, answer))
