"""The Windows form of paths: one rule, C:\\ is the engine's system drive folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_cmg._protocol.winpath import WindowsPathError, disk_path, windows_path, windows_text

DRIVE = Path("/work/machine/drive")

# File names a Windows client can have: no separators, no colon, not "." or "..".
names = st.text(
    alphabet=st.characters(blacklist_characters="/\\:\x00", codec="utf-8", min_codepoint=32),
    min_size=1,
    max_size=12,
).filter(lambda name: name not in (".", ".."))


@given(st.lists(names, max_size=6))
def test_disk_to_windows_and_back(parts: list[str]) -> None:
    path = DRIVE.joinpath(*parts)
    text = windows_path(path, DRIVE)
    assert text == "C:\\" + "\\".join(parts)
    assert disk_path(text, DRIVE) == path


@given(
    st.lists(names, min_size=1, max_size=6),
    st.sampled_from(["C:", "c:", ""]),
    st.sampled_from(["\\", "/"]),
)
def test_windows_to_disk_and_back(parts: list[str], drive: str, separator: str) -> None:
    text = drive + separator + separator.join(parts)
    back = windows_path(disk_path(text, DRIVE), DRIVE)
    assert back == "C:\\" + "\\".join(parts)


def test_the_products_folders() -> None:
    assert windows_path(DRIVE / "_SMSTaskSequence" / "Packages" / "PS100012", DRIVE) == (
        "C:\\_SMSTaskSequence\\Packages\\PS100012"
    )
    assert windows_path(DRIVE, DRIVE) == "C:\\"
    assert windows_path(str(DRIVE / "Windows" / "." / "ccmcache" / "x" / ".." / "1"), DRIVE) == (
        "C:\\Windows\\ccmcache\\1"
    )
    assert disk_path("c:/Windows\\ccmcache//1\\", DRIVE) == DRIVE / "Windows" / "ccmcache" / "1"
    assert disk_path("C:\\OSD\\..\\Drivers", DRIVE) == DRIVE / "Drivers"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("D:\\Drivers", "on drive D:"),
        ("\\\\server\\share\\x", "UNC"),
        ("Drivers\\HP", "relative"),
        ("C:Drivers", "relative"),
        ("C:\\..\\etc", "above C:"),
        ("C:\\a\\b:c", "colon"),
    ],
)
def test_paths_off_the_drive_are_refused(text: str, why: str) -> None:
    with pytest.raises(WindowsPathError, match=f"{why}.*rule: .*fix: "):
        disk_path(text, DRIVE)


@pytest.mark.parametrize(
    "path",
    [Path("/work/machine/other"), Path("/work/machine/drive/../x"), Path("/work/machine/drive2")],
)
def test_disk_paths_outside_the_drive_are_refused(path: Path) -> None:
    with pytest.raises(WindowsPathError, match=r"not under the system drive.*fix: "):
        windows_path(path, DRIVE)


def test_a_name_with_a_backslash_has_no_windows_form() -> None:
    with pytest.raises(WindowsPathError, match="backslash"):
        windows_path(DRIVE / "a\\b", DRIVE)


def test_paths_in_a_line_are_written_in_the_windows_form() -> None:
    line = (
        f"python3 /opt/acp.py /tmp/x/SMSTSDownload.INI PS100012 {DRIVE}/Windows/ccmcache/.acp-1 "
        f"'{DRIVE}' {DRIVE}2/other {DRIVE}/a\\b"
    )
    assert windows_text(line, DRIVE) == (
        "python3 /opt/acp.py /tmp/x/SMSTSDownload.INI PS100012 C:\\Windows\\ccmcache\\.acp-1 "
        f"'C:\\' {DRIVE}2/other {DRIVE}/a\\b"
    )
