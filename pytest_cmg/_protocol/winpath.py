"""The Windows form of paths: the one rule mapping a client's ``C:\\`` onto a folder on disk.

A scenario's client runs on the machine running the tests, but its variables, cache paths and
log lines must read as on a Windows client (``C:\\_SMSTaskSequence\\Packages\\PS100012``,
``C:\\Windows\\ccmcache\\1``). The rule (docs/emulation.md, "Windows form and one clock"): the
engine's ``system_drive`` folder stands for ``C:\\``, and a path below it is written as ``C:\\``
followed by its folders joined by backslashes. :func:`windows_path` writes that form and
:func:`disk_path` reads it back; every other module goes through these two functions, so the
rule lives in one place.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from .._errors import PytestCmgError

__all__ = ["SYSTEM_DRIVE", "WindowsPathError", "disk_path", "windows_path", "windows_text"]

#: The drive the system drive folder stands for, as the product writes it.
SYSTEM_DRIVE = "C:"

_DRIVE = re.compile(r"^([A-Za-z]):")


class WindowsPathError(PytestCmgError, ValueError):
    """A path cannot be mapped between the disk and the client's ``C:`` drive."""


def windows_path(path: Path | str, system_drive: Path) -> str:
    """``path`` (a file or folder under ``system_drive``) as the client sees it: ``C:\\...``.

    The comparison is lexical (``..`` and ``.`` are folded, links are not followed), so the
    same folder gives the same text whether or not it exists yet.
    """
    root = PurePosixPath(os.path.normpath(Path(system_drive).absolute()))
    target = PurePosixPath(os.path.normpath(Path(path).absolute()))
    try:
        parts = target.relative_to(root).parts
    except ValueError:
        message = (
            f"{path} is not under the system drive folder {system_drive} (rule: the client's "
            f"{SYSTEM_DRIVE}\\ is that folder, and only paths below it have a Windows form); "
            "fix: place the file under the engine's system_drive"
        )
        raise WindowsPathError(message) from None
    for part in parts:
        if "\\" in part or ":" in part:
            message = (
                f"{path}: the name {part!r} holds a backslash or a colon (rule: a Windows "
                "file name cannot, so the Windows form would name another file); fix: rename it"
            )
            raise WindowsPathError(message)
    return SYSTEM_DRIVE + "\\" + "\\".join(parts)


def windows_text(text: str, system_drive: Path) -> str:
    """``text`` with every disk path under ``system_drive`` in it written in the Windows form.

    For lines the client does not compose itself: the command line of a content provider and
    what that program prints name the folder it was given on disk, which a Windows program would
    have printed as ``C:\\...``. A path ends at white space or a quote; one that has no Windows
    form (a name with a backslash) is left as it is.
    """
    root = os.path.normpath(Path(system_drive).absolute())
    pattern = re.compile(re.escape(root) + r"(?=$|[/\s'\"])(?:/[^\s'\"]*)?")

    def rewrite(match: re.Match[str]) -> str:
        try:
            return windows_path(match[0], system_drive)
        except WindowsPathError:
            return match[0]

    return pattern.sub(rewrite, text)


def disk_path(text: str, system_drive: Path) -> Path:
    """The folder on disk that a client path names (the inverse of :func:`windows_path`).

    ``C:\\Drivers\\HP``, ``c:/Drivers/HP`` and ``\\Drivers\\HP`` (rooted on the current drive,
    which is ``C:``) all give ``system_drive/Drivers/HP``: the drive letter is case-insensitive
    and both separators are accepted. Another drive, a UNC share, a relative path or ``..``
    leading above ``C:\\`` is refused.
    """
    rest = text
    drive = _DRIVE.match(rest)
    if drive is not None:
        if drive[1].upper() + ":" != SYSTEM_DRIVE:
            _refuse(text, system_drive, f"it is on drive {drive[1].upper()}:")
        rest = rest[2:]
    rest = rest.replace("/", "\\")
    if rest.startswith("\\\\"):
        _refuse(text, system_drive, "it is a network (UNC) path")
    if not rest.startswith("\\"):
        _refuse(text, system_drive, "it is relative, and the client has no current folder here")
    parts: list[str] = []
    for part in rest.split("\\"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                _refuse(text, system_drive, "its '..' leads above C:\\")
            parts.pop()
            continue
        if ":" in part:
            _refuse(text, system_drive, f"the name {part!r} holds a colon")
        parts.append(part)
    return system_drive.joinpath(*parts)


def _refuse(text: str, system_drive: Path, why: str) -> None:
    message = (
        f"client path {text!r}: {why} (rule: only paths on {SYSTEM_DRIVE}\\ map to the disk, "
        f"onto the system drive folder {system_drive}); fix: write it as "
        f"{SYSTEM_DRIVE}\\<folder>\\..."
    )
    raise WindowsPathError(message)
