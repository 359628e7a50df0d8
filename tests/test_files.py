"""files.py: durable, atomic writes."""

import os

import pytest

from parallel_gpt import files


def test_write_atomic_replaces_the_whole_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "meta.json"
    files.write_atomic(path, b"old")
    files.write_atomic(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]


def test_a_failed_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    files.write_atomic(path, b"old")

    def fail(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        files.write_atomic(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no partial file left behind


def test_fsync_takes_files_and_directories(tmp_path):
    (tmp_path / "a").write_bytes(b"x")
    files.fsync(tmp_path / "a")
    files.fsync(tmp_path)
    with pytest.raises(FileNotFoundError):
        files.fsync(tmp_path / "missing")


def test_replace_dir_swaps_a_whole_directory_and_puts_the_old_one_back_on_failure(tmp_path, monkeypatch):
    target, new = tmp_path / "out", tmp_path / "out.tmp-1"
    target.mkdir()
    (target / "old.bin").write_bytes(b"old")
    new.mkdir()
    (new / "new.bin").write_bytes(b"new")
    files.replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["new.bin"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    again = tmp_path / "out.tmp-2"
    again.mkdir()
    real_replace = os.replace

    def fail_second(src, dst):
        if str(src) == str(again):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        files.replace_dir(again, target)
    assert [p.name for p in target.iterdir()] == ["new.bin"]  # the earlier directory is back in place
