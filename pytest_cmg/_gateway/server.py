"""The fake CMG: an HTTPS server speaking the client-facing protocol of a content-enabled CMG.

It works without pytest (``with FakeCMG(cloud_dp=dp) as cmg: ...``); the pytest plugin only wires
it into fixtures. Served today (protocol.md sections 1.3 to 1.6):

* ``CCM_POST /CCM_Proxy_ServerAuth/<role id>/ccm_system_tokenauth/request``: a CCM message for
  ``MP_LocationManager`` with a ContentLocationRequest, answered with a ContentLocationReply;
* ``GET /downloadrestservice.svc/getcontentxmlsecure?pid&cid&tid&iss&alg&st&et``: the content
  manifest with per-file SAS URLs on the cloud DP's storage.

Every other path is refused before any processing (URL filtering), and bodies longer than the
endpoint's limit are refused unread (the CMG's per-endpoint content-length check).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import tempfile
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .._errors import GatewayError
from .._protocol.ccm import (
    CCM_CONTENT_TYPE,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from .._protocol.clock import Clock, SystemClock
from .._protocol.location import ContentLocationReply, ContentLocationRequest, LocationRecord
from .._protocol.paths import (
    TOKEN_SIGNATURE_HEADER,
    Endpoint,
    classify,
    manifest_url,
    token_auth_path,
)
from .._protocol.settings import CmgSettings
from .._protocol.tokens import INVALID_TOKEN, SiteAuthority, TokenRejected
from .requestlog import RequestLog
from .tls import GatewayTLS

if TYPE_CHECKING:
    from types import TracebackType

    from .._storage.clouddp import CloudDP

__all__ = ["FakeCMG"]

#: Per-endpoint body limits; a real location request is a few KiB.
BODY_LIMITS = {Endpoint.LOCATION: 64 * 1024, Endpoint.MANIFEST: 0}
#: SAS start is back-dated so a client whose clock runs behind is not refused (reliability.md C1).
SAS_CLOCK_SKEW = timedelta(minutes=15)
#: How much of an over-long body is read and thrown away so the client still gets its 413.
_DRAIN_LIMIT = 1024 * 1024
_MANIFEST_PARAMS = ("pid", "cid", "tid", "iss", "alg", "st", "et")


class _Refusal(Exception):
    """Raised inside a handler to answer with an error status and log why."""

    def __init__(self, status: int, reason: str, detail: str) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


class FakeCMG:
    """A content-enabled CMG in front of a :class:`~pytest_cmg.CloudDP`.

    :param cloud_dp: where content lives; may be set or replaced later with :meth:`configure`.
    :param clock: decides token and SAS lifetimes; a ``FakeClock`` lets tests jump in time.
    :param site_code: the primary site's code, as in ``AssignedSite`` and ``MPSite``.
    :param role_id: the MP role ID published through the CMG (``vProxy_Roles``).
    :param hostname: the CMG service FQDN (the CN of its server certificate).
    :param sas_lifetime: how long a minted SAS stays valid (capped by the access token's ``et``).
    """

    def __init__(
        self,
        *,
        cloud_dp: CloudDP | None = None,
        clock: Clock | None = None,
        site_code: str = "PS1",
        role_id: str = "72057594037927939",
        hostname: str = "cmg.contoso.test",
        sas_lifetime: timedelta = timedelta(hours=1),
        workdir: Path | None = None,
    ) -> None:
        self.cloud_dp = cloud_dp
        self.clock: Clock = clock or SystemClock()
        self.site_code = site_code
        self.role_id = role_id
        self.hostname = hostname
        self.sas_lifetime = sas_lifetime
        self.settings = CmgSettings()
        self.log = RequestLog()
        self.authority = SiteAuthority(clock=self.clock)
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._tls: GatewayTLS | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._service_log: list[str] = []
        self._lock = threading.Lock()

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeCMG:
        if self._server is not None:
            return self
        if self._workdir is None:
            self._tempdir = tempfile.TemporaryDirectory(prefix="pytest-cmg-gw-")
            self._workdir = Path(self._tempdir.name)
        self._tls = GatewayTLS.create(self._workdir, self.hostname)
        self._server = _Server(("127.0.0.1", 0), _Handler, self, self._tls.server_context())
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="pytest-cmg-gateway", daemon=True
        )
        self._thread.start()
        self.service_log(f"CMG service started on {self.url} (role {self.role_id})")
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
            self._workdir = None

    def __enter__(self) -> FakeCMG:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- what clients need -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._server is None:
            msg = "FakeCMG is not started; call start() or use it as a context manager"
            raise GatewayError(msg)
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The gateway's base URL, e.g. ``https://127.0.0.1:40123``."""
        return f"https://127.0.0.1:{self.port}"

    @property
    def ca_pem(self) -> Path:
        """PEM file of the CA that signed the gateway's certificate (clients must trust it)."""
        if self._tls is None:
            msg = "FakeCMG is not started; its CA exists only while it runs"
            raise GatewayError(msg)
        return self._tls.ca_pem

    @property
    def location_url(self) -> str:
        return self.url + token_auth_path(self.role_id)

    def issue_token(self, client_id: str, **kwargs: Any) -> str:  # noqa: ANN401
        """A site-signed CCM token for ``client_id`` (see ``SiteAuthority.issue_ccm_token``)."""
        return self.authority.issue_ccm_token(client_id, **kwargs)

    # --- per-test state ----------------------------------------------------------------------

    def configure(
        self, *, settings: CmgSettings | None = None, cloud_dp: CloudDP | None = None
    ) -> None:
        if settings is not None:
            self.settings = settings
        if cloud_dp is not None:
            self.cloud_dp = cloud_dp

    def clear(self) -> None:
        """Forget everything a test did: settings, request log, errors, service log."""
        self.settings = CmgSettings()
        self.log.clear()
        with self._lock:
            self._errors.clear()
            self._service_log.clear()

    def check(self) -> None:
        """Re-raise, in the caller's thread, the first error a handler hit since ``clear()``."""
        with self._lock:
            errors = list(self._errors)
        if errors:
            msg = f"the fake CMG failed while handling a request ({len(errors)} error(s)): {errors[0]!r}"
            raise GatewayError(msg) from errors[0]

    def record_error(self, exc: BaseException) -> None:
        with self._lock:
            self._errors.append(exc)

    def service_log(self, message: str) -> None:
        """Append a CMGService.log-style line (the gateway's own log)."""
        stamp = self.clock.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        with self._lock:
            self._service_log.append(f"{stamp} CMGService: {message}")

    @property
    def service_lines(self) -> list[str]:
        with self._lock:
            return list(self._service_log)

    # --- the product's decisions -------------------------------------------------------------

    def locate(self, request: ContentLocationRequest, client_id: str) -> ContentLocationReply:
        """What MP_LocationManager answers through this CMG."""
        manifest = None
        why_not = ""
        if not self.settings.content_enabled:
            why_not = "CMG does not serve content from Azure storage"
        elif not request.use_azure:
            why_not = "client does not allow cloud sources (UseAzure=0)"
        elif self.cloud_dp is None:
            why_not = "no cloud DP attached"
        else:
            manifest = self.cloud_dp.manifest(request.package_id, request.version)
            if manifest is None:
                why_not = "content version is not on the cloud DP"
        if manifest is None:
            self.service_log(
                f"No content location for {request.package_id}:{request.version}: {why_not}"
            )
            return ContentLocationReply(site_code=self.site_code)
        token = self.authority.issue_access_token(
            request.package_id, request.package_id, client_id, self.hostname
        )
        record = LocationRecord(
            url=manifest_url(self.url, request.package_id, request.package_id),
            server_remote_name=self.hostname,
            dp_type="CLOUD",
            locality="REMOTE",
            version=request.version,
            access_token=token,
        )
        self.service_log(
            f"Content location for {request.package_id}:{request.version}: cloud DP {self.hostname}"
        )
        return ContentLocationReply(
            site_code=self.site_code, package_hash=manifest.hash, records=(record,)
        )

    def manifest_xml(self, params: dict[str, str], signature: str) -> str:
        """The content manifest with fresh SAS URLs, or a :class:`_Refusal`."""
        missing = [name for name in _MANIFEST_PARAMS if not params.get(name)]
        if missing:
            raise _Refusal(400, "Bad Request", f"missing parameter(s) {', '.join(missing)}")
        if not signature:
            raise _Refusal(401, INVALID_TOKEN, f"no {TOKEN_SIGNATURE_HEADER} header")
        try:
            token_end = self.authority.verify_access(
                params["pid"],
                params["cid"],
                params["tid"],
                params["iss"],
                params["st"],
                params["et"],
                signature,
            )
        except TokenRejected as exc:
            raise _Refusal(401, INVALID_TOKEN, exc.reason) from exc
        package_id = params["pid"]
        if not self.settings.content_enabled or self.cloud_dp is None:
            raise _Refusal(404, "Not Found", "CMG does not serve content from Azure storage")
        versions = self.cloud_dp.versions(package_id)
        manifest = self.cloud_dp.manifest(package_id, versions[-1]) if versions else None
        if manifest is None:
            raise _Refusal(404, "Not Found", f"{package_id} is not on the cloud DP")
        now = self.clock.now()
        expiry = min(token_end.astimezone(now.tzinfo), now + self.sas_lifetime)
        start = now - SAS_CLOCK_SKEW
        urls = {
            f.relpath: self.cloud_dp.signed_url(
                package_id, manifest.version, f.relpath, start=start, expiry=expiry
            )
            for f in manifest.files
        }
        self.service_log(
            f"Issued manifest for {package_id}.{manifest.version}: {len(urls)} file(s), "
            f"SAS valid until {expiry:%Y-%m-%dT%H:%M:%SZ}"
        )
        return manifest.with_urls(urls).to_xml()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # Handler threads must not keep stop() waiting on a client that holds a keep-alive connection.
    block_on_close = False

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[_Handler],
        gateway: FakeCMG,
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(address, handler)
        self.gateway = gateway
        self.context = context

    def finish_request(self, request: Any, client_address: Any) -> None:  # noqa: ANN401
        # The TLS handshake runs here, in the connection's own thread, so a slow or hostile
        # client cannot stall the accept loop.
        request.settimeout(30)
        try:
            tls = self.context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            self.gateway.service_log(f"TLS handshake with {client_address[0]} failed: {exc}")
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)  # type: ignore[arg-type]
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def shutdown_request(self, request: Any) -> None:  # noqa: ANN401
        # The raw socket was handed over to the TLS wrapper; closing it again is harmless.
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
        request.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    server_version = "Microsoft-IIS/10.0"
    sys_version = ""

    def __getattr__(self, name: str) -> Any:  # noqa: ANN401
        # Route every method (CCM_POST included) through one dispatcher so URL filtering sees all.
        if name.startswith("do_"):
            return self._dispatch
        raise AttributeError(name)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ANN401
        """Silence stderr; the request log is where requests are recorded."""

    @property
    def gateway(self) -> FakeCMG:
        return self.server.gateway

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        query = dict(parse_qsl(url.query, keep_blank_values=True))
        classified = classify(self.command, url.path)
        endpoint = classified[0] if classified else None
        package_id = query.get("pid", "")
        try:
            if endpoint is None:
                raise _Refusal(404, "Not Found", "path is not published through the CMG")
            body = self._read_body(endpoint)
            if endpoint == Endpoint.LOCATION:
                payload, package_id = self._location(body)
                self._answer(
                    200, "OK", payload, CCM_CONTENT_TYPE, endpoint, url.path, query, package_id
                )
            else:
                xml = self.gateway.manifest_xml(query, self.headers.get(TOKEN_SIGNATURE_HEADER, ""))
                self._answer(
                    200,
                    "OK",
                    xml.encode("utf-8"),
                    "text/xml; charset=utf-8",
                    endpoint,
                    url.path,
                    query,
                    package_id,
                )
        except _Refusal as refusal:
            self.gateway.service_log(
                f"Refused {self.command} {url.path}: {refusal.status} {refusal.reason} "
                f"({refusal.detail})"
            )
            self._answer(
                refusal.status,
                refusal.reason,
                b"",
                "text/plain",
                endpoint,
                url.path,
                query,
                package_id,
                detail=refusal.detail,
            )
        except Exception as exc:  # a bug in the fake must surface in the test, not only as a 500
            self.gateway.record_error(exc)
            self._answer(
                500,
                "Internal Server Error",
                b"",
                "text/plain",
                endpoint,
                url.path,
                query,
                package_id,
                detail=repr(exc),
            )

    def _read_body(self, endpoint: str) -> bytes:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            if BODY_LIMITS[endpoint] and self.command != "GET":
                raise _Refusal(411, "Length Required", "no Content-Length")
            return b""
        try:
            length = int(length_header)
        except ValueError as exc:
            raise _Refusal(400, "Bad Request", "Content-Length is not a number") from exc
        if length < 0 or length > BODY_LIMITS[endpoint]:
            self.close_connection = True
            # Discarded, never parsed: a client that is still sending would otherwise see a
            # reset instead of the 413. Past the drain bound the connection is simply closed.
            if 0 < length <= _DRAIN_LIMIT:
                remaining = length
                while remaining:
                    chunk = self.rfile.read(min(remaining, 64 * 1024))
                    if not chunk:
                        break
                    remaining -= len(chunk)
            raise _Refusal(
                413,
                "Request Entity Too Large",
                f"body of {length} bytes exceeds the {BODY_LIMITS[endpoint]}-byte limit",
            )
        return self.rfile.read(length)

    def _location(self, body: bytes) -> tuple[bytes, str]:
        auth = self.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refusal(401, INVALID_TOKEN, "no bearer token")
        try:
            claims = self.gateway.authority.verify_ccm_token(token.strip())
        except TokenRejected as exc:
            raise _Refusal(401, INVALID_TOKEN, exc.reason) from exc
        try:
            message = decode_message(body)
        except EnvelopeError as exc:
            raise _Refusal(400, "Bad Request", f"CCM message: {exc}") from exc
        if message.target_endpoint != "MP_LocationManager":
            raise _Refusal(
                400, "Bad Request", f"endpoint {message.target_endpoint!r} is not served"
            )
        try:
            request = ContentLocationRequest.from_xml(message.body)
        except ValueError as exc:
            raise _Refusal(400, "Bad Request", f"ContentLocationRequest: {exc}") from exc
        reply = self.gateway.locate(request, str(claims.get("UniqueId", "")))
        answer = CcmMessage(
            body=reply.to_xml(),
            target_endpoint="LS_ReplyLocations",
            reply_to="direct:mp:MP_LocationManager",
            source_host="mp",
        )
        return encode_message(answer), request.package_id

    def _answer(
        self,
        status: int,
        reason: str,
        payload: bytes,
        content_type: str,
        endpoint: str | None,
        path: str,
        query: dict[str, str],
        package_id: str,
        detail: str = "",
    ) -> None:
        self.gateway.log.append(
            method=self.command,
            path=path,
            query=query,
            endpoint=endpoint,
            status=status,
            reason=reason,
            package_id=package_id,
            detail=detail,
            headers={k: v for k, v in self.headers.items() if k.lower() != "authorization"},
        )
        self.send_response(status, reason)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
