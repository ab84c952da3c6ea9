"""Protocol logic shared by the gateway and the client engine: formats, paths, clocks, codes."""

from __future__ import annotations
