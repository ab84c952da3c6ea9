"""The CMG client: the connection, CCM token handling, content location requests and
manifests through the gateway, and a location record as offered to a content provider.
"""

from __future__ import annotations

import base64
import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import urlencode

import requests

from .._errors import ContentError, InvalidValueError
from .._protocol import codes
from .._protocol.ccm import (
    CCM_CONTENT_TYPE,
    USER_AGENT,
    CcmMessage,
    EnvelopeError,
    decode_message,
    encode_message,
)
from .._protocol.location import ContentLocationReply, ContentLocationRequest, LocationRecord
from .._protocol.manifest import ContentManifest
from .._protocol.paths import (
    CCM_METHOD,
    TOKEN_SIGNATURE_HEADER,
    mutual_auth_path,
    sts_path,
    token_auth_path,
)
from .._protocol.settings import (
    SITE_TOKEN_RENEWAL,
    ClientSettings,
)
from .acp import (
    ProviderLocation,
    ProviderToken,
)

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .log import SmstsLog


@dataclass(frozen=True)
class CMGConnection:
    """Everything a client needs to reach a gateway (the ``serve`` JSON line carries the same).

    With a ``token`` the client uses the token path (``CCM_Proxy_ServerAuth``). With an
    ``aad_token`` (an Azure AD device token) it first exchanges it at CCM_STS for a CCM token, as
    Azure AD-joined clients do, then uses the token path. Without either it presents
    ``client_cert``/``client_key`` on the mutual-TLS path (``CCM_Proxy_MutualAuth``).
    """

    cmg_url: str
    ca_cert: Path
    site_code: str
    mp_role_id: str
    client_id: str
    token: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    aad_token: str | None = None

    def __post_init__(self) -> None:
        if not self.token and not self.aad_token and not (self.client_cert and self.client_key):
            msg = (
                f"client {self.client_id} has neither a token, an Azure AD token nor a client "
                "certificate and key; give one of them to reach the CMG"
            )
            raise InvalidValueError(msg)

    @property
    def uses_token_path(self) -> bool:
        return bool(self.token or self.aad_token)

    @property
    def location_url(self) -> str:
        path = (
            token_auth_path(self.mp_role_id)
            if self.uses_token_path
            else mutual_auth_path(self.mp_role_id)
        )
        return self.cmg_url.rstrip("/") + path

    @property
    def sts_url(self) -> str:
        return self.cmg_url.rstrip("/") + sts_path(self.mp_role_id)


class CMGClient:
    """The client side of the CMG protocol: content location and manifests."""

    def __init__(
        self,
        connection: CMGConnection,
        log: SmstsLog,
        settings: ClientSettings | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.connection = connection
        self.log = log
        self.settings = settings or ClientSettings()
        self.timeout = timeout
        self._session = requests.Session()
        # requests lets REQUESTS_CA_BUNDLE (set on many CI images) silently replace
        # Session.verify, and would route loopback traffic through HTTP(S)_PROXY: the client
        # trusts exactly the CMG's CA and nothing from the environment.
        self._session.trust_env = False
        self._session.verify = str(connection.ca_cert)
        if connection.client_cert and connection.client_key:
            self._session.cert = (str(connection.client_cert), str(connection.client_key))
        #: The CCM token obtained for ``connection.aad_token`` (never logged; kept across a
        #: restart by ``on_ccm_token``, as the product caches its token).
        self._ccm_token: str | None = None
        #: Called with each CCM token CCM_STS issues, at once (the engine keeps it on disk).
        self.on_ccm_token: Callable[[str], None] | None = None
        #: The site token renewed over the CMG, newer than ``connection.token`` (kept on disk
        #: as a CCM token is); a boot tries the monthly renewal once.
        self._site_token: str | None = None
        self._renewal_tried = False
        self._lapse_told = False
        #: The site's time as the client sees it (a scenario's virtual time in a boot process).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def close(self) -> None:
        self._session.close()

    @property
    def cached_ccm_token(self) -> str | None:
        """The CCM token got at CCM_STS for the Azure AD token, if any yet (persisted across a
        restart, as the product caches its token)."""
        return self._ccm_token

    def restore_ccm_token(self, token: str) -> None:
        """Use ``token``, cached by the previous boot, instead of asking CCM_STS again.

        A token that expired while the computer was down is dropped, so the next request gets
        a new one at CCM_STS for the Azure AD token (the client reads its own token's expiry).
        For a client with a site token, ``token`` is the one it renewed, if any: used when it
        outlives the one the client was given.
        """
        if self.connection.token:
            given, renewed = _claim(self.connection.token, "exp"), _claim(token, "exp")
            if given is not None and renewed is not None and renewed > given:
                self._site_token = token
            return
        if not self.connection.aad_token:
            return
        expires = _claim(token, "exp")
        if expires is not None and expires <= self.clock():
            self.log.info(
                "ClientIDManagerStartup",
                f"The cached CCM token expired at {expires:%Y-%m-%d %H:%M:%S} UTC while the "
                "computer was down; getting a new one",
            )
            return
        self._ccm_token = token

    def bearer_token(self) -> str | None:
        """The CCM token this client sends (``Authorization: Bearer``), if it uses one.

        For an alternate content provider offered the CMG; never logged.
        """
        return self._bearer()

    def _bearer(self) -> str | None:
        """The CCM token to append to requests: the given one, or one got for the AAD token."""
        conn = self.connection
        if conn.token:
            return self._site_bearer(conn.token)
        if not conn.aad_token:
            return None
        if self._ccm_token is None:
            self._ccm_token = self._exchange_aad_token(conn.aad_token)
            if self.on_ccm_token is not None:
                self.on_ccm_token(self._ccm_token)
        return self._ccm_token

    def _site_bearer(self, given: str) -> str:
        """The site token to send: renewed over the CMG once it is a month old.

        [G] The renewal is a CCM_STS request authenticated by the current token (which the
        site answers with a new 90-day token), tried once a boot; if it fails, the current
        token serves until it lapses. A lapsed token cannot be renewed over the CMG (the CMG
        refuses it), only at an internal management point: the client sends it and is refused
        (docs/emulation.md, "Tokens across restarts").
        """
        token = self._site_token or given
        issued, expires = _claim(token, "nbf"), _claim(token, "exp")
        now = self.clock()
        if issued is None or expires is None:
            return token
        if expires <= now:
            if not self._lapse_told:
                self._lapse_told = True
                self.log.error(
                    "ClientIDManagerStartup",
                    f"The site token expired at {expires:%Y-%m-%d %H:%M:%S} UTC; only an "
                    "internal management point can renew it",
                )
            return token
        if now - issued < SITE_TOKEN_RENEWAL or self._renewal_tried:
            return token
        self._renewal_tried = True
        self.log.info(
            "ClientIDManagerStartup",
            f"The site token issued at {issued:%Y-%m-%d %H:%M:%S} UTC is a month old; renewing it",
        )
        try:
            renewed = self._ask_sts(token, "CCM token")
        except ContentError as error:
            self.log.warning(
                "ClientIDManagerStartup",
                f"Could not renew the site token ({error}); using it until it expires at "
                f"{expires:%Y-%m-%d %H:%M:%S} UTC",
            )
            return token
        self._site_token = renewed
        if self.on_ccm_token is not None:
            self.on_ccm_token(renewed)
        until = _claim(renewed, "exp")
        self.log.info(
            "ClientIDManagerStartup",
            "Renewed the site token"
            + (f"; it expires at {until:%Y-%m-%d %H:%M:%S} UTC" if until else ""),
        )
        return renewed

    def _exchange_aad_token(self, aad_token: str) -> str:
        """CCM_STS: an Azure AD device token in, a CCM token out (docs/emulation.md, "Azure AD
        client authentication")."""
        return self._ask_sts(aad_token, "CCM Token")

    def _ask_sts(self, bearer: str, what: str) -> str:
        """CCM_STS with ``bearer``: the token it issues to this client."""
        url = self.connection.sts_url
        self.log.info("ClientIDManagerStartup", f"Getting {what} from {url}")
        try:
            response = self._session.post(
                url,
                data=self.connection.client_id.encode("utf-8"),
                headers={"Authorization": f"Bearer {bearer}", "User-Agent": USER_AGENT},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ContentError(
                codes.NO_LOCATIONS, f"CCM token request failed: {_transport_reason(exc)}"
            ) from exc
        if response.status_code != 200 or not response.text.strip():
            self.log.error(
                "ClientIDManagerStartup",
                f"Failed to get CCM token. StatusCode={response.status_code} "
                f"StatusText={response.reason}",
            )
            raise ContentError(
                codes.NO_LOCATIONS,
                f"CCM token request answered {response.status_code} {response.reason}",
            )
        self.log.info("ClientIDManagerStartup", "Cached encrypted token for 'S-1-5-18'.")
        return response.text.strip()

    def locate(self, package_id: str, version: int) -> ContentLocationReply:
        """Ask MP_LocationManager, through the CMG, where ``package_id`` version lives."""
        conn = self.connection
        url = conn.location_url
        if not self.settings.enable_cmg:
            # Emulation (inferred): on the internet the CMG is the only way to an MP.
            self.log.error(
                "LocationServices",
                "Client settings do not allow this client to use a cloud management gateway",
            )
            raise ContentError(codes.NO_LOCATIONS, "the client may not use a CMG")
        request = ContentLocationRequest(
            package_id=package_id,
            version=version,
            site_code=conn.site_code,
            use_azure=self.settings.allow_cloud_dp,
        )
        message = CcmMessage(body=request.to_xml(), source_id=conn.client_id)
        headers = {"Content-Type": CCM_CONTENT_TYPE, "User-Agent": USER_AGENT}
        bearer = self._bearer()
        if bearer:
            self.log.info("LocationServices", f"Converting MutualAuth URL to ServerAuth: {url}")
            headers["Authorization"] = f"Bearer {bearer}"
        self.log.info("LocationServices", f"CCM_POST {url}")
        try:
            response = self._session.request(
                CCM_METHOD,
                url,
                data=encode_message(message),
                headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ContentError(
                codes.NO_LOCATIONS,
                f"content location request failed: {_transport_reason(exc)}",
            ) from exc
        if response.status_code != 200:
            self.log.error(
                "LocationServices",
                f"Request failed with StatusCode={response.status_code} "
                f"StatusText={response.reason}",
            )
            raise ContentError(
                codes.NO_LOCATIONS,
                f"content location request answered {response.status_code} {response.reason}",
            )
        try:
            reply = decode_message(response.content)
            size = len(response.content)
            self.log.info(
                "LocationServices",
                f"Decompression (zlib) succeeded: original size {size}, "
                f"uncompressed size {len(reply.body) * 2}.",
            )
            return ContentLocationReply.from_xml(reply.body)
        except (EnvelopeError, ValueError) as exc:
            raise ContentError(codes.NO_LOCATIONS, f"unusable location reply: {exc}") from exc

    @staticmethod
    def manifest_url(record: LocationRecord) -> str:
        """The manifest URL of a cloud record: its URL with the access token's fields.

        The token's signature is not in it: it travels in a header (``TOKEN_SIGNATURE_HEADER``).
        """
        token = record.access_token
        if token is None:
            raise ContentError(codes.BAD_HTTP_STATUS, "cloud location record has no access token")
        return f"{record.url}&{urlencode(token.params())}"

    def manifest(self, record: LocationRecord) -> ContentManifest:
        """GET the content manifest a cloud location record leads to."""
        url = self.manifest_url(record)
        token = record.access_token
        assert token is not None  # manifest_url refused a record without one
        self.log.info("DataTransferService", f"GetDirectoryList_HTTP('{url}')")
        try:
            response = self._session.get(
                url, headers={TOKEN_SIGNATURE_HEADER: token.signature}, timeout=self.timeout
            )
        except requests.RequestException as exc:
            self.log.error(
                "DataTransferService", f"Error retrieving manifest (0x{codes.BAD_HTTP_STATUS:08x})."
            )
            raise ContentError(codes.BAD_HTTP_STATUS, f"manifest request failed: {exc}") from exc
        if response.status_code != 200:
            dts = "DataTransferService"
            self.log.error(dts, f"Request to {url} failed with {response.status_code}")
            self.log.error(
                dts,
                f"Error sending DAV request. HTTP code {response.status_code}, "
                f"status '{response.reason}'",
            )
            self.log.error(
                dts,
                f"GetDirectoryList_HTTP('{url}') failed with code 0x{codes.BAD_HTTP_STATUS:08x}.",
            )
            self.log.error(dts, f"Error retrieving manifest (0x{codes.BAD_HTTP_STATUS:08x}).")
            raise ContentError(
                codes.BAD_HTTP_STATUS, f"manifest answered {response.status_code} {response.reason}"
            )
        try:
            return ContentManifest.from_xml(response.content.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise ContentError(codes.BAD_HTTP_STATUS, f"unusable manifest: {exc}") from exc


def offered_location(client: CMGClient, record: LocationRecord) -> ProviderLocation:
    """``record`` as offered to a content provider: a token-authentication source (the CMG)
    with what fetching its manifest takes (the token's fields and signature, the manifest URL,
    the gateway's CA, the client's CCM token). Whether it may be offered is the caller's call
    (``SMSTSAllowTokenAuthURLForACP``, the site version)."""
    token = record.access_token
    auth = None
    if token is not None:
        auth = ProviderToken(
            tid=token.tid,
            iss=token.iss,
            alg=token.alg,
            st=token.st,
            et=token.et,
            signature=token.signature,
            signature_header=TOKEN_SIGNATURE_HEADER,
            manifest_url=client.manifest_url(record),
            ca_file=client.connection.ca_cert,
            client_token=client.bearer_token(),
        )
    return ProviderLocation(
        url=record.url,
        dp_type=record.dp_type,
        locality=record.locality,
        server=record.server_remote_name,
        version=record.version,
        token=auth,
    )


def _claim(token: str, name: str) -> datetime | None:
    """A time claim (``exp``, ``nbf``) of a JWT (a CCM or site token), read without checking
    it: the client reads its own token's times; None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims[name]), UTC)
    except (IndexError, ValueError, KeyError, TypeError, OverflowError, OSError):
        return None


def _transport_reason(exc: BaseException) -> str:
    """A failed request's class, plus OpenSSL's verdict on a refused server certificate.

    requests buries ``SSLCertVerificationError`` several wrappers deep (in ``args`` and
    ``reason``, not only ``__cause__``); its ``verify_message`` ("certificate has expired",
    "IP address mismatch") is what tells a user why the gateway was refused, and holds no
    secret.
    """
    seen: set[int] = set()
    pending: list[object] = [exc]
    while pending and len(seen) < 32:
        current = pending.pop()
        if id(current) in seen or not isinstance(current, BaseException):
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) and current.verify_message:
            return f"{exc.__class__.__name__} ({current.verify_message})"
        pending.extend(current.args)
        pending.extend((getattr(current, "reason", None), current.__cause__, current.__context__))
    return exc.__class__.__name__
