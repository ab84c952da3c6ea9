"""What the gateway saw: every request, answered or refused, in arrival order.

Bounded, because the log lives as long as the gateway (a session, or ``serve`` for hours) and a
client controls what it sends: each entry keeps what assertions need (method, path, endpoint,
status, identity) and an excerpt of the headers and the body; the log keeps the latest
``max_entries`` and counts what it dropped, which assertions then mention.
"""

from __future__ import annotations

import difflib
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .._errors import CheckFailed, InvalidValueError

__all__ = ["LoggedRequest", "RequestLog", "excerpt"]

#: Entries kept by default: far more than any test or scenario makes, small enough that a
#: flood of requests costs a few MiB at most (each entry is bounded below).
DEFAULT_MAX_ENTRIES = 10_000
#: Per entry: headers kept, characters per header value, body bytes, path and detail characters.
_MAX_HEADERS = 32
_MAX_VALUE = 256
_MAX_BODY = 512
_MAX_TEXT = 1024


@dataclass(frozen=True)
class LoggedRequest:
    """One request as the gateway handled it."""

    index: int
    method: str
    path: str
    query: dict[str, str]
    endpoint: str | None
    status: int
    reason: str
    package_id: str = ""
    detail: str = ""
    #: How the client authenticated: "token", "certificate", or "" (anonymous path or refused).
    auth: str = ""
    #: Client identity: the token's UniqueId or the certificate's subject CN.
    client_id: str = ""
    #: The first headers of the request, values cut short (credentials are never kept).
    headers: dict[str, str] = field(default_factory=dict)
    #: The first bytes of the request body.
    body: bytes = b""
    #: Seconds the gateway took from reading the request line to answering (its own latency).
    elapsed: float = 0.0

    def summary(self) -> str:
        target = f" {self.package_id}" if self.package_id else ""
        why = f" ({self.detail})" if self.detail else ""
        return (
            f"#{self.index} {self.method} {self.path} -> {self.status} {self.reason}"
            f" [{self.endpoint or 'unpublished'}{target}]{why}"
        )


class RequestLog:
    """Thread-safe log with pytest-httpserver-style assertions."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if max_entries < 1:
            msg = f"RequestLog(max_entries={max_entries}): keep at least one entry"
            raise InvalidValueError(msg)
        self.max_entries = max_entries
        self._entries: deque[LoggedRequest] = deque(maxlen=max_entries)
        self._count = 0
        self._lock = threading.Lock()

    def append(self, **fields: Any) -> LoggedRequest:  # noqa: ANN401 - forwarded to the dataclass
        # Bounded here, where entries are made, so no caller can keep a client's bytes whole.
        headers: dict[str, str] = fields.pop("headers", {}) or {}
        fields["headers"] = {
            excerpt(name, 64): excerpt(value, _MAX_VALUE)
            for name, value in list(headers.items())[:_MAX_HEADERS]
        }
        fields["body"] = bytes(fields.get("body", b""))[:_MAX_BODY]
        for key in ("path", "detail"):
            if key in fields:
                fields[key] = excerpt(str(fields[key]), _MAX_TEXT)
        query: dict[str, str] = fields.get("query") or {}
        fields["query"] = {
            excerpt(k, 64): excerpt(v, _MAX_VALUE) for k, v in list(query.items())[:_MAX_HEADERS]
        }
        with self._lock:
            self._count += 1
            entry = LoggedRequest(index=self._count, **fields)
            self._entries.append(entry)
            return entry

    @property
    def dropped(self) -> int:
        """Entries forgotten because the log was full (the oldest go first)."""
        with self._lock:
            return self._count - len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._count = 0

    @property
    def entries(self) -> list[LoggedRequest]:
        with self._lock:
            return list(self._entries)

    def __len__(self) -> int:
        return len(self.entries)

    def matching(
        self,
        endpoint: str | None = None,
        *,
        method: str | None = None,
        status: int | None = None,
        package_id: str | None = None,
    ) -> list[LoggedRequest]:
        return [
            e
            for e in self.entries
            if (endpoint is None or e.endpoint == endpoint)
            and (method is None or e.method == method)
            and (status is None or e.status == status)
            and (package_id is None or e.package_id == package_id)
        ]

    def count(self, endpoint: str | None = None, **criteria: Any) -> int:  # noqa: ANN401
        return len(self.matching(endpoint, **criteria))

    def assert_request_made(
        self,
        endpoint: str | None = None,
        *,
        count: int | None = None,
        method: str | None = None,
        status: int | None = None,
        package_id: str | None = None,
    ) -> None:
        """Assert that matching requests arrived (``count`` of them, if given).

        On failure the message lists the closest requests, so a missing call is explained by
        what arrived instead (wrong package, wrong status, refused path...).
        """
        found = self.matching(endpoint, method=method, status=status, package_id=package_id)
        if (count is None and found) or (count is not None and len(found) == count):
            return
        wanted = {
            k: v
            for k, v in {
                "endpoint": endpoint,
                "method": method,
                "status": status,
                "package_id": package_id,
            }.items()
            if v is not None
        }
        expected = f"{count if count is not None else 'at least 1'} request(s) matching {wanted}"
        msg = f"expected {expected}, found {len(found)}.\n{self.closest(wanted)}"
        raise CheckFailed(msg)

    def assert_no_requests(self, endpoint: str | None = None, **criteria: Any) -> None:  # noqa: ANN401
        """Assert that nothing matching arrived (e.g. a cache hit must not reach the CMG)."""
        found = self.matching(endpoint, **criteria)
        if found:
            wanted = {"endpoint": endpoint, **criteria} if endpoint else dict(criteria)
            lines = "\n".join(f"  {e.summary()}" for e in found[:10])
            msg = (
                f"expected no request matching {wanted or 'anything'}, found {len(found)}:\n{lines}"
            )
            raise CheckFailed(msg)

    def closest(self, wanted: dict[str, Any], limit: int = 5) -> str:
        entries = self.entries
        dropped = self.dropped
        if not entries:
            return "The gateway received no requests at all."
        forgotten = (
            f" ({dropped} older ones were dropped: the log keeps {self.max_entries})"
            if dropped
            else ""
        )
        key = " ".join(f"{k}={v}" for k, v in sorted(wanted.items()))

        def similarity(entry: LoggedRequest) -> float:
            have = " ".join(f"{k}={getattr(entry, k)}" for k in sorted(wanted))
            return difflib.SequenceMatcher(None, key, have).ratio()

        ranked = sorted(entries, key=similarity, reverse=True)[:limit]
        lines = "\n".join(f"  {e.summary()}" for e in ranked)
        return f"Closest requests received ({len(entries)} in all{forgotten}):\n{lines}"


def excerpt(text: str, limit: int = 120) -> str:
    """``text`` cut short for a log: what a client sent is never kept whole."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
