"""How a client is assembled: the one place that puts an engine together.

A client is a connection (where the gateway is, and the credentials: a CCM token, a client
certificate or an Azure AD token), a cache and an smsts.log under a folder, a download core
with its retry policy, the private CA of HTTPS storage (the storage route), and an optional
content provider. The plugin's ``cmg_client`` fixture, the scenario runner, the ``client``
command and the tests all build one through :func:`build_engine`, so a new part of a client
(a setting, a hook) is wired in once and reaches every way of running one.

:func:`connection_for` asks a gateway for the credentials of one kind. It takes the gateway by
its shape (:class:`CredentialIssuer`), not by import: the client room does not depend on the
gateway room, which may be a real CMG's contract file as well (``client`` command).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .._errors import InvalidValueError
from .._protocol.settings import CURRENT_SITE_VERSION
from .cache import DEFAULT_CACHE_MB, ClientCache
from .download import DownloadCore
from .engine import CMGClient, CMGConnection, TaskSequenceEngine
from .log import SmstsLog

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from .._protocol.settings import ClientSettings, DeploymentSettings
    from .acp import ContentProvider
    from .engine import StepEvent
    from .retry import RetryPolicy

__all__ = ["AUTH_KINDS", "CredentialIssuer", "build_engine", "connection_for"]

#: How a client authenticates to the CMG (docs/emulation.md, "Client authentication").
AUTH_KINDS = ("token", "certificate", "azure_ad")


class _Pair(Protocol):
    @property
    def cert(self) -> Path: ...
    @property
    def key(self) -> Path: ...


class CredentialIssuer(Protocol):
    """What :func:`connection_for` needs of a gateway (``FakeCMG`` has it)."""

    @property
    def url(self) -> str: ...
    @property
    def ca_pem(self) -> Path: ...
    @property
    def site_code(self) -> str: ...
    @property
    def role_id(self) -> str: ...
    def issue_token(self, client_id: str) -> str: ...
    def issue_client_certificate(self, client_id: str) -> _Pair: ...
    def issue_aad_token(self, client_id: str) -> str: ...


def connection_for(
    gateway: CredentialIssuer,
    client_id: str,
    auth: str = "token",
    *,
    credentials: _Pair | None = None,
    aad_token: str | None = None,
) -> CMGConnection:
    """How ``client_id`` reaches ``gateway``, authenticating as ``auth`` says.

    ``token``: a CCM token the site issues; ``certificate``: a client certificate (``credentials``
    when given, e.g. an expired one, else a valid one the gateway issues); ``azure_ad``: an Azure
    AD device token (``aad_token`` when given, else one of the gateway's onboarded tenant).
    """
    if auth not in AUTH_KINDS:
        msg = f"auth={auth!r} is not a way to authenticate; choose one of {', '.join(AUTH_KINDS)}"
        raise InvalidValueError(msg)
    if auth == "certificate" and credentials is None:
        credentials = gateway.issue_client_certificate(client_id)
    if auth == "azure_ad" and aad_token is None:
        aad_token = gateway.issue_aad_token(client_id)
    return CMGConnection(
        cmg_url=gateway.url,
        ca_cert=gateway.ca_pem,
        site_code=gateway.site_code,
        mp_role_id=gateway.role_id,
        client_id=client_id,
        token=gateway.issue_token(client_id) if auth == "token" else None,
        client_cert=credentials.cert if auth == "certificate" and credentials else None,
        client_key=credentials.key if auth == "certificate" and credentials else None,
        aad_token=aad_token if auth == "azure_ad" else None,
    )


def build_engine(
    connection: CMGConnection,
    folder: Path,
    *,
    log: SmstsLog | None = None,
    cache: ClientCache | None = None,
    cache_mb: int = DEFAULT_CACHE_MB,
    settings: ClientSettings | None = None,
    deployment: DeploymentSettings | None = None,
    retry: RetryPolicy | None = None,
    storage_ca_file: Path | None = None,
    site_version: int = CURRENT_SITE_VERSION,
    provider: ContentProvider | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    fsync: bool = False,
    journal_bytes: int | None = None,
    journal_seconds: float | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TaskSequenceEngine:
    """A client engine for ``connection``, with its log and cache under ``folder``.

    ``log`` defaults to ``folder/smsts.log`` and ``cache`` to ``folder/Windows/ccmcache`` of
    ``cache_mb`` MB. ``retry`` is the download core's policy (a ``VirtualTime`` policy makes its
    waits virtual); ``storage_ca_file`` the private CA of HTTPS storage, trusted by the core and
    named to content providers; ``on_progress``, ``fsync``, ``journal_bytes`` and
    ``journal_seconds`` are the core's (None: its defaults); ``on_step`` the engine's step hook
    (``TaskSequenceEngine.on_step``).
    """
    log = log if log is not None else SmstsLog(folder / "smsts.log")
    # C:\Windows\ccmcache, with ``folder`` as C: (the engine's system drive; winpath).
    cache = cache if cache is not None else ClientCache(folder / "Windows" / "ccmcache", cache_mb)
    journal: dict[str, float] = {}
    if journal_bytes is not None:
        journal["journal_bytes"] = journal_bytes
    if journal_seconds is not None:
        journal["journal_seconds"] = journal_seconds
    core = DownloadCore(
        retry=retry,
        on_event=lambda line: log.info("DataTransferService", line),
        on_progress=on_progress,
        ca_file=storage_ca_file,
        fsync=fsync,
        **journal,  # type: ignore[arg-type]
    )
    return TaskSequenceEngine(
        CMGClient(connection, log, settings),
        cache,
        log,
        deployment,
        core,
        site_version=site_version,
        provider=provider,
        storage_ca_file=storage_ca_file,
        on_step=on_step,
    )
