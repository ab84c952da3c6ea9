"""The scripted client: locates content through the CMG and runs task sequences like TSManager.

Flow for one package (docs/emulation.md, "One on-demand download")::

    cache lookup -> [miss] CCM_POST ContentLocationRequest through the CMG (token auth)
    -> cloud location record + access token -> GET getcontentxmlsecure (manifest, SAS URLs)
    -> room in the cache (evict or fail) -> download core (streaming SHA-256 per file)
    -> package hash check -> cache commit

The lookup-to-commit part runs under the cache's download lock for that content, so concurrent
requests for it (threads or processes) make one download (``_client/cache.py``).

Where content goes (docs/emulation.md, "Task sequence content locations"): in the full OS a step's
package goes to the client cache (ccmcache); in Windows PE, where there is no ccmexec and so no
client cache, to the task sequence cache (``_SMSTaskSequence/Packages``, ``tscache.py``). A
Download Package Content step may name its destination (:class:`ContentDestination`): the task
sequence directory, the client cache (not in Windows PE) or a custom path (downloaded to the task
sequence directory, then moved to ``<path>/<PackageID>``). Content in the task sequence cache is
deleted after the step that used it unless ``SMSTSPersistContent`` is true, and the whole cache
when the sequence ends; client cache entries the sequence downloaded are released then (eligible
for deletion) unless ``SMSTSPreserveContent`` is true, which pins what the sequence uses.

With an alternate content provider (the task sequence variable ``SMSTSDownloadProgram``, or a
Python ``provider``), located content is handed to it first (``acp.py``): it writes into a hidden
folder of the store's staging area, and what it delivered with exit 0 is hashed from disk and its
package hash checked against the location reply before one rename commits it where the built-in
download would have put it. ``SMSTSDownloadAbortCode`` fails the download; any other failure falls
back to the built-in download.

Log lines reuse the product's wording (docs/emulation.md, "Failure codes and log lines") so
scenarios can match them the way administrators search smsts.log.
"""

from __future__ import annotations

import base64
import errno
import json
import re
import shutil
import ssl
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn
from urllib.parse import urlencode

import requests

from .._errors import ContentError
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
from .._protocol.manifest import ContentManifest, ManifestFile, package_hash
from .._protocol.paths import (
    CCM_METHOD,
    TOKEN_SIGNATURE_HEADER,
    mutual_auth_path,
    sts_path,
    token_auth_path,
)
from .._protocol.settings import (
    CURRENT_SITE_VERSION,
    ClientSettings,
    DeploymentSettings,
    DownloadMode,
    LaunchContext,
    launch_refusal,
)
from .._protocol.winpath import disk_path, windows_path, windows_text
from . import tsenv
from .acp import (
    ABORT_CODE,
    ALLOW_TOKEN_AUTH,
    DEFAULT_TIMEOUT,
    DOWNLOAD_PROGRAM,
    E_ABORT,
    TOKEN_AUTH_FOR_ACP_SINCE,
    FolderContent,
    ProgramProvider,
    ProviderLocation,
    ProviderRequest,
    ProviderToken,
    parse_abort_code,
    read_folder,
)
from .cache import CacheEntry, CacheSpaceError
from .download import DownloadCore, redact
from .tscache import WORKING_DIRECTORY, TaskSequenceCache, place
from .tsenv import SetupState, TsEnv

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .acp import ContentProvider
    from .cache import ClientCache, Lease, SpaceReport
    from .log import SmstsLog
    from .retry import RetryPolicy

__all__ = [
    "PROGRAM_OUTPUT",
    "CMGClient",
    "CMGConnection",
    "Condition",
    "ContentDestination",
    "PackageTransfer",
    "ProviderRun",
    "Setup",
    "Step",
    "TaskSequence",
    "TaskSequenceEngine",
    "TaskSequenceResult",
    "offered_location",
]

#: The program cannot run at this time because the client is on the internet.
_NOT_ALLOWED_ON_INTERNET = 0x87D01018
#: E_FAIL: what an unsupported launch over a CMG ends with (no code is published; emulation).
_UNSUPPORTED_LAUNCH = 0x80004005
#: E_FAIL again: a custom download path that cannot be written (emulation).
_E_FAIL = 0x80004005
#: REGDB_E_CLASSNOTREG: no ccmexec (and so no client cache) in Windows PE; benign, as public
#: smsts.log samples from boot media show it (docs/emulation.md, "Failure codes and log lines").
_NO_CACHE_MANAGER = 0x80040154
#: Variables the product defines with defaults (Microsoft Learn: Task sequence variables).
_DEFAULT_VARIABLES = {"SMSTSDownloadRetryCount": "2", "SMSTSDownloadRetryDelay": "15"}
#: Not retried by the task sequence: wrong or oversized content would come back the same, a
#: failed content location fails the step at once in the public smsts.log samples
#: (docs/emulation.md, "Failure codes and log lines"), and an
#: alternate content provider's abort code means "no other download method" (E_ABORT).
_NOT_RETRIED = frozenset(
    {codes.HASH_MISMATCH, codes.CACHE_TOO_SMALL, codes.CACHE_FULL, codes.NO_LOCATIONS, E_ABORT}
)
#: Writes that fail because the disk (or the user's quota) is full: "cache full" (0x87D01201).
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
#: ERROR_DISK_FULL as an HRESULT: what BITS reports when it cannot write a file.
_HR_DISK_FULL = 0x80070070
#: E_INVALIDARG: a custom download path that would land inside a cache.
_HR_INVALID_ARG = 0x80070057
#: Task sequence variables of the content locations (Microsoft Learn: Task sequence variables).
#: The smsts.log component of an alternate content provider's own output (emulation: the
#: product publishes no such line; docs/emulation.md).
PROGRAM_OUTPUT = "DownloadProgram"
#: The files a provider left behind that the log and :class:`ProviderRun` name.
_LEFT_SHOWN = 20
_Outcome = Literal["delivered", "refused", "aborted", "fell back"]
PERSIST_CONTENT = "SMSTSPersistContent"
PRESERVE_CONTENT = "SMSTSPreserveContent"
LAST_LOCATION = "_SMSTSLastContentDownloadLocation"
#: The task sequence working folder, as the client sees it (``C:\\_SMSTaskSequence``).
DATA_PATH = "_SMSTSMDataPath"
#: A drive prefix of a Windows path (``C:``), mapped to the emulated system drive.
_DRIVE = re.compile(r"^[A-Za-z]:")


def _true(variables: dict[str, str], name: str) -> bool:
    return variables.get(name, "").strip().casefold() == "true"


def _int_variable(variables: dict[str, str], name: str, default: int) -> int:
    try:
        return max(0, int(variables.get(name, default)))
    except ValueError:
        return default


DOWNLOAD_PACKAGE_CONTENT = "download_package_content"
UPGRADE_OS = "upgrade_os"
RESTART_COMPUTER = "restart_computer"
STEP_ACTIONS = (
    "run_command_line",
    UPGRADE_OS,
    DOWNLOAD_PACKAGE_CONTENT,
    "apply_driver_package",
    RESTART_COMPUTER,
)
#: Variables the product sets when Windows Setup hands the machine back (Microsoft Learn: Task
#: sequence variables): Setup's exit code, in decimal, and TRUE after a rollback.
UPGRADE_RETURN_CODE = "_SMSTSOSUpgradeActionReturnCode"
SETUP_ROLLBACK = "_SMSTSSetupRollback"
#: Where Upgrade Operating System leaves the scripts Setup runs at its end (Microsoft Learn:
#: Upgrade Operating System step; docs/emulation.md, "Restarts").
_POST_UPGRADE = "C:\\Windows\\SMSTSPostUpgrade"


class ContentDestination:
    """Download Package Content's "Place into the following location" (Microsoft Learn: Task
    sequence steps, "Download Package Content"; docs/emulation.md, "Task sequence content
    locations")."""

    #: The task sequence working directory: kept there until the task sequence ends.
    TS_CACHE = "ts_cache"
    #: The client cache (ccmcache); in Windows PE, which has none, the task sequence directory.
    CLIENT_CACHE = "client_cache"
    #: A folder of the step's choice: the package lands in ``<path>/<PackageID>``.
    CUSTOM = "custom"
    ALL = (TS_CACHE, CLIENT_CACHE, CUSTOM)


def _drive_of(cache_root: Path) -> Path:
    """The system drive of a client cache: ``C:`` holds ``C:\\Windows\\ccmcache``.

    A cache elsewhere (a test's own folder) keeps the older rule: its parent is the drive.
    """
    parent = cache_root.parent
    if cache_root.name.lower() == "ccmcache" and parent.name.lower() == "windows":
        return parent.parent
    return parent


def custom_path_parts(path: str) -> tuple[str, ...]:
    """The folders of a custom download path, below the system drive.

    ``C:\\Drivers\\HP``, ``\\Drivers\\HP``, ``Drivers/HP`` all give ``("Drivers", "HP")``: the
    emulation maps the system drive to a folder of its own, so no path can leave it. ``..`` and
    an empty path are refused (``ValueError``). Any drive letter is read as ``C:`` (the one drive
    emulated), and the folders are then read by the one path rule (``winpath.disk_path``).
    """
    parts = tuple(p for p in _DRIVE.sub("", path.strip()).replace("\\", "/").split("/") if p)
    if not parts or any(p in (".", "..") for p in parts):
        msg = f"custom download path {path!r}: give folders below the system drive, without '..'"
        raise ValueError(msg)
    root = Path("/")
    return disk_path("C:\\" + "\\".join(parts), root).relative_to(root).parts


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
            raise ValueError(msg)

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
        #: The CCM token obtained for ``connection.aad_token`` (never logged; persisted across
        #: a restart in the task sequence state, as the product caches its token).
        self._ccm_token: str | None = None
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
        """
        if not self.connection.aad_token:
            return
        expires = _token_expiry(token)
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
            return conn.token
        if not conn.aad_token:
            return None
        if self._ccm_token is None:
            self._ccm_token = self._exchange_aad_token(conn.aad_token)
        return self._ccm_token

    def _exchange_aad_token(self, aad_token: str) -> str:
        """CCM_STS: an Azure AD device token in, a CCM token out (docs/emulation.md, "Azure AD
        client authentication")."""
        url = self.connection.sts_url
        self.log.info("ClientIDManagerStartup", f"Getting CCM Token from {url}")
        try:
            response = self._session.post(
                url,
                data=self.connection.client_id.encode("utf-8"),
                headers={"Authorization": f"Bearer {aad_token}", "User-Agent": USER_AGENT},
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
        params = {
            "tid": token.tid,
            "iss": token.iss,
            "alg": token.alg,
            "st": token.st,
            "et": token.et,
        }
        return f"{record.url}&{urlencode(params)}"

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


@dataclass(frozen=True)
class Condition:
    """A step condition on a task sequence variable (the "Options" tab's variable test).

    ``operator`` is ``equals``, ``not_equals`` or ``exists``.
    """

    variable: str
    operator: str = "equals"
    value: str = ""

    OPERATORS = ("equals", "not_equals", "exists")

    def holds(self, variables: dict[str, str]) -> bool:
        if self.operator == "exists":
            return self.variable in variables
        actual = variables.get(self.variable)
        if self.operator == "equals":
            return actual is not None and actual.casefold() == self.value.casefold()
        return actual is None or actual.casefold() != self.value.casefold()

    def __str__(self) -> str:
        if self.operator == "exists":
            return f"{self.variable} exists"
        sign = "=" if self.operator == "equals" else "<>"
        return f'{self.variable} {sign} "{self.value}"'


@dataclass(frozen=True)
class Setup:
    """What Windows Setup does after Upgrade Operating System hands it the machine.

    It restarts the computer ``restarts`` times, then ends with ``result``: ``success`` gives
    control back to the task sequence through SetupComplete.cmd, ``rollback`` restores the old
    OS and resumes it through SetupRollback.cmd. ``code`` is Setup's exit code, which the step
    fails with after a rollback (docs/emulation.md, "Restarts").
    """

    restarts: int = 1
    result: Literal["success", "rollback"] = "success"
    code: int = 0

    RESULTS = ("success", "rollback")

    def __post_init__(self) -> None:
        if self.restarts < 1 or self.result not in self.RESULTS or not 0 <= self.code < 2**32:
            msg = (
                f"setup {self}: Windows Setup restarts the computer at least once, ends with "
                f"one of {', '.join(self.RESULTS)}, and its code is a 32-bit unsigned value"
            )
            raise ValueError(msg)


@dataclass(frozen=True)
class Step:
    """One task sequence step; ``package`` is the ID of the content it needs, if any.

    A step runs only when every one of its ``conditions`` holds. A Download Package Content step
    may take several packages (the product's step takes a list): ``package`` is the first and
    ``extra_packages`` the rest, downloaded in that order; :attr:`packages` is all of them.
    """

    name: str
    action: str
    package: str | None = None
    conditions: tuple[Condition, ...] = ()
    #: Download Package Content only: where the package goes (:class:`ContentDestination`);
    #: ``None`` is where any step's content goes (the client cache; in Windows PE the task
    #: sequence directory).
    destination: str | None = None
    #: With ``destination`` ``custom``: the folder the package folder is put in.
    path: str | None = None
    #: Download Package Content only: "Save path as a variable": ``<variable>01`` gets the
    #: first package's location, ``<variable>02`` the second's... (the product numbers one
    #: variable per package of the step).
    variable: str | None = None
    #: Download Package Content only: the step's packages after ``package``, in order.
    extra_packages: tuple[str, ...] = ()
    #: Upgrade Operating System only: Windows Setup's restarts and result. ``None``: the
    #: upgrade is simulated without restarts (the step ends when its content was used).
    setup: Setup | None = None

    @property
    def packages(self) -> tuple[str, ...]:
        """Every package the step needs, in the order it obtains them."""
        return ((self.package,) if self.package else ()) + self.extra_packages

    def __post_init__(self) -> None:
        problems = []
        content_step = self.action == DOWNLOAD_PACKAGE_CONTENT
        if self.destination is not None and self.destination not in ContentDestination.ALL:
            problems.append(f"destination must be one of {', '.join(ContentDestination.ALL)}")
        if (
            self.destination is not None or self.variable is not None or self.extra_packages
        ) and not content_step:
            problems.append(
                f"destination, variable and extra_packages belong to {DOWNLOAD_PACKAGE_CONTENT} "
                "steps"
            )
        if self.extra_packages and not self.package:
            problems.append("extra_packages come after a first package")
        if len(set(self.packages)) != len(self.packages):
            problems.append("a package is listed twice")
        if (self.destination == ContentDestination.CUSTOM) != (self.path is not None):
            problems.append("a custom destination needs a path, and only it takes one")
        if self.setup is not None and self.action != UPGRADE_OS:
            problems.append(f"setup belongs to {UPGRADE_OS} steps")
        if self.action == RESTART_COMPUTER and self.packages:
            problems.append(f"a {RESTART_COMPUTER} step uses no package")
        if problems:
            msg = f"step {self.name!r}: " + "; ".join(problems)
            raise ValueError(msg)
        if self.path is not None:
            custom_path_parts(self.path)


@dataclass(frozen=True)
class TaskSequence:
    """A task sequence: its steps and the version of each package it references.

    ``boot_image`` says whether the task sequence references a boot image (an OS deployment
    rather than an in-place upgrade), which gates starting it over a CMG before 2006.
    """

    package_id: str
    name: str
    steps: tuple[Step, ...]
    package_versions: dict[str, int] = field(default_factory=dict)
    boot_image: bool = False
    #: Task sequence variables set before the first step (collection or device variables).
    variables: dict[str, str] = field(default_factory=dict)

    def version_of(self, package_id: str) -> int:
        return self.package_versions.get(package_id, 1)

    @property
    def restarts(self) -> bool:
        """Whether a step restarts the computer (Restart Computer, or an upgrade with Setup)."""
        return any(s.action == RESTART_COMPUTER or s.setup is not None for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        """The sequence as JSON data (what the persisted state keeps of it): lists, not tuples,
        so it reads back equal."""
        data: dict[str, Any] = json.loads(json.dumps(asdict(self)))
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskSequence:
        """The sequence :meth:`to_dict` gave."""
        steps = tuple(
            Step(
                **{
                    **step,
                    "conditions": tuple(Condition(**c) for c in step["conditions"]),
                    "extra_packages": tuple(step["extra_packages"]),
                    "setup": Setup(**step["setup"]) if step["setup"] else None,
                }
            )
            for step in data["steps"]
        )
        return cls(**{**data, "steps": steps})


@dataclass(frozen=True)
class PackageTransfer:
    """What obtaining one package cost: bytes read from storage (0 when the cache served it)."""

    package_id: str
    version: int
    files: int
    bytes: int
    seconds: float
    from_cache: bool
    #: The content provider that delivered it (``SMSTSDownloadProgram``'s program, or a Python
    #: provider's class name); ``None`` for the built-in download and the cache.
    provider: str | None = None


@dataclass(frozen=True)
class ProviderRun:
    """One package handed to a content provider, and how it ended.

    ``outcome`` is ``delivered`` (exit 0 and verified), ``refused`` (exit 0, but the folder
    did not verify: 0x80091007), ``aborted`` (the abort code), or ``fell back`` (any other exit,
    a timeout or an exception: the built-in download was tried next). ``exit_code`` is None
    when the provider raised or did not return an int. ``left`` is what a provider that fell
    back or aborted left in its destination (relative paths, at most :data:`_LEFT_SHOWN`): a
    failed download must leave nothing, and the engine removes it, so it is recorded before.
    """

    package_id: str
    version: int
    provider: str
    exit_code: int | None
    outcome: _Outcome
    left: tuple[str, ...] = ()
    #: When the provider was handed the package, and when it returned (``time.monotonic``):
    #: what a test matches against server logs to tell the provider's requests apart.
    started: float = 0.0
    ended: float = 0.0


@dataclass
class TaskSequenceResult:
    exit_code: int
    steps_run: list[str]
    transfers: list[PackageTransfer]
    failed_step: str | None = None
    error: ContentError | None = None
    #: Every package handed to a content provider (``SMSTSDownloadProgram``), in order.
    provider_runs: list[ProviderRun] = field(default_factory=list)
    #: Keys of the task sequence cache's content when the sequence ended, before the cache was
    #: emptied: what ``SMSTSPersistContent`` and Download Package Content kept for the run.
    ts_cache: list[str] = field(default_factory=list)
    #: Set when this boot ended because the computer restarts (``restart_computer``, ``setup``):
    #: the state is persisted and :meth:`TaskSequenceEngine.resume` continues the sequence.
    restart: str | None = None
    #: Restarts of the sequence so far.
    reboots: int = 0

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0

    def bytes_from_storage(self, package_id: str) -> int:
        return sum(t.bytes for t in self.transfers if t.package_id == package_id)


class TaskSequenceEngine:
    """Runs a task sequence on a client on the internet, getting content through the CMG."""

    def __init__(
        self,
        client: CMGClient,
        cache: ClientCache,
        log: SmstsLog,
        deployment: DeploymentSettings | None = None,
        download_core: DownloadCore | None = None,
        *,
        retry: RetryPolicy | None = None,
        site_version: int = CURRENT_SITE_VERSION,
        ts_cache: TaskSequenceCache | None = None,
        system_drive: Path | None = None,
        provider: ContentProvider | None = None,
        download_program_timeout: float = DEFAULT_TIMEOUT,
        storage_ca_file: Path | None = None,
    ) -> None:
        """``ts_cache`` is the task sequence cache (default: ``_SMSTaskSequence`` beside the
        client cache, made on first use); ``system_drive`` is the folder custom download paths
        are below (default: the folder holding the client cache, as C: holds the product's).

        ``provider`` is a Python content provider (``acp.ContentProvider``) each package is
        handed to before the built-in download, as to the program of ``SMSTSDownloadProgram``;
        when a task sequence sets that variable, its program is used instead.
        ``download_program_timeout`` is the seconds that program may run before its process
        group is killed; ``storage_ca_file`` the private CA of HTTPS storage, named to providers.
        """
        self.client = client
        #: The site's version, as the client knows it from policy; it gates launch contexts.
        self.site_version = site_version
        self.launch = LaunchContext.SOFTWARE_CENTER
        self.cache = cache
        self.log = log
        self.deployment = deployment or DeploymentSettings()
        self.core = download_core or DownloadCore(
            retry=retry, on_event=lambda line: log.info("DataTransferService", line)
        )
        self.variables: dict[str, str] = {}
        self.transfers: list[PackageTransfer] = []
        self.provider_runs: list[ProviderRun] = []
        #: Cache entries this engine holds (in use: never evicted), one lease per entry: keyed
        #: by (in the task sequence cache, entry key).
        self._leases: dict[tuple[bool, str], Lease] = {}
        self.system_drive = system_drive if system_drive is not None else _drive_of(cache.root)
        self._ts_cache = ts_cache
        #: Of this run: client cache entries it downloaded (released at its end unless
        #: preserved), those it pinned, and task sequence cache content kept to its end.
        self._downloaded: set[str] = set()
        self._pinned: set[str] = set()
        self._kept: set[str] = set()
        self.provider = provider
        self.download_program_timeout = download_program_timeout
        self.storage_ca_file = storage_ca_file
        #: ``on_job(package_id, version, files, total_bytes)``: a package download begins
        #: (with the core's ``on_progress``, enough to draw a progress bar).
        self.on_job: Callable[[str, int, int, int], None] | None = None
        #: Persist the state at every step boundary (``tsenv.py``), so a power cut at any
        #: moment resumes at the step it cut. Always on for a sequence with a restart step.
        self.persist = False
        #: Restarts of the running sequence so far.
        self.reboots = 0

    def close(self) -> None:
        self.release_content()
        self.core.close()
        self.client.close()

    @property
    def ts_cache(self) -> TaskSequenceCache:
        """The task sequence cache (its folder is made on first use)."""
        if self._ts_cache is None:
            self._ts_cache = TaskSequenceCache(
                self.system_drive / WORKING_DIRECTORY, lock_timeout=self.cache.lock_timeout
            )
        return self._ts_cache

    def release_content(self, key: str | None = None) -> None:
        """Stop holding the cache entry ``key`` (every entry by default): it may be evicted again."""
        for held in [k for k in self._leases if key is None or k[1] == key]:
            self._leases.pop(held).release()

    def _keep(self, lease: Lease) -> CacheEntry:
        held = (lease.cache is self._ts_cache, lease.entry.key)
        if held in self._leases:
            lease.release()  # already held: one lease per entry is enough
        else:
            self._leases[held] = lease
        return lease.entry

    def _unhold(self, store: ClientCache, key: str) -> None:
        lease = self._leases.pop((store is self._ts_cache, key), None)
        if lease is not None:
            lease.release()

    def windows(self, path: Path) -> str:
        """``path`` as the client sees it (``C:\\...``): the one rule of ``winpath``."""
        return windows_path(path, self.system_drive)

    def _set(self, name: str, value: str) -> None:
        self.variables[name] = value
        self.log.info("TSManager", f"Set a global environment variable {name}={value}")

    def run(
        self, sequence: TaskSequence, launch: str = LaunchContext.SOFTWARE_CENTER
    ) -> TaskSequenceResult:
        """Run ``sequence``; the content it uses is held in the cache while it needs it.

        On demand, a step holds its package for the step; with "download all content locally
        before starting", every package is held from its download to the end of the sequence
        (eviction cannot take one package to make room for the next). When the sequence ends,
        however it ends, the task sequence cache is emptied and the client cache entries it
        downloaded are released, unless ``SMSTSPreserveContent`` pinned them.
        """
        return self._ended(lambda: self._run(sequence, launch))

    def resume(self) -> TaskSequenceResult | None:
        """Continue the sequence a previous boot left in the working directory (``tsenv.py``).

        Returns None when there is none: the computer was not restarted by a sequence. Whatever
        lived in the previous boot's memory is gone; what it persisted is read back, as
        TSManager reads TSEnv.dat when it starts after a restart.
        """
        state = tsenv.load(self.system_drive / WORKING_DIRECTORY)
        if state is None:
            return None
        return self._ended(lambda: self._resume(state))

    def _ended(self, body: Callable[[], TaskSequenceResult]) -> TaskSequenceResult:
        """``body``'s result, with the content work of the end of the sequence done, unless the
        computer restarts (then the state stays for the next boot and content stays on disk)."""
        try:
            result = body()
        except BaseException:
            self._end_content()
            raise
        result.reboots = self.reboots
        if result.restart is not None:
            self.release_content()
            return result
        result.ts_cache = self._end_content()
        tsenv.remove(self.system_drive / WORKING_DIRECTORY)
        return result

    def _end_content(self) -> list[str]:
        """The content work of the end of a run; returns what the task sequence cache held."""
        self.release_content()
        ts, cm = "TSManager", "CacheManager"
        held: list[str] = []
        if self._ts_cache is not None:
            removed = self._ts_cache.clear()
            held = [entry.key for entry in removed]
            for entry in removed:
                self.log.info(
                    ts,
                    f"Deleting content {entry.key} from the task sequence working directory: "
                    "the task sequence has ended",
                )
        for key in sorted(self._downloaded - self._pinned):
            package_id, _, version = key.rpartition(".")
            released = self.cache.lookup(package_id, int(version))
            if released is None:
                continue
            self.cache.expire(released)
            self.log.info(
                cm,
                f"Content {key} is no longer needed by the task sequence: eligible for deletion "
                f"({PRESERVE_CONTENT} is not set)",
            )
        for key in sorted(self._pinned):
            self.log.info(cm, f"Content {key} stays pinned in the cache ({PRESERVE_CONTENT})")
        self._downloaded, self._pinned, self._kept = set(), set(), set()
        return held

    def _run(self, sequence: TaskSequence, launch: str) -> TaskSequenceResult:
        self.transfers = []
        self.provider_runs = []
        self.reboots = 0
        steps_run: list[str] = []
        ts = "TSManager"
        self.log.info(
            ts, f"Starting task sequence {sequence.name} ({sequence.package_id}) from {launch}"
        )
        self.launch = launch
        refusal = launch_refusal(self.site_version, launch, boot_image=sequence.boot_image)
        if refusal:
            self.log.error(ts, f"This task sequence cannot run from {launch}: {refusal}")
            return self._fail(None, ContentError(_UNSUPPORTED_LAUNCH, refusal), steps_run)
        if not self.deployment.allow_internet:
            error = ContentError(
                _NOT_ALLOWED_ON_INTERNET,
                "The program cannot run at this time because the client is on the internet",
            )
            return self._fail(None, error, steps_run)
        self.variables = {**_DEFAULT_VARIABLES, **sequence.variables}
        on_demand = self.deployment.download_mode == DownloadMode.ON_DEMAND
        self._set("_SMSTSDownloadOnDemand", "true" if on_demand else "false")
        self._set(DATA_PATH, self.windows(self.system_drive / WORKING_DIRECTORY))
        if not on_demand:
            # "Download all content locally before starting": every referenced package, before
            # the first step, whatever the steps' conditions (docs/emulation.md, "Settings and
            # task sequence variables").
            first = {p: s for s in reversed(sequence.steps) for p in s.packages}
            for package_id in dict.fromkeys(p for s in sequence.steps for p in s.packages):
                try:
                    self._resolve_with_retries(
                        package_id,
                        sequence.version_of(package_id),
                        self._store_for(first[package_id], quiet=True),
                    )
                except ContentError as error:
                    return self._fail(None, error, steps_run)
        return self._steps(sequence, 0, steps_run)

    def _steps(
        self, sequence: TaskSequence, start: int, steps_run: list[str]
    ) -> TaskSequenceResult:
        """Run the steps from the ``start``-th on; ``steps_run`` has those run before."""
        ts = "TSManager"
        on_demand = self.deployment.download_mode == DownloadMode.ON_DEMAND
        for index in range(start, len(sequence.steps)):
            step = sequence.steps[index]
            if self.persist or sequence.restarts:
                # Before the step: a power cut while it runs starts it again on the next boot.
                self._save(sequence, index, steps_run)
            self.log.info(
                ts,
                f"Start executing an instruction. Instruction name: {step.name}. "
                f"Instruction pointer: {index}",
            )
            failing = next((c for c in step.conditions if not c.holds(self.variables)), None)
            if failing is not None:
                self.log.info(
                    ts,
                    f"The condition for the action ({step.name}) is evaluated to be false "
                    f"({failing})",
                )
                continue
            if step.action == RESTART_COMPUTER:
                steps_run.append(step.name)
                self.log.info(ts, f"The action ({step.name}) initiated a reboot request")
                return self._restart(sequence, index + 1, steps_run, RESTART_COMPUTER)
            try:
                for number, package_id in enumerate(step.packages, start=1):
                    self._step_content(
                        step, package_id, sequence.version_of(package_id), on_demand, number
                    )
            except ContentError as error:
                return self._fail(step.name, error, steps_run)
            if step.setup is not None:
                self.log.info(
                    ts,
                    f"{step.name}: Windows Setup takes over the upgrade; it runs "
                    f"{_POST_UPGRADE}\\SetupComplete.cmd when it succeeds and "
                    f"{_POST_UPGRADE}\\SetupRollback.cmd when it rolls back",
                )
                setup = SetupState(
                    index, step.setup.restarts - 1, step.setup.result, step.setup.code
                )
                return self._restart(sequence, index, steps_run, "setup", setup)
            steps_run.append(step.name)
            self.log.info(
                ts, f"Successfully completed the action ({step.name}) with the exit win32 code 0"
            )
        self.log.info(ts, "Task sequence completed 0x00000000")
        return TaskSequenceResult(
            0, steps_run, list(self.transfers), provider_runs=list(self.provider_runs)
        )

    def _state(self, sequence: TaskSequence, next_step: int, steps_run: list[str]) -> TsEnv:
        return TsEnv(
            sequence=sequence.to_dict(),
            launch=self.launch,
            next_step=next_step,
            variables=dict(self.variables),
            steps_run=list(steps_run),
            transfers=[asdict(t) for t in self.transfers],
            provider_runs=[asdict(r) for r in self.provider_runs],
            downloaded=sorted(self._downloaded),
            pinned=sorted(self._pinned),
            kept=sorted(self._kept),
            reboots=self.reboots,
            ccm_token=self.client.cached_ccm_token,
        )

    def _save(
        self,
        sequence: TaskSequence,
        next_step: int,
        steps_run: list[str],
        restarting: str = "",
        setup: SetupState | None = None,
    ) -> None:
        state = self._state(sequence, next_step, steps_run)
        state.restarting, state.setup = restarting, setup
        tsenv.save(self.system_drive / WORKING_DIRECTORY, state)

    def _restart(
        self,
        sequence: TaskSequence,
        next_step: int,
        steps_run: list[str],
        why: str,
        setup: SetupState | None = None,
    ) -> TaskSequenceResult:
        """Persist the state and end this boot: the computer restarts."""
        self._save(sequence, next_step, steps_run, why, setup)
        self.log.info(
            "TSManager",
            "Saved the task sequence environment to "
            + self.windows(self.system_drive / WORKING_DIRECTORY / tsenv.TSENV_FILE),
        )
        self.log.info("TSManager", "The computer is going to restart")
        return TaskSequenceResult(
            0,
            steps_run,
            list(self.transfers),
            provider_runs=list(self.provider_runs),
            restart=why,
        )

    def _resume(self, state: TsEnv) -> TaskSequenceResult:
        """The next boot: read the state back and continue where the last boot stopped."""
        ts = "TSManager"
        sequence = TaskSequence.from_dict(state.sequence)
        self.launch = state.launch
        self.variables = dict(state.variables)
        self.transfers = [PackageTransfer(**t) for t in state.transfers]
        self.provider_runs = [
            ProviderRun(**{**r, "left": tuple(r["left"])}) for r in state.provider_runs
        ]
        self._downloaded, self._pinned = set(state.downloaded), set(state.pinned)
        self._kept = set(state.kept)
        self.reboots = state.reboots + 1
        steps_run = list(state.steps_run)
        if state.ccm_token:
            self.client.restore_ccm_token(state.ccm_token)
        if (self.system_drive / WORKING_DIRECTORY / "Packages").is_dir():
            _ = self.ts_cache  # the working directory's content is this run's again
        how = "a restart" if state.restarting else "an unexpected restart (power cut)"
        self.log.info(
            ts,
            f"Resuming task sequence {sequence.name} ({sequence.package_id}) after {how}: "
            f"restart {self.reboots}, instruction pointer {state.next_step}",
        )
        setup = state.setup
        if setup is None:
            return self._steps(sequence, state.next_step, steps_run)
        step = sequence.steps[setup.step]
        if setup.restarts_left > 0:
            self.log.info(ts, "Windows Setup is restarting the computer")
            setup.restarts_left -= 1
            return self._restart(sequence, setup.step, steps_run, "setup", setup)
        self._set(UPGRADE_RETURN_CODE, str(setup.code))
        if setup.result == "rollback":
            self.log.info(
                "SetupRollback",
                f"{_POST_UPGRADE}\\SetupRollback.cmd: Windows Setup rolled back the upgrade "
                f"(0x{setup.code:08X}); starting TSMBootstrap to resume the task sequence",
            )
            self._set(SETUP_ROLLBACK, "TRUE")
            error = ContentError(
                setup.code, f"Windows Setup rolled back the upgrade with 0x{setup.code:08X}"
            )
            return self._fail(step.name, error, steps_run)
        self.log.info(
            "SetupComplete",
            f"{_POST_UPGRADE}\\SetupComplete.cmd: Windows Setup completed the upgrade; "
            "starting TSMBootstrap to resume the task sequence",
        )
        steps_run.append(step.name)
        self.log.info(
            ts,
            f"Successfully completed the action ({step.name}) with the exit win32 code 0",
        )
        return self._steps(sequence, setup.step + 1, steps_run)

    def _step_content(
        self, step: Step, package_id: str, version: int, on_demand: bool, number: int
    ) -> None:
        """Obtain one of a step's packages (the ``number``-th) where the step wants it, run the
        step with it, then let it go."""
        key = f"{package_id}.{version}"
        store = self._store_for(step)
        # Checked before any byte is fetched: a path the step cannot use fails it at once.
        target = self._custom_destination(step, package_id)
        # Content the task sequence cache held before this step is not this step's to move.
        was_there = target is not None and self.ts_cache.lookup(package_id, version) is not None
        entry = self._resolve_with_retries(package_id, version, store)
        from_ts = self._ts_cache is not None and entry.path.parent == self._ts_cache.root
        used = entry
        if target is not None:
            used = self._place(entry, target, move=not was_there)
        elif from_ts and step.action == DOWNLOAD_PACKAGE_CONTENT:
            # Placed there on purpose, for later steps: it stays until the sequence ends.
            self._kept.add(key)
        self._execute(step, used)
        if step.variable:
            self._set(f"{step.variable}{number:02d}", self.windows(used.path))
        if on_demand or from_ts:
            self._unhold(self.ts_cache if from_ts else self.cache, key)
        if from_ts and (target is None or was_there):
            self._after_step(package_id, version)

    def _after_step(self, package_id: str, version: int) -> None:
        """Content a step used from the task sequence cache goes, unless it is kept for the run."""
        key = f"{package_id}.{version}"
        if key in self._kept:
            return
        ts = "TSManager"
        if _true(self.variables, PERSIST_CONTENT):
            self._kept.add(key)
            self.log.info(
                ts, f"{PERSIST_CONTENT} is set: content {key} stays in the task sequence cache"
            )
            return
        self._unhold(self.ts_cache, key)
        entry = self.ts_cache.lookup(package_id, version)
        if entry is not None and self.ts_cache.remove(entry):
            self.log.info(
                ts,
                f"Deleting content {key} from the task sequence cache: the step that used it "
                f"is done ({PERSIST_CONTENT} is not set)",
            )

    def _store_for(self, step: Step, *, quiet: bool = False) -> ClientCache:
        """Where ``step``'s package is downloaded to: the client cache or the task sequence's."""
        destination = step.destination if step.action == DOWNLOAD_PACKAGE_CONTENT else None
        if destination in (ContentDestination.TS_CACHE, ContentDestination.CUSTOM):
            return self.ts_cache
        if self.launch in LaunchContext.IN_WINDOWS_PE:
            if destination == ContentDestination.CLIENT_CACHE and not quiet:
                self.log.info(
                    "TSManager",
                    f"{step.name}: the client cache is not available in Windows PE; the content "
                    "goes to the task sequence working directory",
                )
            return self.ts_cache
        return self.cache

    def _custom_destination(self, step: Step, package_id: str) -> Path | None:
        """``<system drive>/<path>/<PackageID>`` for a custom destination, else ``None``."""
        if step.destination != ContentDestination.CUSTOM or step.path is None:
            return None
        destination = self.system_drive.joinpath(*custom_path_parts(step.path), package_id)
        for inside in (self.cache.root, self.ts_cache.working_directory):
            if destination.resolve().is_relative_to(inside.resolve()):
                self.log.error(
                    "TSManager",
                    f"{step.name}: the custom path {step.path} is inside a cache "
                    f"({self.windows(inside)})",
                )
                raise ContentError(
                    _HR_INVALID_ARG,
                    f"custom download path {step.path!r} is inside a cache ({self.windows(inside)})",
                )
        return destination

    def _place(self, entry: CacheEntry, destination: Path, *, move: bool) -> CacheEntry:
        """Download Package Content to a custom path: the package folder goes to
        ``destination``, moved out of the task sequence cache (copied when it was there before
        this step, for another use)."""
        how = "Moved" if move else "Copied"
        try:
            if move:
                self._unhold(self.ts_cache, entry.key)
                self.ts_cache.take(entry, destination)
            else:
                place(entry.path, destination, move=False)
        except OSError as error:
            hr = codes.CACHE_FULL if error.errno in _DISK_FULL else _E_FAIL
            self.log.error(
                "TSManager",
                f"Failed to place content {entry.key} at {self.windows(destination)}: "
                f"{error.strerror} "
                f"(0x{hr:08X})",
            )
            where = self.windows(destination)
            raise ContentError(hr, f"{entry.key} could not be placed at {where}") from error
        self.log.info(
            "TSManager",
            f"{how} content {entry.key} from the task sequence working directory to "
            f"{self.windows(destination)}",
        )
        return CacheEntry(entry.package_id, entry.version, destination)

    def _resolve_with_retries(
        self, package_id: str, version: int, into: ClientCache | None = None
    ) -> CacheEntry:
        """``resolve`` repeated as ``SMSTSDownloadRetryCount`` and ``SMSTSDownloadRetryDelay`` say.

        Content that is wrong (hash mismatch) or cannot fit is not retried: another try would
        fetch the same bytes into the same cache. A try that gave up on transient errors leaves
        its verified prefix in staging, so the next try continues from it (as a BITS job keeps
        its progress); after the last try, staging is emptied (no partial outlives a terminal
        failure, docs/reliability.md row 18).
        """
        count = _int_variable(self.variables, "SMSTSDownloadRetryCount", 2)
        delay = _int_variable(self.variables, "SMSTSDownloadRetryDelay", 15)
        store = into if into is not None else self._default_store()
        attempt = 0
        while True:
            try:
                return self._resolve_on_disk(package_id, version, store)
            except ContentError as error:
                if attempt >= count or error.hresult in _NOT_RETRIED:
                    if error.resumable:
                        store.discard_staging(package_id, version)
                    raise
                attempt += 1
                self.log.info(
                    "TSManager",
                    f"Content download for {package_id}:{version} failed "
                    f"(0x{error.hresult:08X}); retry {attempt} of {count} in {delay} seconds",
                )
                self.core.retry.sleep(float(delay))

    def _resolve_on_disk(
        self, package_id: str, version: int, into: ClientCache | None
    ) -> CacheEntry:
        """``resolve``, with a full disk (ENOSPC at any write) reported as "cache full"."""
        store = into if into is not None else self._default_store()
        try:
            return self.resolve(package_id, version, into=store)
        except OSError as error:
            if error.errno not in _DISK_FULL:
                raise
            # By now ClientCache.staging has removed the partial download; committed entries
            # were never written to and stay as they were.
            self.log.error(
                "DataTransferService",
                f"Failed to write content {package_id}.{version} under {self.windows(store.root)}: "
                f"There is not enough space on the disk. (0x{_HR_DISK_FULL:08X})",
            )
            self._download_failed(package_id, version, codes.CACHE_FULL)
            raise ContentError(
                codes.CACHE_FULL, f"{package_id}.{version}: the disk is full ({error.strerror})"
            ) from error

    def _fail(
        self, step: str | None, error: ContentError, steps_run: list[str]
    ) -> TaskSequenceResult:
        ts = "TSManager"
        if step is not None:
            self.log.error(ts, f"Failed to run the action: {step}. Error 0x{error.hresult:08X}")
        self.log.error(ts, f"Task sequence execution failed with error code 0x{error.hresult:08X}")
        return TaskSequenceResult(
            error.hresult,
            steps_run,
            list(self.transfers),
            step,
            error,
            provider_runs=list(self.provider_runs),
        )

    def _execute(self, step: Step, entry: CacheEntry) -> None:
        # Steps are simulated: what the harness checks is that the verified content was there,
        # at the location the product would hand the step.
        files = sum(1 for p in entry.path.rglob("*") if p.is_file())
        self.log.info(
            "TSManager",
            f"{step.action}: using content {entry.key} at {self.windows(entry.path)} "
            f"({files} files)",
        )
        self._set(LAST_LOCATION, self.windows(entry.path))

    def _default_store(self) -> ClientCache:
        in_pe = self.launch in LaunchContext.IN_WINDOWS_PE
        return self.ts_cache if in_pe else self.cache

    def resolve(
        self, package_id: str, version: int, *, into: ClientCache | None = None
    ) -> CacheEntry:
        """Return the verified cache entry for a package version, downloading it if needed.

        Content already in the task sequence cache is used from there; the client cache is looked
        up (outside Windows PE) when it is where the content would go. Otherwise the content is
        downloaded ``into`` the client cache (the default; the task sequence cache in Windows PE)
        or the task sequence cache.

        The engine holds the entry (a cache lease: it cannot be evicted) until
        :meth:`release_content`; ``run`` releases what it resolved. A write that finds the disk
        full raises ``OSError`` here; ``run`` reports it as 0x87D01201. A download given up on
        transient errors raises a ``resumable`` :class:`ContentError` and keeps its verified
        prefix in the store's staging: calling ``resolve`` again continues from it, and
        ``ClientCache.discard_staging`` drops it.
        """
        store = into if into is not None else self._default_store()
        cm = "CacheManager"
        self.log.info("TSManager", f"Resolving local content for {package_id}:{version}")
        self.log.info(cm, f"Getting cached content information for {package_id}.{version}")
        in_pe = self.launch in LaunchContext.IN_WINDOWS_PE
        if in_pe:
            # No ccmexec in Windows PE: the product logs this and goes on to locate the content
            # (and there is no client cache to look in, or to download to).
            self.log.info(
                "TSManager",
                "Failed to create instance of of ICacheManager. Is ccmexec running?, "
                f"hr=0x{_NO_CACHE_MANAGER:08x}",
            )
        cached = self._from_ts_cache(package_id, version)
        if cached is None and store is self.cache and not in_pe:
            cached = self._from_cache(package_id, version)
        if cached is not None:
            return cached

        def waiting() -> None:
            self.log.info(
                cm,
                f"Content {package_id}.{version} is being downloaded by another request; "
                "waiting for it to finish",
            )

        # One download per content, across threads and processes (docs/reliability.md row 41): the
        # others wait here, then find the entry it committed without touching the network.
        with store.download_lock(package_id, version, on_wait=waiting):
            cached = (
                self._from_cache(package_id, version)
                if store is self.cache
                else self._from_ts_cache(package_id, version)
            )
            if cached is not None:
                return cached
            return self._locate_and_download(package_id, version, store)

    def _from_cache(self, package_id: str, version: int) -> CacheEntry | None:
        lease = self.cache.acquire(package_id, version)
        if lease is None:
            return None
        entry = self._keep(lease)
        self.log.info(
            "CacheManager",
            f"Content {package_id}.{version} found in cache at {self.windows(entry.path)}",
        )
        self._preserve(entry)
        self.transfers.append(PackageTransfer(package_id, version, 0, 0, 0.0, from_cache=True))
        return entry

    def _from_ts_cache(self, package_id: str, version: int) -> CacheEntry | None:
        # Looked up only once something made the cache: a full-OS run that never needed it
        # leaves no folder behind.
        if self._ts_cache is None:
            return None
        lease = self._ts_cache.acquire(package_id, version)
        if lease is None:
            return None
        entry = self._keep(lease)
        self.log.info(
            "TSManager",
            f"Content {package_id}.{version} found in the task sequence cache at "
            f"{self.windows(entry.path)}",
        )
        self.transfers.append(PackageTransfer(package_id, version, 0, 0, 0.0, from_cache=True))
        return entry

    def _preserve(self, entry: CacheEntry) -> None:
        """With ``SMSTSPreserveContent``, pin client cache content the sequence uses."""
        if entry.key in self._pinned or not _true(self.variables, PRESERVE_CONTENT):
            return
        self.cache.pin(entry)
        self._pinned.add(entry.key)
        self.log.info(
            "CacheManager",
            f"Pinned content {entry.key} in the cache: it is kept after the task sequence "
            f"({PRESERVE_CONTENT})",
        )

    def _locate_and_download(self, package_id: str, version: int, store: ClientCache) -> CacheEntry:
        try:
            reply = self.client.locate(package_id, version)
        except ContentError as error:
            self._no_location(package_id, version, error)
        self.log.info("TSManager", f"Processing {len(reply.records)} locations.")
        usable: LocationRecord | None = None
        for record in reply.records:
            self.log.info(
                "LocationServices",
                f"Distribution Point='{redact(record.url)}', Locality='{record.locality}', "
                f"Version='{record.version}', DPType='{record.dp_type}'",
            )
            # In reply order; on the internet only the cloud source is reachable: an intranet
            # DP is skipped without a connection attempt (emulation, docs/emulation.md).
            if usable is None and record.is_cloud:
                usable = record
            elif not record.is_cloud:
                self.log.info(
                    "LocationServices",
                    f"Skipping distribution point '{record.server_remote_name}': the client is "
                    "on the internet and cannot reach an intranet distribution point",
                )
        chosen = self._content_provider()
        if chosen is not None:
            provided = self._provide(*chosen, package_id, version, reply, store)
            if provided is not None:
                return provided
        if usable is None:
            self.log.info("TSManager", "No static content server.")
            self._no_location(package_id, version, None)
        return self._download(package_id, version, reply, usable, store)

    # --- the alternate content provider (acp.py) ----------------------------------------------

    def _content_provider(self) -> tuple[ContentProvider, str] | None:
        """The provider to hand content to, and its name for the log, if any.

        ``SMSTSDownloadProgram`` (what the task sequence says) wins over the engine's Python
        ``provider``. A program string that cannot be split is logged and the built-in download
        used, as for a program that cannot run.
        """
        program = self.variables.get(DOWNLOAD_PROGRAM, "").strip()
        if not program:
            if self.provider is None:
                return None
            return self.provider, type(self.provider).__qualname__
        try:
            runner = ProgramProvider(
                program,
                timeout=self.download_program_timeout,
                # Its command line and output name the folder it was given on disk: written in
                # the client's form, as a Windows program's would read (winpath.windows_text).
                on_event=lambda line: self.log.info(
                    "TSManager", windows_text(line, self.system_drive)
                ),
                # Into smsts.log (emulation, docs/emulation.md): what the program prints is
                # then read as the product's own lines are, so a leaked secret is seen.
                on_output=lambda line: self.log.info(
                    PROGRAM_OUTPUT, windows_text(line, self.system_drive)
                ),
            )
        except ValueError as error:
            self.log.error("TSManager", f"{error}: using the built-in download")
            return None
        return runner, program

    def _abort_code(self) -> int | None:
        value = self.variables.get(ABORT_CODE, "").strip()
        if not value:
            return None
        try:
            return parse_abort_code(value)
        except ValueError as error:
            self.log.error("TSManager", f"{error}; no exit code aborts the download")
            return None

    def _offered(self, reply: ContentLocationReply) -> tuple[ProviderLocation, ...]:
        """The location records offered to a provider, in reply order.

        A token-authentication source (the CMG: a record with an access token) is offered only
        when ``SMSTSAllowTokenAuthURLForACP`` is true and the site is 2203 or later; it then
        carries what is needed to fetch its manifest (the token's fields and signature, the
        gateway's CA, the client's CCM token).
        """
        if not _true(self.variables, ALLOW_TOKEN_AUTH):
            withheld = f"{ALLOW_TOKEN_AUTH} is not true"
        elif self.site_version < TOKEN_AUTH_FOR_ACP_SINCE:
            withheld = (
                f"{ALLOW_TOKEN_AUTH} applies from site version {TOKEN_AUTH_FOR_ACP_SINCE}; this "
                f"site is {self.site_version}"
            )
        else:
            withheld = ""
        offered: list[ProviderLocation] = []
        for record in reply.records:
            token = record.access_token
            if token is not None and withheld:
                self.log.info(
                    "TSManager",
                    "Not offering the token-authentication source "
                    f"'{record.server_remote_name}' to the alternate content provider: "
                    f"{withheld}",
                )
                continue
            offered.append(offered_location(self.client, record))
        return tuple(offered)

    def _provide(
        self,
        provider: ContentProvider,
        name: str,
        package_id: str,
        version: int,
        reply: ContentLocationReply,
        store: ClientCache,
    ) -> CacheEntry | None:
        """Hand the content to ``provider``; the verified, committed entry, or ``None`` to fall
        back to the built-in download.

        The provider writes into a folder of its own in the store's staging area (hidden, so
        no eviction takes it meanwhile); after it returns 0 the folder is hashed from disk and
        its package hash checked against the location reply before it is committed, by one
        rename, where the built-in download would have put the content. The folder is removed
        on every other path, so nothing unverified reaches a cache or outlives the call.
        """
        key = f"{package_id}.{version}"
        ts = "TSManager"
        folder = store.provider_folder(package_id, version)
        started = time.perf_counter()
        try:
            # A folder left by a process killed during an earlier provider run is not trusted.
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            request = ProviderRequest(
                package_id=package_id,
                version=version,
                package_hash=reply.package_hash.upper(),
                destination=folder,
                locations=self._offered(reply),
                site_code=self.client.connection.site_code,
                client_id=self.client.connection.client_id,
                site_version=self.site_version,
                abort_code=self._abort_code(),
                storage_ca_file=self.storage_ca_file,
            )
            self.log.info(
                ts,
                f"Downloading content {key} with the alternate content provider {name} "
                f"({len(request.locations)} location(s) offered) into {self.windows(folder)}",
            )

            def ended(code: int | None, outcome: _Outcome) -> None:
                left: tuple[str, ...] = ()
                # Exit 0 hands the folder over (verified next); any other end must leave it empty.
                if outcome in ("fell back", "aborted"):
                    left = _left_in(folder)
                    if left:
                        self.log.warning(
                            ts,
                            f"The alternate content provider left {_count(left)} in "
                            f"{self.windows(folder)} "
                            f"for content {key}: {', '.join(left)}; removing them",
                        )
                self.provider_runs.append(
                    ProviderRun(
                        package_id, version, name, code, outcome, left, began, time.monotonic()
                    )
                )

            began = time.monotonic()
            try:
                code = provider.fetch(request)
            except (
                Exception
            ) as error:  # any failure of a provider is a fallback, as a non-zero exit
                self.log.error(
                    ts,
                    f"The alternate content provider failed for content {key} "
                    f"({type(error).__name__}: {error}); falling back to the built-in download",
                )
                ended(None, "fell back")
                return None
            if not isinstance(code, int):
                self.log.error(
                    ts,
                    f"The alternate content provider returned {code!r} for content {key}, not "
                    "an exit code; falling back to the built-in download",
                )
                ended(None, "fell back")
                return None
            if request.abort_code is not None and code == request.abort_code:
                ended(code, "aborted")
                self.log.error(
                    ts,
                    f"The alternate content provider exited with {code}, the abort code "
                    f"({ABORT_CODE}): the download of {key} failed and no other download "
                    "method is tried",
                )
                self._download_failed(package_id, version, E_ABORT)
                raise ContentError(
                    E_ABORT,
                    f"{key}: the alternate content provider {name} exited with {code}, which "
                    f"{ABORT_CODE} makes an abort; no other download method is tried",
                )
            if code != 0:
                self.log.error(
                    ts,
                    f"The alternate content provider exited with {code} for content {key}; "
                    "falling back to the built-in download",
                )
                ended(code, "fell back")
                return None
            self.log.info(
                ts, f"The alternate content provider exited with 0: verifying content {key}"
            )
            content = read_folder(folder)
            try:
                self._verify_provided(name, package_id, version, folder, content, reply)
            except ContentError:
                ended(0, "refused")
                raise
            ended(0, "delivered")
            total = content.size
            self._make_room(store, package_id, version, total)
            entry = self._publish(store, folder, package_id, version)
            # A prefix an earlier try of the built-in download kept for resuming is not needed.
            store.discard_staging(package_id, version)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self._committed(entry, store, total)
        self.transfers.append(
            PackageTransfer(
                package_id,
                version,
                len(content.files),
                total,
                time.perf_counter() - started,
                from_cache=False,
                provider=name,
            )
        )
        return entry

    def _verify_provided(
        self,
        name: str,
        package_id: str,
        version: int,
        folder: Path,
        content: FolderContent,
        reply: ContentLocationReply,
    ) -> None:
        """The package hash of what a provider wrote, from the bytes on disk, against the reply.

        The package hash covers every file's relative path, size and SHA-256, so a wrong byte,
        a wrong size, a missing or an extra file each change it; links and special files are
        never content. Failures are the built-in download's: 0x80091007 with its log lines.
        """
        key = f"{package_id}.{version}"
        expected = reply.package_hash.upper()
        computed = package_hash(
            [ManifestFile(rel, size, sha) for rel, (size, sha) in content.files.items()]
        )
        if self._hashes_match(reply, computed) and not content.refused:
            self._hash_verified(key)
            return
        listed = sorted(content.files.items(), key=lambda item: item[0].encode("utf-8"))
        shown = ", ".join(f"{rel} ({size} bytes)" for rel, (size, _) in listed[:5])
        if len(listed) > 5:
            shown += f" and {len(listed) - 5} more"
        refused = (
            f"; not files (links, special files or names that are not UTF-8): "
            f"{', '.join(content.refused[:5])}"
            if content.refused
            else ""
        )
        raise self._hash_mismatch(
            package_id,
            version,
            f"{key}: the alternate content provider {name} exited with 0, but the "
            f"{len(listed)} file(s) in {self.windows(folder)} ({shown or 'none'}) give package hash "
            f"{computed}, not the location reply's {expected}{refused}: a file is wrong, "
            "missing or extra. A provider must write exactly the package's files, byte for "
            "byte, and nothing else, into the destination folder",
        )

    def _no_location(self, package_id: str, version: int, cause: ContentError | None) -> NoReturn:
        hr = codes.NO_LOCATIONS
        self.log.error(
            "TSManager",
            f"Content location request for {package_id}:{version} failed, hr=0x{hr:08X}",
        )
        detail = str(cause) if cause else "no content location"
        raise ContentError(hr, f"{package_id}:{version}: {detail}") from cause

    def _download(
        self,
        package_id: str,
        version: int,
        reply: ContentLocationReply,
        record: LocationRecord,
        store: ClientCache,
    ) -> CacheEntry:
        manifest = self.client.manifest(record)
        if manifest.package_id != package_id or manifest.version != version:
            raise ContentError(
                codes.HASH_MISMATCH,
                f"manifest is for {manifest.package_id}.{manifest.version}, "
                f"expected {package_id}.{version}",
            )
        total = manifest.total_size
        # Before any byte is fetched (docs/reliability.md row 38): fail at once, or evict to make
        # room.
        self._make_room(store, package_id, version, total)
        started = time.perf_counter()
        with store.staging(package_id, version) as staged:
            self.log.info(
                "DataTransferService",
                f"Job: {package_id}.{version}, Total Files: {len(manifest.files)}, "
                f"Total Bytes: {total}",
            )
            if self.on_job is not None:
                self.on_job(package_id, version, len(manifest.files), total)
            try:
                stats = self.core.download(manifest, staged, renew=_Renewer(self.client, record))
            except ContentError as error:
                if error.hresult == codes.HASH_MISMATCH:
                    self.log.error(
                        "TSManager", "Hash could not be matched for the downloaded content"
                    )
                raise
            # The trust anchor is the hash from the location reply (signed policy in the product),
            # not the manifest's own Hash attribute; and it is checked against the SHA-256 values
            # the core computed from the bytes, never the manifest's claims about them.
            computed = self._computed_package_hash(package_id, version, manifest, stats.digests)
            if not self._hashes_match(reply, computed):
                detail = f"{package_id}.{version}: package hash {computed} != {reply.package_hash}"
                raise self._hash_mismatch(package_id, version, detail)
            # Only the files the core verified go into the entry: anything else in staging (left
            # by an earlier run of another file list, a link) was never hashed by this process.
            for stray in store.prune_unverified(staged, stats.digests):
                self.log.info(
                    "CAS",
                    f"Deleted {stray} from the download of {package_id}.{version}: not a file "
                    "of the content",
                )
            self._hash_verified(f"{package_id}.{version}")
            entry = self._publish(store, staged, package_id, version)
        self._committed(entry, store, total)
        self.transfers.append(
            PackageTransfer(
                package_id,
                version,
                stats.files,
                stats.bytes,
                time.perf_counter() - started,
                from_cache=False,
            )
        )
        return entry

    def _committed(self, entry: CacheEntry, store: ClientCache, total: int) -> None:
        """Log (and track) content just committed to ``store``."""
        if store is self.cache:
            self.log.info(
                "CacheManager",
                f"ADD new cache entry for id:{entry.package_id} Version : {entry.version} "
                f"Size : {total // 1024}K RefCount:1 Location : {self.windows(entry.path)}",
            )
            self._downloaded.add(entry.key)
            self._preserve(entry)
        else:
            self.log.info(
                "TSManager",
                f"Saved content {entry.key} in the task sequence working directory: "
                f"{self.windows(entry.path)} (Size : {total // 1024}K)",
            )

    def _computed_package_hash(
        self,
        package_id: str,
        version: int,
        manifest: ContentManifest,
        digests: Mapping[str, str],
    ) -> str:
        """The package hash over the SHA-256 values computed from the downloaded bytes.

        ``digests`` comes from the download core, which records a file's digest only after
        hashing its bytes in this process. A file of the manifest without one was not verified,
        and that fails the package (0x80091007), whatever the manifest says about it.
        """
        missing = sorted(f.relpath for f in manifest.files if f.relpath not in digests)
        if missing:
            shown = ", ".join(missing[:3]) + (
                f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            )
            detail = (
                f"{package_id}.{version}: no SHA-256 computed from the bytes of {shown}; the "
                "package hash is checked only from digests the download core computed (it must "
                "return one for every file in DownloadStats.digests)"
            )
            raise self._hash_mismatch(package_id, version, detail)
        return package_hash([replace(f, sha256=digests[f.relpath]) for f in manifest.files])

    def _hashes_match(self, reply: ContentLocationReply, computed: str) -> bool:
        """CAS.log's two lines of the package hash check, and whether the hashes agree."""
        self.log.info("CAS", f"Using hash from LS Content Information: {reply.package_hash}")
        self.log.info("CAS", f"Computed hash: {computed}")
        return computed == reply.package_hash.upper()

    def _hash_verified(self, key: str) -> None:
        self.log.info(
            "CAS", "Success hash verification with hash algorithm = 32780, preference : 4"
        )
        self.log.info(
            "CAS", f"Hash verification succeeded for content {key} downloaded under context System"
        )

    def _hash_mismatch(self, package_id: str, version: int, detail: str) -> ContentError:
        """The product's two log lines of a failed hash check, and the error to raise."""
        self.log.error("CAS", f"Hash does not match expected for content {package_id}.{version}")
        self.log.error("TSManager", "Hash could not be matched for the downloaded content")
        return ContentError(codes.HASH_MISMATCH, detail)

    def _publish(
        self, store: ClientCache, folder: Path, package_id: str, version: int
    ) -> CacheEntry:
        """Commit verified content as a cache entry, held before it is published so no
        eviction can take it before its step runs."""
        lease = store.hold(package_id, version)
        try:
            entry = store.commit(folder, package_id, version)
        except BaseException:
            lease.release()
            raise
        self._keep(lease)
        return entry

    def _make_room(self, store: ClientCache, package_id: str, version: int, total: int) -> None:
        """Room for ``total`` bytes in ``store``, evicting what may go (logged), or the
        product's "cache full" lines and a :class:`CacheSpaceError`."""
        try:
            room = store.make_room(package_id, version, total)
        except CacheSpaceError as error:
            self._no_room(package_id, version, error)
            raise
        self._log_evictions(room)

    def _no_room(self, package_id: str, version: int, error: CacheSpaceError) -> None:
        report, cm = error.report, "CacheManager"
        mb = 1024 * 1024
        if error.hresult == codes.CACHE_TOO_SMALL:
            # The wording of the product's status message 10050 (KB839513).
            self.log.error(
                cm,
                f"Content {package_id}.{version} requires package content to be downloaded, but "
                "the total cache size is smaller than the size of the package content. The "
                f"current cache size is {report.capacity // mb} MB, and {report.free // mb} MB "
                f"of cache space is available. This content requires {-(-report.needed // mb)} "
                "MB to be available in the cache.",
            )
        else:
            self._log_usage(report)
            # CAS.log's lines when only content in use is left (myitforum, 2013).
            self.log.error("CAS", "Not enough non-active cache to delete")
            self.log.error("CAS", "Not enough space in Cache")
            self.log.error("CAS", "CreateContentRequest failed")
        self._download_failed(package_id, version, error.hresult)

    def _log_usage(self, report: SpaceReport) -> None:
        self.log.info(
            "CacheManager",
            f"There are currently {report.used} bytes used for cached content items "
            f"({report.entries} total, {report.active} active, 0 tombstoned, "
            f"{report.expired} expired).",
        )

    def _log_evictions(self, report: SpaceReport) -> None:
        if not report.evicted:
            return
        cm = "CacheManager"
        self._log_usage(report)
        self.log.info(
            cm,
            f"Need {report.needed} bytes with {report.free} of {report.capacity} free: "
            f"deleting {len(report.evicted)} cache item(s), least recently used first",
        )
        for gone in report.evicted:
            if gone.partial:
                self.log.info(
                    cm,
                    f"DELETE abandoned partial download {gone.key} Size : {gone.size // 1024}K "
                    f"Location : {self.windows(gone.path)}",
                )
                continue
            package_id, _, version = gone.key.rpartition(".")
            last = time.strftime("%m/%d/%Y %H:%M:%S", time.gmtime(gone.last_used))
            self.log.info(
                cm,
                f"DELETE cache entry for id:{package_id} Version : {version} "
                f"Size : {gone.size // 1024}K Last used : {last} "
                f"Location : {self.windows(gone.path)}",
            )

    def _download_failed(self, package_id: str, version: int, hresult: int) -> None:
        self.log.error(
            "CAS",
            f"Download failed for content {package_id}.{version} under context System, "
            f"error 0x{hresult:08x}",
        )


class _Renewer:
    """Fresh SAS URLs after storage refused one: one manifest request per expiry, shared.

    Files downloading in parallel all hit an expired SAS at about the same time; the first asks
    the gateway for a new manifest and the others reuse it (reliability.md 21: "one call per
    expiry, not per chunk"). The SAS and its signature stay in memory, never on disk or in logs.
    """

    def __init__(self, client: CMGClient, record: LocationRecord) -> None:
        self.client = client
        self.record = record
        self._urls: dict[str, str] | None = None
        self._lock = threading.Lock()

    def __call__(self, item: ManifestFile) -> str:
        # Fetched once and shared: each file renews at most once per download, so one fresh
        # manifest serves them all. (Comparing URLs to spot a renewal already made does not
        # work: a manifest minted in the same second carries byte-identical SAS URLs.)
        with self._lock:
            if self._urls is None:
                fresh = self.client.manifest(self.record)
                self._urls = {f.relpath: f.url for f in fresh.files}
            if item.relpath not in self._urls:
                raise ContentError(
                    codes.BAD_HTTP_STATUS, f"renewed manifest no longer lists {item.relpath}"
                )
            return self._urls[item.relpath]


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


def _token_expiry(token: str) -> datetime | None:
    """The ``exp`` of a JWT (the CCM token), read without checking it; None if unreadable."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return datetime.fromtimestamp(int(claims["exp"]), UTC)
    except (IndexError, ValueError, KeyError, TypeError):
        return None


def _left_in(folder: Path) -> tuple[str, ...]:
    """Files (any entry but a folder) under ``folder``, relative, sorted; at most _LEFT_SHOWN."""
    found: list[str] = []
    try:
        for path in sorted(folder.rglob("*")):
            if not path.is_dir() or path.is_symlink():
                found.append(path.relative_to(folder).as_posix())
                if len(found) == _LEFT_SHOWN:
                    break
    except OSError:
        pass  # what was listed before the folder went away is still what it held
    return tuple(found)


def _count(left: tuple[str, ...]) -> str:
    more = "+" if len(left) == _LEFT_SHOWN else ""
    return f"{len(left)}{more} file(s)"


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
