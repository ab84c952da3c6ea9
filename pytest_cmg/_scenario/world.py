"""A scenario's world on a running harness: its cloud DP, gateway, distributed content, and the
client cache seeded as ``client.cache`` says.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from .._protocol.manifest import ContentManifest, ManifestFile
from .content import generated_package

if TYPE_CHECKING:
    from pathlib import Path

    from .._client.cache import ClientCache
    from .._client.cmg import CMGConnection
    from .._gateway.server import FakeCMG
    from .._harness import Harness
    from .._net.pki import Credentials
    from .._storage.clouddp import CloudDP, PackageSource
    from .model import PackageSpec, Scenario

#: The SMSID of the client a scenario runs (stable, so logs compare across runs).
CLIENT_ID = "GUID:5C1E7A2B-0D1A-4E0F-9C3B-6A8D2E4F1B07"


@dataclass
class World:
    """A scenario's world on a running harness: its cloud DP, gateway and distributed content.

    ``certificate`` and ``tenant`` are the client's variants (``client.certificate``,
    ``client.tenant``): :meth:`connection` hands out that kind of certificate, and a token of a
    tenant in that state.
    """

    dp: CloudDP
    gateway: FakeCMG
    manifests: dict[str, ContentManifest]
    certificate: str = "valid"
    tenant: str = "enabled"

    @property
    def storage_ca_cert(self) -> Path | None:
        """The CA to trust for HTTPS storage (None: storage is plain HTTP)."""
        return self.dp.endpoint.ca_cert if self.dp.endpoint.url.startswith("https:") else None

    def connection(self, client_id: str, auth: str) -> CMGConnection:
        """How a client with ``client_id`` reaches the gateway.

        ``auth`` is ``token`` (a site-issued CCM token), ``certificate`` (a client certificate
        of the world's kind) or ``azure_ad`` (an Azure AD device token of the world's tenant,
        for the device registered as ``client_id``).
        """
        from .._client.factory import connection_for

        credentials = self._certificate(client_id) if auth == "certificate" else None
        aad_token = self._aad_token(client_id) if auth == "azure_ad" else None
        return connection_for(
            self.gateway, client_id, auth, credentials=credentials, aad_token=aad_token
        )

    def _certificate(self, client_id: str) -> Credentials:
        from .._gateway.tls import PARTNER_CA_NAME

        gateway, kind = self.gateway, self.certificate
        now = datetime.now(UTC)
        if kind == "partner_ca":
            return gateway.issue_client_certificate(client_id, issuer=PARTNER_CA_NAME)
        if kind == "expired":
            return gateway.issue_client_certificate(client_id, not_after=now - timedelta(days=1))
        if kind == "not_yet_valid":
            return gateway.issue_client_certificate(client_id, not_before=now + timedelta(days=1))
        if kind == "untrusted_ca":
            return gateway.issue_client_certificate(client_id, rogue=True)
        if kind == "no_client_auth":
            return gateway.issue_client_certificate(client_id, usage="server")
        credentials = gateway.issue_client_certificate(client_id)
        if kind == "revoked":
            gateway.revoke_client_certificate(credentials)
        return credentials

    def _aad_token(self, client_id: str) -> str:
        from .._gateway.tokens import AzureADTenant

        gateway = self.gateway
        if self.tenant == "not_onboarded":
            # A tenant of its own that the site never onboarded (issuer validation fails).
            return gateway.issue_aad_token(client_id, tenant=AzureADTenant(clock=gateway.clock))
        token = gateway.issue_aad_token(client_id)
        if self.tenant == "disabled":
            gateway.azure_ad.disable(gateway.tenant.tenant_id)
        return token


def build_world(scenario: Scenario, harness: Harness) -> World:
    """Distribute the scenario's packages into a fresh container and set the gateway up for it.

    Packages on the cloud DP are uploaded; on-premises DPs (``distribution_points``) are listed
    with the hash of the content the scenario generates for them, which is never uploaded
    anywhere (the internet client cannot reach an intranet DP). The caller owns the world:
    ``world.dp.delete()`` removes its content.
    """
    from .._gateway.tls import CLIENT_CA_NAME, PARTNER_CA_NAME

    dp = harness.new_cloud_dp()
    gateway = harness.gateway
    gateway.clear()
    on_prem = {p for point in scenario.distribution_points for p in point.packages}
    held: dict[str, ContentManifest] = {}
    try:
        manifests = {}
        for package in scenario.packages:
            if not package.on_cloud_dp and package.id not in on_prem:
                continue
            # A large package is generated into a temporary folder, removed once it is
            # uploaded (Azurite then holds the bytes) or hashed.
            with generated_package(package, scenario.seed) as files:
                if package.on_cloud_dp:
                    manifests[package.id] = dp.distribute(package.id, package.version, files)
                    held[package.id] = manifests[package.id]
                else:
                    held[package.id] = _local_manifest(package.id, package.version, files)
    except BaseException:
        dp.delete()
        raise
    roots = {"site": CLIENT_CA_NAME, "partner": PARTNER_CA_NAME}
    settings = replace(
        scenario.cmg, certificate_trust_list=tuple(roots[name] for name in scenario.trust_list)
    )
    gateway.site_code = scenario.site_code
    gateway.configure(settings=settings, cloud_dp=dp, deployment=scenario.deployment)
    for point in scenario.distribution_points:
        gateway.add_on_prem_dp(
            point.fqdn,
            *(held[package_id] for package_id in point.packages),
            locality=point.locality,
            https=point.https,
        )
    if not scenario.crl_reachable:
        # Until the next clear(), which publishes them again.
        gateway.tls.withdraw_crls()
    return World(dp, gateway, manifests, scenario.certificate, scenario.tenant)


def seed_cache(
    cache: ClientCache, entries: tuple[PackageSpec, ...], seed: int
) -> dict[str, ContentManifest]:
    """Make each of ``entries`` a verified entry of ``cache``, through its public API.

    As a download would: the content (generated from ``seed``, like the package's) is written
    into the entry's staging folder, hashed from the bytes written, pruned to those files and
    committed. Returns each entry's manifest, by key, for the run's checks of the cache.
    """
    made: dict[str, ContentManifest] = {}
    for spec in entries:
        with generated_package(spec, seed) as files, cache.staging(spec.id, spec.version) as staged:
            digests: dict[str, str] = {}
            items = []
            for source in files:
                target = staged.joinpath(*source.relpath.split("/"))
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source.data, bytes):
                    target.write_bytes(source.data)
                else:
                    shutil.copyfile(source.data, target)
                # Hashed from what is on disk, as the download core verifies what it wrote.
                with target.open("rb") as handle:
                    digests[source.relpath] = hashlib.file_digest(handle, "sha256").hexdigest()
                items.append(
                    ManifestFile(source.relpath, target.stat().st_size, digests[source.relpath])
                )
            cache.prune_unverified(staged, digests)
            entry = cache.commit(staged, spec.id, spec.version)
        made[entry.key] = ContentManifest(
            package_id=spec.id, version=spec.version, files=tuple(items)
        )
    return made


def _local_manifest(package_id: str, version: int, files: list[PackageSource]) -> ContentManifest:
    """The manifest of generated content that is not uploaded (it is on an on-prem DP only)."""
    items = []
    for source in files:
        if isinstance(source.data, bytes):
            digest, size = hashlib.sha256(source.data).hexdigest(), len(source.data)
        else:
            # A large package is generated on disk: hash it as the upload reads it, in pieces.
            with source.data.open("rb") as handle:
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
            size = source.data.stat().st_size
        items.append(ManifestFile(source.relpath, size, digest))
    return ContentManifest(package_id=package_id, version=version, files=tuple(items))
