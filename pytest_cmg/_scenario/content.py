"""Generated package content: plausible file trees, reproducible from a seed.

Names come from faker in the package's locale (so ``ja_JP`` and ``it_IT`` names travel through
blob names, SAS URLs and manifests); bytes come from faker's seeded random generator. The same
scenario seed always yields the same files, on every xdist worker.

Bytes are drawn at most :data:`~.limits.RANDOM_PIECE_BYTES` at a time (``randbytes`` cannot make
256 MiB or more at once), which draws exactly the bytes one call would: content does not depend
on the piece size. A package larger than :data:`~.limits.IN_MEMORY_PACKAGE_BYTES` is written to
files on disk (:class:`PackageSource` with a path, streamed by the upload) instead of memory;
:func:`generated_package` makes the temporary folder and removes it when its block ends.
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
import zlib
from pathlib import Path
from typing import TYPE_CHECKING

from faker import Faker

from .._errors import InvalidValueError
from .._storage.clouddp import PackageSource
from .limits import IN_MEMORY_PACKAGE_BYTES, OS_UPGRADE_MAIN_SHARE, RANDOM_PIECE_BYTES, split_sizes

if TYPE_CHECKING:
    import random
    from collections.abc import Iterator

    from .model import PackageSpec

__all__ = ["generate_package", "generated_package", "package_file_names"]

# The first entry of each layout is the package's main file and takes most of the bytes, as an
# install.wim does in an OS upgrade package.
_LAYOUTS = {
    "os_upgrade": (
        "sources/install.wim",
        "setup.exe",
        "sources/setupprep.exe",
        "sources/{word}.dll",
    ),
    "driver": ("{word}/{word}.sys", "{word}/{word}.inf", "{word}/{word}.cat"),
    "application": ("{word}.msi", "{word}.cab", "{word}.mst"),
    "package": ("{word}.{ext}",),
}


def _name(fake: Faker, pattern: str, word: str | None = None) -> str:
    return pattern.format(word=word or fake.word(), ext=fake.file_extension())


def _accented_word(fake: Faker) -> str | None:
    """A word of the locale's list that is not ASCII (it_IT: città, perché...), if it has any.

    Only about 3 % of the Italian words carry an accent, so without this an it_IT package of a
    few files would often have ASCII names only and prove nothing about non-ASCII names.
    """
    words = sorted({w for w in fake.get_words_list() if not w.isascii()})
    return str(fake.random_element(words)) if words else None


def package_file_names(spec: PackageSpec, seed: int) -> list[str]:
    """The relative paths of the files :func:`generate_package` makes, without their bytes.

    Names are drawn before any byte, from the same seeded generator, so they are known at
    collection for the price of the names alone (a storage fault's ``file`` is checked against
    them). They depend on the package's ID, version, type, file count and locale, never its size.
    """
    return list(_cached_names(spec.id, spec.version, spec.type, spec.files, spec.locale, seed))


@functools.lru_cache(maxsize=256)
def _cached_names(
    package_id: str, version: int, kind: str, files: int, locale: str, seed: int
) -> tuple[str, ...]:
    # Cached: every case of a parametrised file checks its storage faults against the names.
    return tuple(_named(package_id, version, kind, files, locale, seed)[1])


def _named(
    package_id: str, version: int, kind: str, files: int, locale: str, seed: int
) -> tuple[Faker, list[str]]:
    """The seeded generator of one package version, and its file names drawn from it.

    The generator is returned where the names left it: the bytes are drawn from it next.
    """
    fake = Faker(locale)
    # Seed per package so adding a package to a scenario does not change the others' content.
    fake.seed_instance(seed ^ zlib.crc32(f"{package_id}.{version}".encode()))
    layout = _LAYOUTS[kind]
    names: list[str] = []
    taken: set[str] = set()
    # The first generated word of a non-English package is one that is not ASCII, so every
    # it_IT and ja_JP package has such a name to carry through blob names, SAS URLs and
    # manifests.
    accented = _accented_word(fake) if locale != "en_US" else None
    while len(names) < files:
        pattern = layout[len(names)] if len(names) < len(layout) else layout[-1]
        name = _name(fake, pattern, accented if "{word}" in pattern else None)
        if "{word}" in pattern:
            accented = None
        # Word lists are finite (ja_JP has ~200 words): number a repeated name instead of
        # drawing again, which could never end for large file counts.
        if name in taken:
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}-{len(names)}{dot}{ext}" if dot else f"{name}-{len(names)}"
        taken.add(name)
        names.append(name)
    return fake, names


def generate_package(
    spec: PackageSpec,
    seed: int,
    *,
    folder: Path | None = None,
    piece: int = RANDOM_PIECE_BYTES,
    in_memory: int | None = None,
) -> list[PackageSource]:
    """The files of one package version: ``spec.files`` files totalling ``spec.size`` bytes.

    A package of at most ``in_memory`` bytes (default :data:`IN_MEMORY_PACKAGE_BYTES`) is
    returned in memory; a larger one is written into ``folder`` (which the caller removes;
    :func:`generated_package` does both), one file and ``piece`` bytes at a time. Where the
    bytes go and ``piece`` (a multiple of 4) never change them.
    """
    if in_memory is None:
        in_memory = IN_MEMORY_PACKAGE_BYTES
    if piece <= 0 or piece % 4:
        msg = f"generate_package: piece={piece} must be a positive multiple of 4 bytes"
        raise InvalidValueError(msg)
    spill = spec.size > in_memory
    if spill and folder is None:
        msg = (
            f"generate_package: package {spec.id}.{spec.version} has {spec.size} bytes, more than "
            f"the {in_memory} generated in memory; pass folder= (a folder you remove), or use "
            "generated_package(), which makes a temporary one and removes it"
        )
        raise InvalidValueError(msg)
    fake, names = _named(spec.id, spec.version, spec.type, spec.files, spec.locale, seed)
    share = OS_UPGRADE_MAIN_SHARE if spec.type == "os_upgrade" else None
    sizes = split_sizes(spec.size, spec.files, main_share=share)
    rng = fake.random
    if folder is None or not spill:
        return [
            PackageSource(relpath=name, data=_random_bytes(rng, size, piece))
            for name, size in zip(names, sizes, strict=True)
        ]
    sources = []
    for index, (name, size) in enumerate(zip(names, sizes, strict=True)):
        # Numbered, not named after relpath: names may be nested or not ASCII; the blob name
        # is the relpath either way.
        target = folder / f"{spec.id}.{spec.version}-{index:05d}.bin"
        with target.open("wb") as handle:
            for chunk in _random_pieces(rng, size, piece):
                handle.write(chunk)
        sources.append(PackageSource(relpath=name, data=target))
    return sources


@contextlib.contextmanager
def generated_package(
    spec: PackageSpec,
    seed: int,
    *,
    piece: int = RANDOM_PIECE_BYTES,
    in_memory: int | None = None,
) -> Iterator[list[PackageSource]]:
    """:func:`generate_package`, a large package in a temporary folder removed when the block ends.

    The folder (``pytest-cmg-content-*`` in the system's temporary folder) lives only as long as
    the block, on error too: upload the files, or hash them, inside it.
    """
    # Read at each call (not bound as a default), so a test can move the threshold.
    if in_memory is None:
        in_memory = IN_MEMORY_PACKAGE_BYTES
    if spec.size <= in_memory:
        yield generate_package(spec, seed, piece=piece, in_memory=in_memory)
        return
    with tempfile.TemporaryDirectory(prefix=f"pytest-cmg-content-{spec.id}.{spec.version}-") as name:
        yield generate_package(spec, seed, folder=Path(name), piece=piece, in_memory=in_memory)


def _random_pieces(rng: random.Random, size: int, piece: int) -> Iterator[bytes]:
    """``size`` random bytes, ``piece`` at a time: the bytes one ``randbytes(size)`` would give.

    ``randbytes(n)`` is ``getrandbits(8 n)`` in little-endian order, 32 bits a draw, so pieces
    of a multiple of 4 bytes continue the same stream, and leave the generator where one call
    would.
    """
    left = size
    while left > 0:
        count = min(piece, left)
        yield rng.randbytes(count)
        left -= count


def _random_bytes(rng: random.Random, size: int, piece: int) -> bytes:
    if size <= piece:
        return rng.randbytes(size)  # one call, as content has always been drawn
    return b"".join(_random_pieces(rng, size, piece))
