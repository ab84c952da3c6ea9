"""The benchmark's ceilings, for sibling packages (benchmark scenarios): the seam to ``_bench``.

``get_all`` (plain keep-alive GETs, bodies discarded) and ``get_all_verified`` (the same loop,
every byte hashed and written: what a verified download costs on this stack and machine). The
benchmark command and benchmark scenarios import them from here, so both measure a ceiling the
same way and ``_bench``'s private modules can change behind this name. Stdlib only underneath:
importing this module loads nothing heavy.
"""

from __future__ import annotations

from ._rawget import get_all, get_all_verified

__all__ = ["get_all", "get_all_verified"]
