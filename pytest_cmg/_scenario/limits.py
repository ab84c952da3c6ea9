"""The scenario language's input limits, and how values are shown in its messages.

A scenario describes content by size; it never holds it. So a scenario file is small (the shipped
ones are under 2 KiB), and anything far larger is a mistake (a file saved over the wrong one, a
value pasted whole) that must be refused before it is parsed, with a message of a few lines. The
content a scenario asks for is generated on the test machine and kept by Azurite in memory, so
its sizes are bounded too: a test machine with 24 GiB of memory and a modest disk runs the
largest scenario these limits allow.

Every limit here is documented in the scenario reference (``reference.py``'s rules) and reported
as a :class:`~pytest_cmg._errors.ScenarioError` at the file and line that break it.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "IN_MEMORY_PACKAGE_BYTES",
    "MAX_CASE_VALUES",
    "MAX_DURATION_SECONDS",
    "MAX_FILE_BYTES",
    "MAX_NESTING",
    "MAX_PACKAGE_BYTES",
    "MAX_PACKAGE_FILES",
    "MAX_SCENARIO_BYTES",
    "MAX_SCENARIO_FILE_BYTES",
    "MAX_SIZE",
    "MAX_VALUES",
    "MESSAGE_CHARS",
    "OS_UPGRADE_MAIN_SHARE",
    "RANDOM_PIECE_BYTES",
    "SHOWN_CHARS",
    "clip",
    "human_size",
    "largest_file",
    "nearest",
    "shown",
    "split_sizes",
]

_KiB = 1024
_MiB = 1024**2
_GiB = 1024**3

# --- the file itself ------------------------------------------------------------------------

#: A scenario, world or catalog file larger than this is refused from its size on disk, before
#: a byte of it is read: the shipped scenarios are under 2 KiB, so 1 MiB is hundreds of times
#: any real one, and parsing stays within a few tens of MB of memory.
MAX_SCENARIO_FILE_BYTES = 1 * _MiB
#: YAML values (scalars, lists and mappings) a scenario may hold, with everything it includes and
#: references; an alias counts as many values as what it names, so a small file cannot expand
#: into millions through anchors. A real scenario has a few hundred.
MAX_VALUES = 10_000
#: Items of a parametrised file times its values: each item (``matrix``, ``cases``) is validated
#: and built from the whole tree, so this bounds collection to seconds. A real file of 300
#: values may still have the most cases a file allows (256, ``model.MAX_CASES``).
MAX_CASE_VALUES = 200_000
#: How deep lists and mappings may nest. A scenario needs about 6 levels; the bound keeps the
#: (recursive) YAML composer far from Python's recursion limit.
MAX_NESTING = 32

# --- what a scenario asks for ---------------------------------------------------------------

#: The largest generated file: as large as a real install.wim (about 4 GiB, the most a FAT32
#: boot medium holds in one file). An os_upgrade package gives its install.wim 90 % of its size,
#: so such a package can be about 4.4 GiB.
MAX_FILE_BYTES = 4 * _GiB
#: The largest package (``packages[].size``): a whole Windows upgrade package (5 to 6 GiB) fits.
MAX_PACKAGE_BYTES = 8 * _GiB
#: All packages of one scenario together. Azurite keeps every uploaded blob in memory (by
#: default it refuses more than half the machine's memory, 12 GiB of 24), and the client cache
#: keeps as much again on disk: 8 GiB leaves a 24 GiB machine room for a second xdist worker.
MAX_SCENARIO_BYTES = 8 * _GiB
#: Files in one package: five times the largest shipped scenario (2,000 driver files) and more
#: than a real driver pack; each file is one upload (Azurite takes about 150 a second) and one
#: download, so 10,000 files already take a few minutes.
MAX_PACKAGE_FILES = 10_000
#: Any other size (a fault's offsets, a throttle, a cache size, an expectation): exact as a
#: float, so arithmetic on it can never overflow.
MAX_SIZE = 2**53
#: Any duration (a clock jump, a fault time, an expected elapsed time): 100 years, well inside
#: what dates can reach from now.
MAX_DURATION_SECONDS = 100 * 365 * 86400.0

# --- generating content ---------------------------------------------------------------------

#: The most random bytes drawn at once. ``random.randbytes(n)`` builds an integer of ``8 n``
#: bits, which fails from 256 MiB on (OverflowError); pieces of a multiple of 4 bytes draw the
#: same bytes as one call would, so files below 256 MiB keep their content byte for byte.
RANDOM_PIECE_BYTES = 64 * _MiB
#: Packages up to this size are generated in memory (as before); larger ones are written to a
#: temporary folder, file by file and piece by piece, so memory stays at one piece.
IN_MEMORY_PACKAGE_BYTES = 256 * _MiB
#: An os_upgrade package's install.wim takes this share of the package's size.
OS_UPGRADE_MAIN_SHARE = 0.9

# --- messages -------------------------------------------------------------------------------

#: A value from the file is shown in a message with at most this many characters.
SHOWN_CHARS = 80
#: A problem's rule, and its hint, are cut at this many characters.
MESSAGE_CHARS = 400

#: A run of non-blank characters longer than this is cut in a message (file paths fit).
RUN_CHARS = 240
_LONG_RUN = re.compile(r"\S{%d,}" % (RUN_CHARS + 1))  # noqa: UP031 - a regex's braces


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, cut to about ``limit`` characters: a long value is never echoed whole.

    A cut string says how long it was, so the reader knows what they are looking for.
    """
    if isinstance(value, str) and len(value) > limit:
        # Quotes and ellipsis included, the cut value is one word of at most ``limit``.
        return f"{value[: limit - 5]!r}... ({len(value):,} characters)"
    if isinstance(value, int) and abs(value) >= 10**limit:
        # repr of an integer of more than 4300 digits would itself raise.
        return f"a number of about {int(abs(value).bit_length() * math.log10(2)) + 1:,} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def clip(text: str, limit: int = MESSAGE_CHARS) -> str:
    """``text`` with every run of more than ``RUN_CHARS`` non-blank characters cut, then cut to
    ``limit``: the last guard that no message echoes a long key or value whole. Values are
    already cut to ``SHOWN_CHARS`` by :func:`shown`; the longer run limit here lets the paths
    of a reader's own files (which locate the problem) through whole."""
    text = _LONG_RUN.sub(lambda m: m[0][: RUN_CHARS - 3] + "...", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def human_size(count: int) -> str:
    """``count`` bytes as the language writes sizes: ``8GiB``, ``300MiB``, ``1.5KiB``, ``12B``."""
    for unit, scale in (("GiB", _GiB), ("MiB", _MiB), ("KiB", _KiB)):
        if count >= scale:
            # Integer arithmetic, rounded to thousandths: a size can be any YAML integer, and
            # ``count / scale`` overflows a float past about 10**308 (a problem message naming a
            # 400-digit size must still be written).
            whole, thousandths = divmod((count * 1000 + scale // 2) // scale, 1000)
            return f"{whole}.{thousandths:03d}".rstrip("0").rstrip(".") + unit
    return f"{count}B"


def split_sizes(total: int, count: int, main_share: float | None) -> list[int]:
    """How ``total`` bytes are shared by ``count`` generated files.

    With ``main_share`` the first file (an install.wim) takes that share and every other file
    at least one byte; the rest is shared evenly, the first files one byte larger.
    """
    if count == 1:
        return [total]
    if main_share is not None:
        main = min(max(1, int(total * main_share)), total - (count - 1))
        return [main, *split_sizes(total - main, count - 1, None)]
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]


def largest_file(total: int, count: int, main_share: float | None) -> int:
    """The size of the largest file :func:`split_sizes` makes, without making the list."""
    if count <= 1:
        return total
    if main_share is not None:
        main = min(max(1, int(total * main_share)), total - (count - 1))
        return max(main, largest_file(total - main, count - 1, None))
    return math.ceil(total / count)


def nearest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str | None:
    """The choice ``word`` is most likely a typo of, or None.

    A word longer than :data:`SHOWN_CHARS` is no typo of a key or a name, and comparing it costs
    time in its length: it gets no suggestion.
    """
    if len(word) > SHOWN_CHARS:
        return None
    near = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return near[0] if near else None
