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
"""

from __future__ import annotations

import re
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, timedelta
from http import HTTPStatus
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree as ET

from cryptography import x509

from .._errors import GatewayError, NotRunningError, PytestCmgError
from .._protocol.ccm import (
    CCM_CONTENT_TYPE,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from .._protocol.clock import Clock, SystemClock
from .._protocol.location import (
    SHA256_RSA_OID,
    ContentLocationReply,
    ContentLocationRequest,
    LocationRecord,
    ManifestQuery,
    OnPremDP,
    is_content_id,
)
from .._protocol.paths import (
    TOKEN_SIGNATURE_HEADER,
    Auth,
    Endpoint,
    Route,
    classify,
    manifest_url,
    mutual_auth_path,
    token_auth_path,
)
from .._protocol.settings import (
    INTERNET_TS_SINCE,
    ON_DEMAND_FROM_CLOUD_SINCE,
    SITE_TOKEN_AUTH_SINCE,
    CmgSettings,
    DeploymentSettings,
    DownloadMode,
)
from .egress import EgressMeter
from .faults import FaultPlan, GatewayFault
from .requestlog import RequestLog, excerpt
from .tls import SERVER_CERTIFICATES, CertificateRefusal, GatewayTLS
from .tokens import (
    AAD_RESOURCE,
    BULK_REGISTRATION,
    INVALID_TOKEN,
    AzureADDirectory,
    AzureADTenant,
    SiteAuthority,
    TokenRejected,
    is_azure_ad_token,
)

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
#: SAS start is back-dated so a client whose clock runs behind is not refused (reliability.md C1).
SAS_CLOCK_SKEW = timedelta(minutes=15)
#: Secrets :meth:`CmgSite.issued_secrets` remembers: far more than one scenario run issues.
MAX_SECRETS_KEPT = 10_000
#: A SAS URL's signature parameter, as its query carries it.
_SAS_SIGNATURE = re.compile(r"(?:^|&)sig=([^&]+)")
#: Shorter values are not kept as secrets (an HMAC-SHA256 SAS signature is 44 characters).
_SECRET_MIN_LENGTH = 16
#: Egress alerts go critical at this share of the threshold (docs/emulation.md, egress).
_CRITICAL_SHARE = 0.9
_GB = 1024**3
_MAX_QUERY_FIELDS = 64
#: Lines the service log keeps (the oldest go first).
SERVICE_LOG_LINES = 10_000
#: Headers never written to the request log: they carry credentials.
_SECRET_HEADERS = frozenset({"authorization", TOKEN_SIGNATURE_HEADER.lower()})


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


class _Refusal(PytestCmgError):
    """Raised inside the site's logic to answer with an error status and log why."""

    def __init__(
        self, status: int, reason: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.reason = reason
        self.detail = detail
        self.headers = headers or {}
        super().__init__(detail)


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
        127.0.0.1) or ``"expired"`` (reliability.md test 31; ``tls.SERVER_CERTIFICATES``).
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
            raise ValueError(msg)
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
        """A site-signed CCM token for ``client_id`` (see ``SiteAuthority.issue_ccm_token``)."""
        token = self.authority.issue_ccm_token(client_id, **kwargs)
        self._keep_secret(_jwt_signature(token))
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
            raise ValueError(msg)
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

    def _keep_secret(self, value: str) -> None:
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

    def _no_cloud_reason(self, request: ContentLocationRequest) -> str:
        if not is_content_id(request.package_id):
            return "not a valid package ID"
        version = self.settings.site_version
        if version < INTERNET_TS_SINCE:
            return (
                f"site version {version} predates task sequences over a CMG ({INTERNET_TS_SINCE})"
            )
        if version < ON_DEMAND_FROM_CLOUD_SINCE and (
            self.deployment.download_mode == DownloadMode.ON_DEMAND
        ):
            return (
                f"site version {version}: cloud sources are not offered to a task sequence "
                "deployed with 'Download content locally when needed' before "
                f"{ON_DEMAND_FROM_CLOUD_SINCE}"
            )
        if not self.settings.content_enabled and not self.settings.classic_cloud_dp:
            return "CMG does not serve content from Azure storage"
        if not request.use_azure:
            return "client does not allow cloud sources (UseAzure=0)"
        if self.cloud_dp is None:
            return "no cloud DP attached"
        return ""

    @property
    def content_hostname(self) -> str:
        """The FQDN of the cloud content source: the CMG, or the classic cloud DP."""
        return self.classic_dp_hostname if self.settings.classic_cloud_dp else self.hostname

    def locate(self, request: ContentLocationRequest, client_id: str) -> ContentLocationReply:
        """What MP_LocationManager answers through this CMG.

        Every on-prem DP holding the content version is listed (the emulated MP does not filter
        by the client's network; the internet client skips what it cannot reach), then the cloud
        source: last, as content source priority puts it, or first when the boundary group
        prefers cloud sources. No source at all is the empty FALLBACK reply.
        """
        package_id, version = request.package_id, request.version
        where = f"{package_id}:{version}"
        on_prem = [
            dp
            for dp in self.on_prem_dps
            if is_content_id(package_id) and dp.holds(package_id, version)
        ]
        why_not = self._no_cloud_reason(request)
        manifest = None
        if not why_not:
            assert self.cloud_dp is not None
            manifest = self.cloud_dp.manifest(package_id, version)
            if manifest is None:
                why_not = "content version is not on the cloud DP"
        if manifest is None and not on_prem:
            self.service_log(f"No content location for {where}: {why_not}")
            return ContentLocationReply(site_code=self.site_code)
        records = [dp.record_for(package_id, version) for dp in on_prem]
        if manifest is None:
            self.service_log(f"No cloud location for {where}: {why_not}")
            package_hash = on_prem[0].content[(package_id, version)]
        else:
            package_hash = manifest.hash
            host = self.content_hostname
            token = self.authority.issue_access_token(package_id, package_id, client_id, host)
            self._keep_secret(token.signature)
            cloud = LocationRecord(
                url=manifest_url(self.url, package_id, package_id),
                server_remote_name=host,
                dp_type="CLOUD",
                locality="REMOTE",
                version=version,
                access_token=token,
            )
            if self.settings.prefer_cloud_sources:
                records.insert(0, cloud)
            else:
                records.append(cloud)
        sources = ", ".join(f"{r.server_remote_name} ({r.dp_type} {r.locality})" for r in records)
        kind = "cloud DP " + self.content_hostname if len(records) == 1 and manifest else sources
        self.service_log(f"Content location for {where}: {kind}")
        return ContentLocationReply(
            site_code=self.site_code, package_hash=package_hash, records=tuple(records)
        )

    def manifest_xml(
        self, query: str, signature: str, faults: list[GatewayFault] | None = None
    ) -> str:
        """The content manifest with fresh SAS URLs, or a :class:`_Refusal`."""
        faults = faults or []
        try:
            params = ManifestQuery.parse(query)
        except ValueError as exc:
            raise _Refusal(400, "Bad Request", str(exc)) from exc
        if not signature:
            raise _Refusal(401, INVALID_TOKEN, f"no {TOKEN_SIGNATURE_HEADER} header")
        if params.alg != SHA256_RSA_OID:
            # The signature covers the other fields; alg names how to check it, and the
            # emulated site signs with one algorithm only (docs/emulation.md, manifest call).
            raise _Refusal(
                401, INVALID_TOKEN, f"access token alg {params.alg[:64]!r} is not {SHA256_RSA_OID}"
            )
        try:
            token_end = self.authority.verify_access(
                params.pid, params.cid, params.tid, params.iss, params.st, params.et, signature
            )
        except TokenRejected as exc:
            raise _Refusal(401, INVALID_TOKEN, exc.reason) from exc
        package_id = params.pid
        serves_content = self.settings.content_enabled or self.settings.classic_cloud_dp
        if not serves_content or self.cloud_dp is None:
            raise _Refusal(404, "Not Found", "CMG does not serve content from Azure storage")
        versions = self.cloud_dp.versions(package_id)
        manifest = self.cloud_dp.manifest(package_id, versions[-1]) if versions else None
        if manifest is None:
            raise _Refusal(404, "Not Found", f"{package_id} is not on the cloud DP")
        # In UTC whatever zone the clock reports in: the service log's "...Z" must be the
        # instant the SAS carries, not the clock's wall-clock digits.
        now = self.clock.now().astimezone(UTC)
        expiry = min(token_end.astimezone(UTC), now + self.sas_lifetime)
        for fault in faults:
            if fault.sas_ttl is not None:
                expiry = now + timedelta(seconds=fault.sas_ttl)
        start = now - SAS_CLOCK_SKEW
        signed = self.cloud_dp.signed_manifest(manifest, start=start, expiry=expiry)
        urls = {f.relpath: f.url for f in signed.files}
        for url in urls.values():
            for raw in _SAS_SIGNATURE.findall(urlsplit(url).query):
                # As this URL carries it (the storage SDK escapes '+' and '=' but not '/'),
                # decoded, and fully escaped: a log may hold any of them.
                value = unquote(raw)
                for form in {raw, value, quote(value, safe="")}:
                    self._keep_secret(form)
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
        served = manifest.with_urls(urls)
        if any(f.wrong_hash for f in faults) and served.files:
            first = served.files[0]
            bad = replace(first, sha256=("0" if first.sha256[0] != "0" else "1") + first.sha256[1:])
            served = replace(served, files=(bad, *served.files[1:]))
        self.service_log(
            f"Issued manifest for {package_id}.{manifest.version}: {len(urls)} file(s), "
            f"SAS valid until {expiry:%Y-%m-%dT%H:%M:%SZ}"
        )
        with self._lock:
            self.egress_authorised_bytes += manifest.total_size
            self._unmetered_bytes += unmetered
        if unmetered:
            self.service_log(
                f"Egress of {unmetered} bytes cannot be measured (storage is not plain HTTP): "
                "counted from the manifest"
            )
        self.check_egress()
        return served.to_xml()

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

        A classic cloud DP only alerts: its transfer limit "does not stop the transfer" (S49).
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
        """CCM_STS: a client token for a registered identity."""
        token = self.authority.issue_ccm_token(client_id)
        self._keep_secret(_jwt_signature(token))
        if token_type:
            # CCM_STS.log wording (S9) for a token issued in exchange for an Azure AD token.
            self.service_log(f"Created SCCM token, token type: {token_type}, deviceId: {client_id}")
        self.service_log(f"Issued CCM token for {client_id}")
        return token

    def aad_auth_info(self, query: dict[str, str]) -> str:
        """``AADAuthInfo?TenantID=``: the Azure AD properties ccmsetup needs, for an onboarded,
        enabled tenant only (S9: otherwise "the CMG doesn't give the required properties")."""
        tenant_id = next((v for k, v in query.items() if k.lower() == "tenantid"), "")
        if not tenant_id:
            raise _Refusal(400, "Bad Request", "AADAuthInfo without TenantID")
        tenant = self.azure_ad.auth_info(tenant_id)
        if tenant is None:
            raise _Refusal(
                404, "Not Found", f"tenant {tenant_id[:64]!r} is not onboarded or is disabled"
            )
        root = ET.Element(
            "AADAuthInfo",
            TenantID=tenant.tenant_id,
            AADCLIENTAPPID=tenant.client_app_id,
            AADRESOURCEURI=AAD_RESOURCE,
            AADAuthority=f"https://login.microsoftonline.com/{tenant.tenant_id}",
        )
        return ET.tostring(root, encoding="unicode")

    def metadata_xml(self) -> str:
        root = ET.Element(
            "ServiceMetadata",
            SiteCode=self.site_code,
            SiteVersion=str(self.settings.site_version),
            ContentEnabled="1" if self.settings.content_enabled else "0",
        )
        ET.SubElement(
            root,
            "ManagementPoint",
            RoleId=self.role_id,
            MutualAuthPath=f"{self.hostname}/CCM_Proxy_MutualAuth/{self.role_id}",
            ServerAuthPath=f"{self.hostname}/CCM_Proxy_ServerAuth/{self.role_id}",
        )
        return ET.tostring(root, encoding="unicode")

    def sms_aut(self, query: dict[str, str]) -> str:
        if "MPLIST" in query or "MPLIST2" in query:
            root = ET.Element("MPList")
            mp = ET.SubElement(
                root,
                "MP",
                Name=f"{self.hostname}/CCM_Proxy_MutualAuth/{self.role_id}",
                FQDN=self.hostname,
            )
            ET.SubElement(mp, "Version").text = str(self.settings.site_version)
            caps = ET.SubElement(mp, "Capabilities", SchemaVersion="1.0")
            ET.SubElement(caps, "Property", Name="SSLState", Value="63")
            return ET.tostring(root, encoding="unicode")
        if "SITESIGNCERT" in query:
            return self.authority.signing_certificate_der().hex().upper()
        raise _Refusal(404, "Not Found", "unknown .sms_aut query")

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
        query = _query_fields(request.query_string)
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
                raise _Refusal(503, "Service Unavailable", "CMG service is stopped")
            if route is None:
                raise _Refusal(404, "Not Found", "path is not published through the CMG")
            if route.role_id is not None and route.role_id != self.role_id:
                raise _Refusal(404, "Not Found", f"unknown MP role ID {route.role_id}")
            self._check_body(route, request)
            refused = self._certificate_refusal(request)
            if refused is not None:
                raise _Refusal(403, refused.reason, refused.detail)
            _, faults = self.faults.next_request(route.endpoint)
            dropped = self._apply_faults(faults, entry, request, started)
            if dropped is not None:
                return dropped
            payload, content_type = self._serve(route, request, faults, entry)
            truncate = next((f.truncate for f in faults if f.truncate is not None), None)
            return self._answer(
                request, started, entry, 200, "OK", payload, content_type, truncate=truncate
            )
        except _Refusal as refusal:
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
            raise _Refusal(
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
            raise _Refusal(411, "Length Required", "no Content-Length")

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
                raise _Refusal(
                    fault.status,
                    fault.reason or _default_reason(fault.status),
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
        client_id = self._authenticate(route, request, entry)
        if route.endpoint == Endpoint.STS:
            registered = self._registering(client_id, request.body, entry)
            token_type = "Device" if "_aad" in entry else ""
            token = self.issue_for(registered, token_type=token_type)
            return token.encode("ascii"), "application/jwt"
        return self._location(request.body, client_id, entry, faults)

    def _certificate_refusal(self, request: SiteRequest) -> CertificateRefusal | None:
        """The CTL and revocation checks, for a connection that presented a certificate."""
        settings = self.settings
        if not settings.certificate_trust_list and not settings.crl_check:
            return None
        if not request.peer_certificate:
            return None
        return self.tls.refusal(
            request.peer_certificate,
            trust_list=settings.certificate_trust_list,
            crl_check=settings.crl_check,
        )

    def _registering(self, client_id: str, body: bytes, entry: dict[str, Any]) -> str:
        """Whom CCM_STS issues a token to.

        Only a bulk registration token registers a *new* client, named in the body (emulation
        design). A client authenticated by certificate or client token gets a token for itself,
        never for an identity it names: that would let any client impersonate any other.
        """
        requested = body.decode("utf-8", "replace").strip()
        if "_aad" in entry:
            return self._registering_aad(client_id, requested, entry["_aad"])
        if entry.get("_bulk"):
            if not requested:
                raise _Refusal(400, "Bad Request", "registration without a client ID in the body")
            return requested
        if requested and requested != client_id:
            raise _Refusal(403, "Forbidden", f"{client_id} asked for a token for {requested}")
        return client_id

    def _registering_aad(self, client_id: str, requested: str, device: tuple[str, str]) -> str:
        """CCM_STS with an Azure AD device token: the device's client, registered if new.

        A device the site knows gets a token for its own client only. An unknown device
        registers as the SMSID in the body ("Registering device using AAD auth"), unless another
        device already registered as that client (no taking over someone else's identity).
        """
        tenant_id, device_id = device
        if client_id:
            if requested and requested != client_id:
                raise _Refusal(403, "Forbidden", f"{client_id} asked for a token for {requested}")
            return client_id
        if not requested or not is_content_id(requested):
            raise _Refusal(400, "Bad Request", "registration without a valid client ID in the body")
        if requested in self.azure_ad.devices.values():
            raise _Refusal(403, "Forbidden", f"{requested} is registered to another device")
        self.azure_ad.register_device(tenant_id, device_id, requested)
        self.service_log(
            f"Registering device using AAD auth: DeviceId='{device_id}', TenantId='{tenant_id}'"
        )
        return requested

    def _authenticate_aad(self, route: Route, token: str, entry: dict[str, Any]) -> str:
        try:
            claims = self.azure_ad.verify(token)
        except TokenRejected as exc:
            raise _Refusal(401, INVALID_TOKEN, f"Azure AD token: {exc.reason}") from exc
        tenant_id, device_id = str(claims["tid"]), str(claims["deviceid"])
        self.service_log(
            f"Validated AAD token. TokenType: Device TenantId: {tenant_id} DeviceId: {device_id}"
        )
        client_id = self.azure_ad.client_of(claims) or ""
        if not client_id and route.endpoint != Endpoint.STS:
            raise _Refusal(
                401, INVALID_TOKEN, f"Azure AD device {device_id} is not registered with the site"
            )
        entry.update(auth=Auth.AZURE_AD, client_id=client_id, _aad=(tenant_id, device_id))
        return client_id

    def _authenticate(self, route: Route, request: SiteRequest, entry: dict[str, Any]) -> str:
        if route.auth == Auth.CERTIFICATE:
            if not request.peer_certificate:
                raise _Refusal(
                    403, "Client certificate required", "mutual-auth path without a certificate"
                )
            client_id = common_name(request.peer_certificate)
            entry.update(auth=Auth.CERTIFICATE, client_id=client_id)
            return client_id
        auth = request.header("Authorization")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refusal(401, INVALID_TOKEN, "no bearer token")
        if is_azure_ad_token(token.strip()):
            return self._authenticate_aad(route, token.strip(), entry)
        try:
            claims = self.authority.verify_ccm_token(
                token.strip(), for_registration=route.endpoint == Endpoint.STS
            )
        except TokenRejected as exc:
            raise _Refusal(401, INVALID_TOKEN, exc.reason) from exc
        client_id = str(claims.get("UniqueId", ""))
        if claims.get("Type") == BULK_REGISTRATION:
            version = self.settings.site_version
            if version < SITE_TOKEN_AUTH_SINCE:
                raise _Refusal(
                    401,
                    INVALID_TOKEN,
                    f"site version {version} predates token-based authentication "
                    f"({SITE_TOKEN_AUTH_SINCE})",
                )
            entry["_bulk"] = True
        entry.update(auth=Auth.TOKEN, client_id=client_id)
        return client_id

    def _location(
        self,
        body: bytes,
        client_id: str,
        entry: dict[str, Any],
        faults: list[GatewayFault] | None = None,
    ) -> tuple[bytes, str]:
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
        entry["package_id"] = request.package_id
        reply = self.locate(request, client_id)
        if any(f.package_hash == "wrong" for f in faults or ()) and reply.package_hash:
            # Only the reply's hash changes: the manifest (files and their hashes) stays true to
            # the bytes, so the one thing wrong is the trust anchor the client must check.
            true_hash = reply.package_hash
            wrong = ("0" if true_hash[0] != "0" else "1") + true_hash[1:]
            reply = replace(reply, package_hash=wrong)
            entry["detail"] = f"scripted package hash {wrong} (the content's is {true_hash})"
        answer = CcmMessage(
            body=reply.to_xml(),
            target_endpoint="LS_ReplyLocations",
            reply_to="direct:mp:MP_LocationManager",
            source_host="mp",
        )
        return encode_message(answer), CCM_CONTENT_TYPE

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


def _query_fields(query: str) -> dict[str, str]:
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


def common_name(der: bytes) -> str:
    """The subject CN of a DER certificate (the client identity on the mutual-auth paths)."""
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""


def _default_reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Scripted"


def _jwt_signature(token: str) -> str:
    """The signature segment of a compact JWS: what makes the token usable by whoever has it."""
    return token.rsplit(".", 1)[-1]
