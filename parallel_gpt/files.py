"""Durable file writes, shared by checkpoints, prepared datasets and the token cache.

Without JAX or NumPy, so that `prepare` (and its worker processes) stay small."""

from __future__ import annotations

import os
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
