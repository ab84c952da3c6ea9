"""Generated package content: plausible file trees, reproducible from a seed.

Names come from faker in the package's locale (so ``ja_JP`` and ``it_IT`` names travel through
blob names, SAS URLs and manifests); bytes come from faker's seeded random generator. The same
scenario seed always yields the same files, on every xdist worker.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

from faker import Faker

from .._storage.clouddp import PackageSource

if TYPE_CHECKING:
    from .model import PackageSpec

__all__ = ["generate_package"]

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


def generate_package(spec: PackageSpec, seed: int) -> list[PackageSource]:
    """The files of one package version: ``spec.files`` files totalling ``spec.size`` bytes."""
    fake = Faker(spec.locale)
    # Seed per package so adding a package to a scenario does not change the others' content.
    fake.seed_instance(seed ^ zlib.crc32(f"{spec.id}.{spec.version}".encode()))
    layout = _LAYOUTS[spec.type]
    names: list[str] = []
    taken: set[str] = set()
    # The first generated word of a non-English package is one that is not ASCII, so every
    # it_IT and ja_JP package has such a name to carry through blob names, SAS URLs and
    # manifests.
    accented = _accented_word(fake) if spec.locale != "en_US" else None
    while len(names) < spec.files:
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
    sizes = _split(spec.size, spec.files, main_share=0.9 if spec.type == "os_upgrade" else None)
    return [
        PackageSource(relpath=name, data=fake.random.randbytes(size))
        for name, size in zip(names, sizes, strict=True)
    ]


def _split(total: int, count: int, main_share: float | None) -> list[int]:
    if count == 1:
        return [total]
    if main_share is not None:
        # Leave every other file at least one byte.
        main = min(max(1, int(total * main_share)), total - (count - 1))
        rest = _split(total - main, count - 1, None)
        return [main, *rest]
    base, extra = divmod(total, count)
    return [base + (1 if i < extra else 0) for i in range(count)]
