"""One storage GET of a file's bytes, and everything that decides whether its answer may be used.

:func:`stream` sends one request (``Range`` from where the file stands, ``If-Match`` on the
pinned ETag) and receives its body into the caller's buffers: written and hashed at once for a
small file, handed to the hashing thread through a :class:`~._window.Window` for a large one.
:func:`check_head` applies the integrity rules to the answer's status and headers before a byte
of its body is used (docs/reliability.md rows 1-8): a 412 or another ETag restarts the file, a
``200`` to a range request or a ``206`` that starts elsewhere is never appended, a size other
than the manifest's fails at once. :func:`renew` and :func:`renew_early` spend the file's one SAS
renewal, after storage refused it or before it lapses (docs/reliability.md row 21).
"""

from __future__ import annotations

import contextlib
import re
from typing import TYPE_CHECKING

from .._protocol import codes
from ._failures import Fatal, Restart, SasRefused, Transient
from ._http import Response, TransportError, split_url
from .retry import is_transient_status, parse_retry_after

if TYPE_CHECKING:
    from .._protocol.manifest import ManifestFile
    from ._http import Origin
    from ._job import Job
    from ._window import Window
    from .download import DownloadCore

__all__ = ["check_head", "redact", "renew", "renew_early", "stream"]

_USER_AGENT = "SMS CCM 5.0 TS"
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
#: Storage answers an expired or otherwise invalid SAS with 403 and one of these codes.
_AUTH_ERRORS = frozenset({"AuthenticationFailed", "AuthorizationFailure"})


def redact(url: str) -> str:
    """A URL fit for logs: the SAS query (its ``sig``) never leaves the process."""
    return url.split("?", 1)[0]


def renew(job: Job, refused: SasRefused) -> None:
    """After storage refused the SAS (403): renew it, once per file; else the refusal is final."""
    with job.lock:
        if job.url != refused.url:
            return  # another range of this file already renewed it
        if job.run.renew is None or job.renewed:
            raise Fatal(
                codes.BAD_HTTP_STATUS,
                f"GET {redact(refused.url)} answered 403 {refused.code}".rstrip(),
            )
        # One renewal per file: a fresh URL that is refused too is final.
        job.renew(f"SAS refused ({refused.code}), renewing")


def renew_early(core: DownloadCore, job: Job) -> None:
    """Renew a SAS that lapses within ``sas_margin`` before using it (once per file)."""
    if job.renewed or job.run.renew is None or core.sas_margin <= 0:
        return
    left = job.sas_seconds_left()
    if left is None or left >= core.sas_margin:
        return
    with job.lock:
        if job.renewed:
            return  # another range of this file renewed it meanwhile
        when = f"expires in {left:.0f} s" if left > 0 else f"expired {-left:.0f} s ago"
        job.renew(f"SAS {when}, renewing before the request")


def stream(
    core: DownloadCore,
    job: Job,
    start: int,
    end: int,
    *,
    ranged: bool,
    buf: memoryview | None = None,
    window: Window | None = None,
    cursor: list[int] | None = None,
) -> None:
    """One GET for bytes ``start``..``end`` of the file; returns when they are all in.

    Inline (``buf``): bytes are written and hashed here. Streamed (``window``): bytes are
    written here and handed to the hashing thread; ``cursor[0]`` follows the position.
    """
    item = job.item
    renew_early(core, job)
    url = job.url
    try:
        origin, target = split_url(url)
    except ValueError as exc:
        raise Fatal(codes.BAD_HTTP_STATUS, f"{item.relpath}: unusable URL ({exc})") from None
    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if ranged and (start or end < item.size):
        headers["Range"] = f"bytes={start}-{end - 1}"
    elif start:
        headers["Range"] = f"bytes={start}-"
    piece: memoryview | None = None
    if window is not None:
        # Room in the window first: a request whose answer could not be read yet would sit
        # on a connection that the server may time out.
        piece = window.buffer(start)
        if piece is None:
            return
    if job.etag:
        headers["If-Match"] = job.etag
    response = send_get(core, origin, target, headers, url)
    conn = response.connection
    if window is not None:
        window.track(conn, True)
    position = start
    try:
        check_head(job, response, start, "Range" in headers, url)
        if window is not None:
            window.etag_known.set()
        while position < end:
            if window is not None:
                if piece is None:
                    piece = window.buffer(position)
                if piece is None:
                    return
            else:
                assert buf is not None
                piece = buf
            view = piece[: min(len(piece), end - position)]
            try:
                n = response.read_into(view)
            except TransportError as exc:
                n = exc.received
                if n:
                    position = deliver(job, view[:n], position, window, piece, cursor)
                msg = f"connection lost after {position} of {item.size} bytes ({exc.reason})"
                raise Transient(msg) from None
            if not n:
                msg = f"the answer ended after {position} of {item.size} bytes"
                raise Transient(msg)
            position = deliver(job, view[:n], position, window, piece, cursor)
            piece = None
        if not response.complete and not ranged and more_than_asked(response):
            raise Fatal(
                codes.HASH_MISMATCH,
                f"{item.relpath}: more than the manifest's {item.size} bytes",
            )
    finally:
        if window is not None:
            window.track(conn, False)
        core.pool.release(conn, response)


def more_than_asked(response: Response) -> bool:
    """Whether a body without a length goes on past the file (one byte is enough to tell)."""
    try:
        return response.read_into(memoryview(bytearray(1))) > 0
    except TransportError:
        return False  # every byte asked for is in; the connection is not reused


def deliver(
    job: Job,
    view: memoryview,
    position: int,
    window: Window | None,
    piece: memoryview,
    cursor: list[int] | None,
) -> int:
    job.write(view, position)
    if window is None:
        job.hash(view)
    else:
        window.put(position, piece, len(view))
        assert cursor is not None
        cursor[0] = position + len(view)
    return position + len(view)


def send_get(
    core: DownloadCore, origin: Origin, target: str, headers: dict[str, str], url: str
) -> Response:
    try:
        return core.pool.get(origin, target, headers)
    except TransportError as exc:
        msg = f"GET {redact(url)} failed: {exc.reason}"
        raise Transient(msg) from None


def check_head(job: Job, response: Response, start: int, ranged: bool, url: str) -> None:
    """Everything about a response's head that decides whether its body may be used."""
    item = job.item
    status = response.status
    headers = response.headers
    if status not in (200, 206):
        # Read a short error body to the end, so the connection can be kept.
        with contextlib.suppress(TransportError):
            response.drain()
    if status == 412:
        msg = "the blob changed since the download began (412, ETag)"
        raise Restart(msg)
    if status == 416:
        msg = f"range from byte {start} not satisfiable (416)"
        raise Restart(msg)
    if status == 403 and headers.get("x-ms-error-code") in _AUTH_ERRORS:
        raise SasRefused(headers.get("x-ms-error-code", ""), url)
    if status not in (200, 206):
        reason = f"GET {redact(url)} answered {status}"
        if is_transient_status(status):
            raise Transient(reason, parse_retry_after(headers.get("retry-after")))
        code = headers.get("x-ms-error-code", "")
        raise Fatal(codes.BAD_HTTP_STATUS, f"{reason} {code}".rstrip())
    if ranged and status == 200:
        # The server ignored the range: appending would duplicate the first bytes.
        msg = f"a {'resume' if start else 'range'} request was answered 200 (range ignored)"
        raise Restart(msg, no_ranges=True)
    if status == 206:
        check_range(headers.get("content-range", ""), start, item)
    elif response.length is not None and response.length != item.size:
        # Not the content the manifest describes: no retry can fix that.
        msg = f"{item.relpath}: storage holds {response.length} bytes, manifest says {item.size}"
        raise Fatal(codes.HASH_MISMATCH, msg)
    etag = headers.get("etag")
    with job.lock:
        if job.etag is None:
            job.etag = etag
        elif etag is not None and etag != job.etag:
            msg = f"the blob changed since the download began (ETag {etag} != {job.etag})"
            raise Restart(msg)


def check_range(header: str, offset: int, item: ManifestFile) -> None:
    match = _CONTENT_RANGE.fullmatch(header.strip())
    if match is None:
        msg = f"206 with an unusable Content-Range {header!r}"
        raise Restart(msg)
    start, _, total = (int(g) for g in match.groups())
    if total != item.size:
        msg = f"{item.relpath}: storage holds {total} bytes, manifest says {item.size}"
        raise Fatal(codes.HASH_MISMATCH, msg)
    if start != offset:
        msg = f"206 for bytes {start}- when bytes {offset}- were asked"
        raise Restart(msg)
