"""The ground floor's process-level tools with no network in them (docs/architecture.md).

``filelock``: one ``flock`` wait with a bound, for the shared cache and the client cache;
``cachedir``: the per-user folder where provisioned tools live; ``service``: ``with service:``
for anything with start() and stop(); ``process``: starting a tool whose output is read as
text; ``tree``: the link-safe walk of a folder. None of them imports another room of the
package, so every room may use them.
"""

from __future__ import annotations
