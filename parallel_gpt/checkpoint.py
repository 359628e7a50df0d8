"""Checkpoints: arrays in an .npz keyed by tree path, plus a JSON sidecar; no pickle.

Layout: `out_dir/checkpoints/step_00001000/{arrays.npz, meta.json}`. A checkpoint is
written into a hidden temporary directory, every file and the directory are fsynced, then
the directory is renamed into place, so a reader sees a whole checkpoint or none. The
sidecar holds what the caller gives (runstate.py: the model's config, the tokenizer, the
run's settings) plus the step and a SHA-256 of the array file; loading checks it and reads
with `allow_pickle=False`, so a checkpoint cannot run code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path

import jax
import numpy as np

from parallel_gpt import files
from parallel_gpt.errors import CheckpointError, OutputError
from parallel_gpt.faults import fault_point

ARRAYS, META = "arrays.npz", "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def leaf_name(path, sep: str = "/") -> str:
    """A leaf's tree path as checkpoints name it (`h/0/attn/c_attn/weight`); with sep="."
    it is GPT-2's own name for the tensor (`h.0.attn.c_attn.weight`)."""
    return sep.join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k)))) for k in path)


def flatten(tree, prefix: str) -> dict[str, np.ndarray]:
    """{'prefix/h/0/attn/c_attn/weight': numpy array} for every leaf of `tree`: a logical
    tree, whole arrays and blocks as a tuple (the training state's: `DataParallel.to_host`)."""
    return {f"{prefix}/{leaf_name(p)}": np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def names(tree, prefix: str) -> list[str]:
    """The names `flatten` gives the leaves of `tree` (which may hold shapes only)."""
    return [f"{prefix}/{leaf_name(p)}" for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def unflatten(template, prefix: str, arrays: dict[str, np.ndarray]):
    """Fill `template`'s structure with `arrays[prefix/...]`, checking names, shapes and dtypes."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, t in leaves:
        name = f"{prefix}/{leaf_name(p)}"
        if name not in arrays:
            raise CheckpointError(f"checkpoint has no array {name!r}")
        a = arrays[name]
        if a.shape != tuple(t.shape) or a.dtype != t.dtype:
            raise CheckpointError(f"array {name!r} is {a.dtype}{list(a.shape)}, expected {t.dtype}{list(t.shape)}")
        out.append(a)
    return jax.tree.unflatten(treedef, out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_dirs(out_dir) -> list[Path]:
    """Step directories under out_dir/checkpoints, newest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP_DIR.match(p.name)), reverse=True)


def save(out_dir, step: int, arrays: dict[str, np.ndarray], meta: dict, keep: int = 3) -> Path:
    """Write checkpoint `step` atomically and keep the newest `keep` checkpoints."""
    root = Path(out_dir) / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp_step_*"):  # left by a process killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / ARRAYS, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        fault_point(f"save_{step:08d}_arrays")
        meta = {**meta, "step": step, "sha256": {ARRAYS: _sha256(tmp / ARRAYS)}}
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        files.fsync(tmp)
        fault_point(f"save_{step:08d}_meta")
        if final.exists():  # the same step saved again (e.g. a resumed run's last step)
            shutil.rmtree(final)
        os.replace(tmp, final)
        files.fsync(root)
        fault_point(f"save_{step:08d}_renamed")
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"cannot write checkpoint to {root}: {e.strerror or e} "
                              f"(free disk space or choose a writable out_dir); earlier checkpoints are untouched") from None
    for old in checkpoint_dirs(out_dir)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


class Writer:
    """`save` on a background thread, one checkpoint at a time, so that training waits only
    while the state is copied to host memory (`DataParallel.to_host`), not while it is
    hashed, written and fsynced. The write in flight holds that copy: 12 bytes per
    parameter with AdamW (GPT-2 small: 1.5 GB). A write that fails raises its error in
    the caller's thread at the next `check`, `save` or `wait`; a process killed while a
    write is in flight keeps every earlier checkpoint whole (`save` is atomic)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, out_dir, step: int, arrays: dict[str, np.ndarray], meta: dict, keep: int = 3):
        """Start writing checkpoint `step`, after the write in flight (if any) is done."""
        self.wait()
        # Not a daemon: an interpreter that exits normally finishes the write first.
        self._thread = threading.Thread(target=self._write, args=(out_dir, step, arrays, meta, keep),
                                        name=f"checkpoint {step}")
        self._thread.start()

    def _write(self, *args):
        try:
            save(*args)
        except BaseException as e:  # noqa: BLE001 -- raised in the caller's thread by check()
            self._error = e

    def check(self):
        """Raise the error of a write that failed; never waits."""
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def wait(self):
        """Wait for the write in flight, then raise its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.check()


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of the checkpoint directory `path`, verified against its checksum."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
        expected = meta["sha256"][ARRAYS]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {META} ({type(e).__name__})") from None
    try:
        if _sha256(path / ARRAYS) != expected:
            raise CheckpointError(f"checkpoint {path}: {ARRAYS} does not match its checksum (truncated or corrupt)")
        with np.load(path / ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: cannot read {ARRAYS} ({e})") from None
    return arrays, meta


def load_latest(out_dir, report=print) -> tuple[dict[str, np.ndarray], dict] | None:
    """The newest checkpoint that verifies; each one skipped is reported in one line."""
    for path in checkpoint_dirs(out_dir):
        try:
            return load(path)
        except CheckpointError as e:
            report(f"skipping {e}")
    return None
