"""The CMG's decisions, apart from any socket: what the site answers to one request.

:class:`CmgSite` is everything a content-enabled CMG and the management point behind it decide
(URL filtering, client authentication, location replies, manifests with fresh SAS URLs, token
issuance, site-version gates, egress, scripted faults) as a function of one parsed
:class:`SiteRequest`: :meth:`CmgSite.handle` returns a :class:`SiteResponse`. It never reads or
writes a socket; the HTTPS front door (``frontdoor.py``) parses the wire and carries the answer
back, and :class:`~pytest_cmg.FakeCMG` joins the two. Published paths (module
``_protocol.paths``):

* ``CCM_POST /CCM_Proxy_ServerAuth/<role>/ccm_system_tokenauth/request`` (site-signed token) and
  ``CCM_POST /CCM_Proxy_MutualAuth/<role>/ccm_system/request`` (mutual TLS): a CCM message for
  ``MP_LocationManager`` with a ContentLocationRequest, answered with a ContentLocationReply;
* ``GET /downloadrestservice.svc/getcontentxmlsecure?pid&cid&tid&iss&alg&st&et``: the content
  manifest with per-file SAS URLs on the cloud DP's storage;
* ``POST .../CCM_STS`` (CCM token issuance, also in exchange for an Azure AD device token),
  ``GET .../ServiceMetadata``, ``GET /CCM_Proxy_ServerAuth/AADAuthInfo?TenantID=<guid>`` and
  ``GET /CCM_Proxy_MutualAuth/<role>/SMS_MP/.sms_aut?MPLIST|SITESIGNCERT``.

Everything else is refused before any processing (URL filtering), and bodies longer than the
endpoint's limit are refused unread (the CMG's per-endpoint content-length check).

Client authentication: mutual TLS (uploaded roots, then the site's CTL and optional CRL check,
see ``tls.py``), a site-signed CCM token, or an Azure AD device token of an onboarded tenant
(``azure_ad``) on the ServerAuth paths. Location replies list the on-premises DPs that hold the
content (``add_on_prem_dp``) and the cloud source, cloud last unless the boundary group prefers
cloud sources.

Errors: a refusal the product would give is a :class:`SiteResponse` with its status. Any other
exception raised by the site's own logic is a bug of the emulation: it is answered 500 and
recorded, and ``check()`` re-raises it in the test (pytest-httpserver's way). What a *client*
does wrong on the wire never reaches here as an exception (see ``frontdoor.py``).

Where each job lives: this module holds the site's state (settings, faults, logs, secrets,
egress accounting) and the order in which one request is checked (:meth:`CmgSite.handle`); the
decisions themselves are in :mod:`.authentication` (who the client is, whom CCM_STS issues a
token to), :mod:`.location` (the location reply), :mod:`.manifests` (the manifest call and its
SAS URLs) and :mod:`.documents` (what is published to anyone); :mod:`.exchange` holds the
request and answer types.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .._errors import GatewayError, InvalidValueError, NotRunningError
from .._protocol.clock import Clock, SystemClock
from .._protocol.location import ContentLocationReply, ContentLocationRequest, OnPremDP
from .._protocol.paths import (
    TOKEN_SIGNATURE_HEADER,
    Endpoint,
    Route,
    classify,
    mutual_auth_path,
    token_auth_path,
)
from .._protocol.settings import SITE_TOKEN_LIFETIME, CmgSettings, DeploymentSettings
from . import documents, location, manifests
from .authentication import authenticate, certificate_refusal, registering
from .egress import EgressMeter
from .exchange import Refusal, SiteRequest, SiteResponse, default_reason, query_fields
from .faults import FaultPlan, GatewayFault
from .requestlog import RequestLog, excerpt
from .tls import SERVER_CERTIFICATES, GatewayTLS
from .tokens import CCM_TOKEN_LIFETIME, AzureADDirectory, AzureADTenant, SiteAuthority

if TYPE_CHECKING:
    from pathlib import Path

    import responses

    from .._net.pki import Credentials
    from .._protocol.manifest import ContentManifest
    from .contentstore import ContentStore

__all__ = ["BODY_LIMITS", "CmgSite", "SiteRequest", "SiteResponse"]

#: Per-endpoint body limits; a real location request is a few KiB.
BODY_LIMITS = {
    Endpoint.LOCATION: 64 * 1024,
    Endpoint.STS: 4 * 1024,
    Endpoint.MANIFEST: 0,
    Endpoint.METADATA: 0,
    Endpoint.MP_AUTH: 0,
    Endpoint.AAD_INFO: 0,
}
#: Secrets :meth:`CmgSite.issued_secrets` remembers: far more than one scenario run issues.
MAX_SECRETS_KEPT = 10_000
#: Shorter values are not kept as secrets (an HMAC-SHA256 SAS signature is 44 characters).
_SECRET_MIN_LENGTH = 16
#: Egress alerts go critical at this share of the threshold (docs/emulation.md, egress).
_CRITICAL_SHARE = 0.9
_GB = 1024**3
#: Lines the service log keeps (the oldest go first).
SERVICE_LOG_LINES = 10_000
#: Headers never written to the request log: they carry credentials.
_SECRET_HEADERS = frozenset({"authorization", TOKEN_SIGNATURE_HEADER.lower()})


class CmgSite:
    """The decisions of a content-enabled CMG in front of a :class:`~pytest_cmg.CloudDP`.

    :param cloud_dp: where content lives; may be set or replaced later with :meth:`configure`.
    :param clock: decides token and SAS lifetimes; a ``FakeClock`` lets tests jump in time.
    :param site_code: the primary site's code, as in ``AssignedSite`` and ``MPSite``.
    :param role_id: the MP role ID published through the CMG (``vProxy_Roles``).
    :param hostname: the CMG service FQDN (the CN of its server certificate).
    :param sas_lifetime: how long a minted SAS stays valid (capped by the access token's ``et``).
    :param classic_dp_hostname: the service FQDN of the classic cloud DP, when the settings say
        content comes from one (``CmgSettings.classic_cloud_dp``) rather than from the CMG.
    :param server_certificate: ``"valid"``, or a certificate clients must refuse although the
        CA they trust signed it: ``"wrong-host"`` (names another host, not the CMG nor
        127.0.0.1) or ``"expired"`` (docs/reliability.md test 31; ``tls.SERVER_CERTIFICATES``).
    """

    def __init__(
        self,
        *,
        cloud_dp: ContentStore | None = None,
        clock: Clock | None = None,
        site_code: str = "PS1",
        role_id: str = "72057594037927939",
        hostname: str = "cmg.contoso.test",
        sas_lifetime: timedelta = timedelta(hours=1),
        workdir: Path | None = None,
        classic_dp_hostname: str = "clouddp.contoso.test",
        server_certificate: str = "valid",
    ) -> None:
        if server_certificate not in SERVER_CERTIFICATES:
            # Refused here, not at start(), so a typo fails where the gateway is configured.
            msg = (
                f"no server certificate kind {server_certificate!r}; choose one of "
                f"{', '.join(SERVER_CERTIFICATES)}"
            )
            raise InvalidValueError(msg)
        self.server_certificate = server_certificate
        self.cloud_dp = cloud_dp
        self.clock: Clock = clock or SystemClock()
        self.site_code = site_code
        self._default_site_code = site_code
        self.role_id = role_id
        self.hostname = hostname
        self.classic_dp_hostname = classic_dp_hostname
        self.sas_lifetime = sas_lifetime
        self.settings = CmgSettings()
        #: The deployment the site knows for the task sequence being run (the MP decides cloud
        #: locations from it before 1910).
        self.deployment = DeploymentSettings()
        self.log = RequestLog()
        self.faults = FaultPlan()
        self.authority = SiteAuthority(clock=self.clock)
        #: What the site knows of Azure AD; ``tenant`` is onboarded from the start.
        self.azure_ad = AzureADDirectory(clock=self.clock)
        self.tenant: AzureADTenant = self.azure_ad.onboard()
        #: On-premises DPs of the site (in the order the MP lists them).
        self.on_prem_dps: list[OnPremDP] = []
        #: Bytes of the manifests issued: what clients were authorised to read from storage.
        self.egress_authorised_bytes = 0
        self._unmetered_bytes = 0
        self._meter: EgressMeter | None = None
        self._egress_critical = False
        self.running = True
        self._workdir = workdir
        #: The site's TLS material; the front door's owner creates it when it starts.
        self._tls: GatewayTLS | None = None
        self._errors: list[BaseException] = []
        #: Secrets the site handed out (token signatures, SAS signatures), newest last, for the
        #: check that no client log holds one (:meth:`issued_secrets`). Bounded: a long-lived
        #: gateway must not grow without end; the newest are the ones a run checks.
        self._secrets: deque[str] = deque(maxlen=MAX_SECRETS_KEPT)
        #: Secrets handed out since the site was made (the deque forgets, this does not).
        self.secrets_issued = 0
        # Bounded like the request log: a flood of refused clients must not grow the gateway.
        self._service_log: deque[str] = deque(maxlen=SERVICE_LOG_LINES)
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        """The base URL the site publishes in location records (its front door's address)."""
        return f"https://{self.hostname}"

    @property
    def tls(self) -> GatewayTLS:
        if self._tls is None:
            msg = "FakeCMG is not started; its certificates exist only while it runs"
            raise NotRunningError(msg)
        return self._tls

    @property
    def ca_pem(self) -> Path:
        """PEM file of the CA that signed the gateway's certificate (clients must trust it)."""
        return self.tls.ca_pem

    @property
    def location_url(self) -> str:
        """Where token clients send location requests."""
        return self.url + token_auth_path(self.role_id)

    @property
    def mutual_location_url(self) -> str:
        """Where PKI clients send location requests (mutual TLS)."""
        return self.url + mutual_auth_path(self.role_id)

    def issue_token(self, client_id: str, **kwargs: Any) -> str:  # noqa: ANN401
        """A site-issued client token for ``client_id``: valid 90 days unless ``lifetime`` says
        otherwise (see ``SiteAuthority.issue_ccm_token`` for the other keywords)."""
        kwargs.setdefault("lifetime", SITE_TOKEN_LIFETIME)
        token = self.authority.issue_ccm_token(client_id, **kwargs)
        self.keep_secret(_jwt_signature(token))
        return token

    def issue_client_certificate(self, client_id: str, **kwargs: Any) -> Credentials:  # noqa: ANN401
        """A client-authentication certificate (and key) whose CN is ``client_id``.

        Keyword arguments make the certificates the CMG must refuse: ``usage="server"`` (no
        client-authentication usage), ``not_after=`` in the past (expired), ``rogue=True``
        (signed by a CA the CMG does not trust), ``issuer="pytest-cmg partner CA"`` (an uploaded
        root that a certificate trust list may leave out).
        """
        return self.tls.issue_client(client_id, **kwargs)

    def revoke_client_certificate(self, credentials: Credentials) -> None:
        """Revoke a client certificate: refused once ``CmgSettings.crl_check`` is on."""
        self.tls.revoke(credentials)

    def issue_aad_token(
        self,
        client_id: str,
        *,
        tenant: AzureADTenant | None = None,
        **kwargs: Any,  # noqa: ANN401
    ) -> str:
        """An Azure AD device token for the device of ``client_id``, registered with the site.

        The device (``tenant.device_id_of(client_id)``) is recorded as the client ``client_id``,
        as registration does. Other keywords go to ``AzureADTenant.issue_device_token`` and
        make the tokens the CMG must refuse (``audience=``, ``lifetime=``, ``kid=``...).
        """
        tenant = tenant or self.tenant
        device_id = tenant.device_id_of(client_id)
        self.azure_ad.register_device(tenant.tenant_id, device_id, client_id)
        return tenant.issue_device_token(device_id, **kwargs)

    def add_on_prem_dp(
        self,
        fqdn: str,
        *manifests: ContentManifest,
        locality: str = "LOCAL",
        https: bool = False,
    ) -> OnPremDP:
        """An on-premises DP holding the content versions of ``manifests``, listed in replies."""
        dp = OnPremDP(
            fqdn=fqdn,
            locality=locality,
            https=https,
            content={(m.package_id, m.version): m.hash for m in manifests},
        )
        self.on_prem_dps.append(dp)
        return dp

    # --- per-test state ----------------------------------------------------------------------

    def configure(
        self,
        *,
        settings: CmgSettings | None = None,
        cloud_dp: ContentStore | None = None,
        deployment: DeploymentSettings | None = None,
    ) -> None:
        if settings is not None:
            self.settings = settings
        if cloud_dp is not None:
            self.cloud_dp = cloud_dp
        if deployment is not None:
            self.deployment = deployment

    def fail(self, endpoint: str | None = None, **fault: Any) -> GatewayFault:  # noqa: ANN401
        """Arm a scripted fault (see :class:`GatewayFault` for the keywords) and return it."""
        if endpoint is not None and endpoint not in Endpoint.ALL:
            msg = f"no endpoint {endpoint!r}; choose one of {', '.join(Endpoint.ALL)}"
            raise InvalidValueError(msg)
        armed = GatewayFault(endpoint=endpoint, **fault)
        self.faults.add(armed)
        return armed

    def stop_service(self, reason: str = "stopped by the administrator") -> None:
        """Stop the CMG service: every request is answered 503 until :meth:`start_service`."""
        self.running = False
        self.service_log(f"CMG service stopped: {reason}")

    def start_service(self) -> None:
        self.running = True
        self.service_log("CMG service started")

    def clear(self) -> None:
        """Forget everything a test did: settings, faults, logs, errors, egress, stopped state,
        tenants and on-prem DPs it added, CRLs it withdrew."""
        self.site_code = self._default_site_code
        self.settings = CmgSettings()
        self.deployment = DeploymentSettings()
        self.log.clear()
        self.faults.clear()
        self.authority.blocked.clear()
        self.azure_ad = AzureADDirectory(clock=self.clock)
        self.azure_ad.onboard(self.tenant)
        self.on_prem_dps = []
        if self._tls is not None:
            self._tls.publish_crls()
        if self._meter is not None:
            self._meter.reset()
        self.egress_authorised_bytes = 0
        self._unmetered_bytes = 0
        self._egress_critical = False
        self.running = True
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

    def issued_secrets(self, since: int = 0) -> list[str]:
        """The secrets this site handed out, oldest first: those after the first ``since``
        (a :attr:`secrets_issued` read earlier), of the last :data:`MAX_SECRETS_KEPT`.

        Token signatures (CCM tokens' and content access tokens') and SAS signatures (as the
        URL carries them and decoded): whoever holds one can act as the client or read content,
        so none may appear in a log. A scenario run checks smsts.log against those of its run.
        """
        with self._lock:
            kept = list(self._secrets)
            return kept[max(0, len(kept) - (self.secrets_issued - since)) :]

    def keep_secret(self, value: str) -> None:
        """Remember a secret handed out (see :meth:`issued_secrets`)."""
        # Short values could match ordinary log text by chance; real signatures are far longer.
        if len(value) >= _SECRET_MIN_LENGTH:
            with self._lock:
                self._secrets.append(value)
                self.secrets_issued += 1

    def service_log(self, message: str) -> None:
        """Append a CMGService.log-style line (the gateway's own log).

        Stamped by the authority's clock, which a scenario run swaps for its site clock: the
        gateway's log then reads the scenario's virtual time, as smsts.log does (docs/emulation.md,
        "Windows form and one clock"); outside a run it is the site's clock.
        """
        stamp = self.authority.clock.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        with self._lock:
            self._service_log.append(f"{stamp} CMGService: {message}")

    @property
    def service_lines(self) -> list[str]:
        with self._lock:
            return list(self._service_log)

    # --- the product's decisions -------------------------------------------------------------

    @property
    def content_hostname(self) -> str:
        """The FQDN of the cloud content source: the CMG, or the classic cloud DP."""
        return self.classic_dp_hostname if self.settings.classic_cloud_dp else self.hostname

    def locate(self, request: ContentLocationRequest, client_id: str) -> ContentLocationReply:
        """What MP_LocationManager answers through this CMG (:func:`.location.locate`)."""
        return location.locate(self, request, client_id)

    def manifest_xml(
        self, query: str, signature: str, faults: list[GatewayFault] | None = None
    ) -> str:
        """The content manifest with fresh SAS URLs (:func:`.manifests.manifest_xml`)."""
        return manifests.manifest_xml(self, query, signature, faults)

    def meter_urls(self, manifest: ContentManifest, urls: dict[str, str]) -> int:
        """Point ``urls`` (relpath -> SAS URL) through the egress meter when egress is measured;
        return the bytes of the files whose URL cannot be metered."""
        unmetered = 0
        if self.settings.measure_egress:
            sizes = {f.relpath: f.size for f in manifest.files}
            meter = self._egress_meter()
            for relpath, url in list(urls.items()):
                metered = meter.rewrite(url)
                if metered is None:
                    unmetered += sizes[relpath]
                else:
                    urls[relpath] = metered
        return unmetered

    def account_egress(self, authorised: int, unmetered: int) -> None:
        """Count a manifest's bytes as authorised (``unmetered`` of them seen by no meter), then
        run the egress check."""
        with self._lock:
            self.egress_authorised_bytes += authorised
            self._unmetered_bytes += unmetered
        if unmetered:
            self.service_log(
                f"Egress of {unmetered} bytes cannot be measured (storage is not plain HTTP): "
                "counted from the manifest"
            )
        self.check_egress()

    def close_egress_meter(self) -> None:
        """Stop the egress meter's proxy (the site's owner calls it when the gateway stops)."""
        with self._lock:
            meter, self._meter = self._meter, None
        if meter is not None:
            meter.close()

    def _egress_meter(self) -> EgressMeter:
        with self._lock:
            if self._meter is None:
                self._meter = EgressMeter()
            return self._meter

    @property
    def egress_bytes(self) -> int:
        """Outbound bytes as the CMG's accounting counts them (see ``CmgSettings.measure_egress``).

        Measured: body bytes storage served for the gateway's SAS URLs, plus the manifest sizes
        of any URL that could not be metered. Otherwise: the sizes of the manifests issued.
        """
        with self._lock:
            meter, unmetered, authorised = (
                self._meter,
                self._unmetered_bytes,
                self.egress_authorised_bytes,
            )
        if not self.settings.measure_egress:
            return authorised
        return unmetered + (meter.served_bytes if meter is not None else 0)

    def wait_egress_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no metered transfer is in flight (its bytes are then all counted)."""
        with self._lock:
            meter = self._meter
        return meter is None or meter.wait_idle(timeout)

    def check_egress(self) -> None:
        """The CMG's periodic egress check (every 6 minutes in the product; here before every
        request and after every manifest): log the critical line once the total crosses 90 % of
        the threshold, and stop the service if "Stop this service" is set.

        A classic cloud DP only alerts: its transfer limit "does not stop the transfer"
        (docs/emulation.md, "Site-version gates (all of them)").
        """
        egress = self.egress_bytes
        critical = self.settings.egress_threshold_gb * _GB * _CRITICAL_SHARE
        if egress < critical:
            return
        with self._lock:
            first, self._egress_critical = not self._egress_critical, True
        if first:
            self.service_log(
                f"Outbound data transfer {egress} bytes exceeds the critical "
                f"threshold ({_CRITICAL_SHARE:.0%} of {self.settings.egress_threshold_gb} GB)"
            )
        if self.settings.stop_when_critical and not self.settings.classic_cloud_dp and self.running:
            self.stop_service("critical outbound data transfer threshold exceeded")

    def issue_for(self, client_id: str, *, token_type: str = "") -> str:
        """CCM_STS: a client token for a registered identity.

        For an Azure AD device token (``token_type``), a CCM token of 8 hours; otherwise (a
        bulk registration, or a client renewing its site token) a site token of 90 days.
        """
        lifetime = CCM_TOKEN_LIFETIME if token_type else SITE_TOKEN_LIFETIME
        token = self.authority.issue_ccm_token(client_id, lifetime=lifetime)
        self.keep_secret(_jwt_signature(token))
        if token_type:
            # CCM_STS.log wording for a token issued in exchange for an Azure AD token
            # (docs/emulation.md, "Azure AD client authentication").
            self.service_log(f"Created SCCM token, token type: {token_type}, deviceId: {client_id}")
        self.service_log(f"Issued CCM token for {client_id}")
        return token

    def aad_auth_info(self, query: dict[str, str]) -> str:
        """``AADAuthInfo?TenantID=`` (:func:`.documents.aad_auth_info`)."""
        return documents.aad_auth_info(self, query)

    def metadata_xml(self) -> str:
        """``ServiceMetadata`` (:func:`.documents.metadata_xml`)."""
        return documents.metadata_xml(self)

    def sms_aut(self, query: dict[str, str]) -> str:
        """``.sms_aut?MPLIST|SITESIGNCERT`` (:func:`.documents.sms_aut`)."""
        return documents.sms_aut(self, query)

    def mount(self, mock: responses.RequestsMock, *, peer_certificate: bytes | None = None) -> None:
        """Serve this site to ``requests`` in this process through ``responses``: no socket,
        no TLS (``inprocess.py`` says what differs from the wire)."""
        from .inprocess import mount

        mount(self, mock, peer_certificate=peer_certificate)

    # --- one request -------------------------------------------------------------------------

    def body_limit(self, method: str, target: str) -> int:
        """How many body bytes the endpoint ``target`` accepts; the front door reads no more."""
        route = classify(method, target.partition("?")[0])
        return BODY_LIMITS[route.endpoint] if route is not None else 0

    def handle(self, request: SiteRequest) -> SiteResponse:
        """The site's answer to one well-formed HTTP request (the front door checked the wire).

        Order of the checks, as the CMG applies them: the egress check, a stopped service,
        URL filtering and the role ID, the per-endpoint body limit, the certificate trust list
        and revocation, scripted faults, then the endpoint's own authentication and logic.
        """
        started = time.perf_counter()
        query = query_fields(request.query_string)
        route = classify(request.method, request.path)
        entry: dict[str, Any] = {
            "path": request.path,
            "query": query,
            "endpoint": route.endpoint if route else None,
            "package_id": query.get("pid", ""),
        }
        try:
            self.check_egress()
            if not self.running:
                raise Refusal(503, "Service Unavailable", "CMG service is stopped")
            if route is None:
                raise Refusal(404, "Not Found", "path is not published through the CMG")
            if route.role_id is not None and route.role_id != self.role_id:
                raise Refusal(404, "Not Found", f"unknown MP role ID {route.role_id}")
            self._check_body(route, request)
            refused = certificate_refusal(self, request)
            if refused is not None:
                raise Refusal(403, refused.reason, refused.detail)
            _, faults = self.faults.next_request(route.endpoint)
            dropped = self._apply_faults(faults, entry, request, started)
            if dropped is not None:
                return dropped
            payload, content_type = self._serve(route, request, faults, entry)
            truncate = next((f.truncate for f in faults if f.truncate is not None), None)
            return self._answer(
                request, started, entry, 200, "OK", payload, content_type, truncate=truncate
            )
        except Refusal as refusal:
            self.service_log(
                f"Refused {request.method} {excerpt(request.path)}: {refusal.status} "
                f"{refusal.reason} ({refusal.detail})"
            )
            entry["detail"] = refusal.detail
            return self._answer(
                request, started, entry, refusal.status, refusal.reason, headers=refusal.headers
            )
        except Exception as exc:  # a bug in the fake must surface in the test, not only as a 500
            self.record_error(exc)
            entry["detail"] = excerpt(repr(exc))
            return self._answer(request, started, entry, 500, "Internal Server Error")

    def refuse_malformed(
        self, method: str, target: str, status: int, reason: str, detail: str
    ) -> SiteResponse:
        """Log a request the front door refused before the site could read it (HTTP.sys's own
        400s: a broken request line, header or body framing). ``method`` and ``target`` may be
        anything a client sent, so they are logged cut short and never echoed back."""
        entry: dict[str, Any] = {
            "path": excerpt(target.partition("?")[0]),
            "query": {},
            "endpoint": None,
            "package_id": "",
            "detail": detail,
        }
        request = SiteRequest(method=excerpt(method, 32), target="")
        self.service_log(f"Refused a malformed request: {status} {reason} ({detail})")
        return self._answer(request, time.perf_counter(), entry, status, reason, close=True)

    def _check_body(self, route: Route, request: SiteRequest) -> None:
        limit = BODY_LIMITS[route.endpoint]
        if not request.body_complete or request.body_length > limit:
            raise Refusal(
                413,
                "Request Entity Too Large",
                f"body of {request.body_length} bytes exceeds the {limit}-byte limit",
            )
        chunked = "chunked" in request.header("Transfer-Encoding").lower()
        if (
            limit
            and request.method != "GET"
            and not chunked
            and not request.header("Content-Length")
        ):
            raise Refusal(411, "Length Required", "no Content-Length")

    def _apply_faults(
        self,
        faults: list[GatewayFault],
        entry: dict[str, Any],
        request: SiteRequest,
        started: float,
    ) -> SiteResponse | None:
        """Delay, drop or replace the answer; the answer when the request has been dealt with."""
        for fault in faults:
            if fault.delay:
                # Real time, bounded by GatewayFault (docs/scenarios.md): the point of a delay
                # is to make the client's own timeout run.
                time.sleep(fault.delay)
        described = "; ".join(f.describe() for f in faults)
        if any(f.drop for f in faults):
            entry["detail"] = f"dropped by {described}"
            response = self._answer(request, started, entry, 0, "dropped")
            response.drop = True
            return response
        for fault in faults:
            if fault.status is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
                raise Refusal(
                    fault.status,
                    fault.reason or default_reason(fault.status),
                    f"scripted {fault.describe()}",
                    headers,
                )
        return None

    def _serve(
        self,
        route: Route,
        request: SiteRequest,
        faults: list[GatewayFault],
        entry: dict[str, Any],
    ) -> tuple[bytes, str]:
        if route.endpoint == Endpoint.MANIFEST:
            signature = request.header(TOKEN_SIGNATURE_HEADER)
            xml = self.manifest_xml(request.query_string, signature, faults)
            return xml.encode("utf-8"), "text/xml; charset=utf-8"
        query = entry["query"]
        if route.endpoint == Endpoint.METADATA:
            return self.metadata_xml().encode("utf-8"), "text/xml; charset=utf-8"
        if route.endpoint == Endpoint.MP_AUTH:
            return self.sms_aut(query).encode("utf-8"), "text/plain; charset=utf-8"
        if route.endpoint == Endpoint.AAD_INFO:
            return self.aad_auth_info(query).encode("utf-8"), "text/xml; charset=utf-8"
        client_id = authenticate(self, route, request, entry)
        if route.endpoint == Endpoint.STS:
            registered = registering(self, client_id, request.body, entry)
            token_type = "Device" if "_aad" in entry else ""
            token = self.issue_for(registered, token_type=token_type)
            return token.encode("ascii"), "application/jwt"
        return location.answer(self, request.body, client_id, entry, faults)

    def _answer(
        self,
        request: SiteRequest,
        started: float,
        entry: dict[str, Any],
        status: int,
        reason: str,
        payload: bytes = b"",
        content_type: str = "text/plain",
        *,
        headers: dict[str, str] | None = None,
        truncate: int | None = None,
        close: bool = False,
    ) -> SiteResponse:
        if truncate is not None:
            entry["detail"] = f"truncated after {truncate} of {len(payload)} bytes"
        self.log.append(
            method=request.method,
            status=status,
            reason=reason,
            headers={k: v for k, v in request.headers if k.lower() not in _SECRET_HEADERS},
            body=request.body,
            elapsed=time.perf_counter() - started,
            **{k: v for k, v in entry.items() if not k.startswith("_")},
        )
        return SiteResponse(
            status,
            reason,
            payload,
            content_type,
            headers=dict(headers or {}),
            truncate=truncate,
            close=close or truncate is not None,
        )


def _jwt_signature(token: str) -> str:
    """The signature segment of a compact JWS: what makes the token usable by whoever has it."""
    return token.rsplit(".", 1)[-1]
