"""Durable file writes, shared by checkpoints, prepared datasets and the token cache.

Without JAX or NumPy, so that `prepare` (and its worker processes) stay small."""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def cache_root() -> Path:
    """This user's cache of derived files: encoded corpora, compiled programs
    (PARALLEL_GPT_CACHE moves it; default ~/.cache/parallel_gpt)."""
    return Path(os.environ.get("PARALLEL_GPT_CACHE", Path.home() / ".cache" / "parallel_gpt"))


def fsync(path: Path):
    """Flush a file's or a directory's entry to disk (a directory after a rename into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, target: Path):
    """Move the finished directory `tmp` to `target`, durably: readers see the old `target`
    or the whole new one. An existing `target` is moved aside first and removed after; if
    the final rename fails (e.g. `target` is a file), it goes back in place."""
    old = target.with_name(f"{target.name}.tmp-{os.getpid()}-old")
    moved = target.is_dir() and not target.is_symlink()
    if moved:
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if moved:
            os.replace(old, target)
        raise
    fsync(target.parent)
    if moved:
        shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, data: bytes):
    """Write `data` to `path` through a temporary file and a rename: readers see the old
    file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; a failed write leaves no partial file
