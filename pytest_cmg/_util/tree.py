"""Walk a folder tree without following links: every entry with its ``/``-separated path.

The client reads folders it does not trust (what a content provider delivered, what a staging
folder holds): a link there must never lead the walk, or a hash, outside the folder. Both readers
used the same ``os.scandir`` loop; they share this one.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = ["walk_entries"]


def walk_entries(
    root: str | os.PathLike[str], *, descend: Callable[[str], bool] | None = None
) -> Iterator[tuple[os.DirEntry[str], str]]:
    """Every entry under ``root`` that the walk does not descend into, with its relative path.

    Real folders (never a link to one) are descended into and not yielded, unless ``descend``
    says no for the folder's relative path: then it is yielded like a file. Links, files and
    special files are yielded. Paths are relative to ``root``, joined with ``/`` (as a
    manifest's are). Iterative, so the depth of the tree costs no recursion; scandir's entries
    know their type without a stat per file (packages of many files).
    """
    pending = [(os.fspath(root), "")]
    while pending:
        path, prefix = pending.pop()
        with os.scandir(path) as entries:
            for entry in entries:
                relpath = prefix + entry.name
                if entry.is_dir(follow_symlinks=False) and (descend is None or descend(relpath)):
                    pending.append((entry.path, relpath + "/"))
                    continue
                yield entry, relpath
