"""``_util.tree.walk_entries``: the one link-safe walk of a folder the client does not trust."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pytest_cmg._client.acp import read_folder
from pytest_cmg._util.tree import walk_entries

if TYPE_CHECKING:
    from pathlib import Path


def _tree(root: Path) -> Path:
    """root/a/b/f.txt, root/a/g.txt, root/top.txt, a link to a folder outside, a FIFO."""
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f.txt").write_text("f")
    (root / "a" / "g.txt").write_text("g")
    (root / "top.txt").write_text("t")
    outside = root.parent / f"{root.name}-outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("s")
    (root / "a" / "out").symlink_to(outside, target_is_directory=True)
    os.mkfifo(root / "pipe")
    return root


def test_the_walk_yields_every_non_folder_with_its_slash_path_and_never_follows_a_link(tmp_path):
    root = _tree(tmp_path / "root")
    seen = {relpath: entry for entry, relpath in walk_entries(root)}
    # The link to a folder is yielded as an entry (for the caller to refuse or remove); what
    # it points at is never reached, and real folders are entered, not yielded.
    assert sorted(seen) == ["a/b/f.txt", "a/g.txt", "a/out", "pipe", "top.txt"]
    assert seen["a/out"].is_symlink()
    assert seen["a/b/f.txt"].path == str(root / "a" / "b" / "f.txt")


def test_a_folder_the_caller_will_not_enter_is_yielded_whole(tmp_path):
    root = _tree(tmp_path / "root")
    found = [relpath for _, relpath in walk_entries(root, descend=lambda rel: rel != "a/b")]
    assert sorted(found) == ["a/b", "a/g.txt", "a/out", "pipe", "top.txt"]


def test_read_folder_refuses_a_folder_whose_name_is_not_utf8_as_one_name(tmp_path):
    (tmp_path / "ok.txt").write_text("ok")
    bad = os.fsdecode(b"bad\xff")  # what scandir gives for a name that is not UTF-8
    (tmp_path / bad).mkdir()
    (tmp_path / bad / "inside.txt").write_text("never hashed")
    content = read_folder(tmp_path)
    assert list(content.files) == ["ok.txt"]
    assert content.refused == ["bad\\udcff"]
