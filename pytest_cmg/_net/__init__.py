"""The ground floor's network tools, shared by storage and the gateway (docs/architecture.md).

The storage fault proxy (``faults``: what can go wrong; ``wire``: HTTP/1.1 framing;
``connection``: one client connection's pump; ``proxy``: the server and its request log) and the
test PKI (``pki``). Nothing here imports another room of the package but ``_errors`` and
``_util``, so both ``_storage`` and ``_gateway`` may use it without tying themselves together.
"""

from __future__ import annotations
