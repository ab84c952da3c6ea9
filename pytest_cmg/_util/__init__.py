"""The ground floor's process-level tools with no network in them (docs/architecture.md).

``filelock``: one ``flock`` wait with a bound, for the shared cache and the client cache. It
imports no other room of the package, so every room may use it.
"""

from __future__ import annotations
