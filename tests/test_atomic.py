"""rrec.atomic: the final name only ever holds a complete file (or directory), and a
failure inside the block leaves the old one and no temporary behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rrec.atomic import atomic_path, remove_temporaries, write_bytes, write_text


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_the_file_appears_only_when_the_block_ends(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same directory: the rename is atomic
        assert tmp.name.startswith(".") and tmp.name != target.name
        tmp.write_text("first half ")
        assert not target.exists()
        with tmp.open("a") as f:
            f.write("second half")
        assert not target.exists()
    assert target.read_text() == "first half second half"
    assert _names(target.parent) == ["out.txt"]


def test_a_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = write_text(tmp_path / "out.json", "old\n")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("boom")
    assert target.read_text() == "old\n"
    assert _names(tmp_path) == ["out.json"]


def test_a_failure_before_anything_was_written_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "never.bin"
    with pytest.raises(ValueError), atomic_path(target):
        raise ValueError("before the first byte")
    assert _names(tmp_path) == []


def test_write_text_and_write_bytes_replace_the_old_content(tmp_path: Path) -> None:
    target = tmp_path / "f"
    assert write_text(target, "héllo\n") == target
    assert target.read_bytes() == "héllo\n".encode()
    assert write_bytes(str(target), b"\x00\x01") == target
    assert target.read_bytes() == b"\x00\x01"
    assert _names(tmp_path) == ["f"]


def test_a_directory_is_published_whole_over_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"new")
        assert (target / "old.bin").exists()  # the old directory is untouched meanwhile
    assert _names(target) == ["weights.bin"]
    assert _names(tmp_path) == ["model"]

    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "half.bin").write_bytes(b"half")
        raise OSError("disk full")
    assert _names(target) == ["weights.bin"]
    assert _names(tmp_path) == ["model"]


def test_a_temporary_left_by_a_killed_writer_is_cleared(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(ValueError), atomic_path(target) as stale:
        raise ValueError("only to learn the temporary's name")
    stale.mkdir()
    (stale / "junk").write_text("from a killed run with the same process id")
    with atomic_path(target) as tmp:
        assert not tmp.exists()
        tmp.mkdir()
    assert _names(target) == []

    other = tmp_path / f".chunk.tmp-{os.getpid() + 1}"  # another process's leftover
    other.write_bytes(b"partial")
    keep = write_bytes(tmp_path / "chunk", b"done")
    remove_temporaries(tmp_path)
    assert _names(tmp_path) == ["chunk", "out"] and keep.read_bytes() == b"done"
