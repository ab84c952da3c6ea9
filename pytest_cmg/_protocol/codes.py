"""Error codes the real client reports, with the texts the product logs.

The codes and their public sources: docs/emulation.md, Product reference, "Failure codes and log
lines".
"""

from __future__ import annotations

__all__ = [
    "BAD_HTTP_STATUS",
    "CACHE_FULL",
    "CACHE_IN_USE",
    "CACHE_TOO_SMALL",
    "CONNECTION_ABORTED",
    "CONTENT_NOT_FOUND",
    "HASH_MISMATCH",
    "NO_LOCATIONS",
    "TRANSIENT_ERROR",
    "describe",
]

#: No location for the package (not on the CMG, wrong version, cloud not allowed).
NO_LOCATIONS = 0x80040102
#: "Bad HTTP status code": the manifest or a content request failed.
BAD_HTTP_STATUS = 0x87D0027E
#: CRYPT_E_HASH_VALUE: the downloaded content does not match the hash from the location reply.
HASH_MISMATCH = 0x80091007
#: Not enough cache space, or disk full.
CACHE_FULL = 0x87D01201
#: The total cache size is smaller than the content.
CACHE_TOO_SMALL = 0x87D01202
#: "Cache in use" (docs/emulation.md, Product reference: "Content, verification and the client
#: cache"): a request waited too long for another download of the same
#: content to finish.
CACHE_IN_USE = 0x87D01203
#: Content not found.
CONTENT_NOT_FOUND = 0x87D00607
#: Transient error (e.g. MP 500).
TRANSIENT_ERROR = 0x87D00231
#: ERROR_INTERNET_CONNECTION_ABORTED (12030): the connection was cut during a transfer.
CONNECTION_ABORTED = 0x80072EFE

_TEXTS = {
    NO_LOCATIONS: "No content locations were found for the requested content",
    BAD_HTTP_STATUS: "Bad HTTP status code",
    HASH_MISMATCH: "Hash could not be matched for the downloaded content",
    CACHE_FULL: "Not enough cache space or disk full",
    CACHE_TOO_SMALL: "The total cache size is smaller than the content",
    CACHE_IN_USE: "The cache is in use",
    CONTENT_NOT_FOUND: "Content not found",
    TRANSIENT_ERROR: "Transient error",
    CONNECTION_ABORTED: "The connection with the server was terminated abnormally",
}


def describe(hresult: int) -> str:
    """The product's text for ``hresult``, or a generic one for codes we do not model."""
    return _TEXTS.get(hresult, "Unknown error")
