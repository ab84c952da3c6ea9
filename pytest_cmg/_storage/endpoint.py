"""Where a blob service answers: :class:`BlobEndpoint`, the development account, connection strings.

Every storage backend (:mod:`pytest_cmg._storage.azurite`) hands out a :class:`BlobEndpoint`;
the gateway signs SAS URLs with its key and the harness uploads through its service client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from azure.storage.blob import BlobServiceClient

__all__ = [
    "CONTAINER_API_VERSION",
    "DEV_ACCOUNT_KEY",
    "DEV_ACCOUNT_NAME",
    "BlobEndpoint",
    "endpoint_from_base",
    "parse_connection_string",
]

DEV_ACCOUNT_NAME = "devstoreaccount1"
DEV_ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
# The blob API baseline of Azurite 3.35-3.37. A container runs the image's own command line we
# cannot add --skipApiVersionCheck to reliably, and newer SDKs send versions Azurite rejects.
CONTAINER_API_VERSION = "2025-11-05"


@dataclass(frozen=True)
class BlobEndpoint:
    """Where a blob service answers and the shared key that signs requests to it.

    ``ca_cert`` is the PEM of the CA that signed an HTTPS endpoint's certificate when it is not
    one the system trusts (an HTTPS Azurite); None for HTTP or a publicly trusted endpoint.
    """

    url: str
    account_name: str
    account_key: str
    backend: str
    ca_cert: Path | None = None

    @property
    def connection_string(self) -> str:
        protocol = "https" if self.url.lower().startswith("https:") else "http"
        return (
            f"DefaultEndpointsProtocol={protocol};AccountName={self.account_name};"
            f"AccountKey={self.account_key};BlobEndpoint={self.url};"
        )

    def service_client(self, *, api_version: str | None = None) -> BlobServiceClient:
        """A ``BlobServiceClient`` for this endpoint (``api_version`` None: the SDK's own)."""
        from azure.storage.blob import BlobServiceClient

        if api_version is None and self.backend == "container":
            api_version = CONTAINER_API_VERSION
        options: dict[str, Any] = {}
        if api_version is not None:
            options["api_version"] = api_version
        if self.ca_cert is not None:
            # A path wins over REQUESTS_CA_BUNDLE in requests, which azure-core uses.
            options["connection_verify"] = str(self.ca_cert)
        return BlobServiceClient.from_connection_string(self.connection_string, **options)


def endpoint_from_base(base_url: str, backend: str, ca_cert: Path | None = None) -> BlobEndpoint:
    return BlobEndpoint(
        url=f"{base_url.rstrip('/')}/{DEV_ACCOUNT_NAME}",
        account_name=DEV_ACCOUNT_NAME,
        account_key=DEV_ACCOUNT_KEY,
        backend=backend,
        ca_cert=ca_cert,
    )


def parse_connection_string(text: str) -> dict[str, str]:
    """Keys lower-cased; values split at the first '=' because base64 keys end in '='."""
    parts: dict[str, str] = {}
    for item in text.split(";"):
        key, sep, value = item.strip().partition("=")
        if sep and key.strip():
            parts[key.strip().lower()] = value.strip()
    return parts
