"""`python -m parallel_gpt.prepare`: text corpora -> memory-mapped token files.

    python -m parallel_gpt.prepare INPUT... --tokenizer gpt2 --out DIR [--workers N]
        [--val_fraction 0.0005] [--seed 0] [--jsonl_field text] [--overwrite]

INPUTs are files and directories of them (every file below, in name order), mixed
freely: text (one document per file), JSON Lines (`.jsonl`: one document per row, its
text in --jsonl_field) and Parquet (`.parquet`: one document per row, its text in the
column --jsonl_field names), with `.gz` and `.zst` files read as streams (`.jsonl.zst`
is JSON Lines). See `readers` for what null and non-string values get; Parquet and zstd
need the [data] extra. With the gpt2 tokenizer every document
ends with the end-of-text token. A document goes to validation when a hash of (seed, its
first piece of text) falls below --val_fraction, so no document straddles the split and
the split does not depend on file names or order. Output: DIR/train.bin and DIR/val.bin (uint16 while
the vocabulary fits, else uint32) and DIR/meta.json (tokenizer, dtype, token and
document counts, the SHA-256 of each token file, and a fingerprint of the inputs and
settings); `--dataset=DIR` trains on it.

Streaming, with bounded memory: documents are read in pieces of at most PIECE_CHARS
(256 Ki) characters, cut only where `tokenizer.cut` shows that the pieces encode to exactly
the whole document's ids (for GPT-2: before a space or line break that follows a
non-whitespace character); at most 2 x workers pieces are in flight, and the token files
are appended to as pieces come back, in order. So peak memory does not grow with the
input. Per process it is the interpreter with numpy and tiktoken's ranks (~55 MiB) plus
at most ~60 bytes per piece character in the process that encodes (<= 16 MiB) and, in
the parent of --workers > 1, ~24 bytes per character for each piece in flight (<= 12 MiB
per worker): 4-byte characters that are 3 tokens each are the worst case (measured peaks:
README, and `benchmarks/prepare.py`). Held whole, outside that bound: one JSON Lines row, and a run of more than
PIECE_CHARS characters with no such GPT-2 cut (tiktoken needs it whole for exact ids).
Parquet inputs add pyarrow (~40 MiB once) and a batch of `readers.BATCH_ROWS` rows.

The output is byte-identical for any --workers. It is written to DIR.tmp-<pid> and
renamed into place, so an interrupted prepare never leaves a DIR that loads; a rerun with
the same inputs and settings does nothing and says so; a DIR holding another dataset is
refused without --overwrite. Bad input (a missing file, bytes that are not UTF-8, a JSON
Lines row that is not JSON or lacks the field, a damaged or cut .gz, .zst or .parquet
file, a Parquet file without the column or whose column is not text, no documents) is
one line on stderr, naming the file and the line, row or byte, and exit code 2.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from parallel_gpt.files import fsync, replace_dir
from parallel_gpt.faults import fault_point
from parallel_gpt.errors import DataError, run_cli
from parallel_gpt.readers import check_overlap, documents, input_files
from parallel_gpt.tokenizers import TOKENIZERS, CharTokenizer, GPT2Tokenizer

META_FORMAT = 1
PIECE_CHARS = 1 << 18  # characters encoded in one call; the memory bound scales with it


# --- cutting documents into pieces -------------------------------------------------------


def pieces(chunks, tokenizer):
    """A document's text in pieces of at most PIECE_CHARS characters, cut only where
    `tokenizer.cut` says that the pieces encode to exactly the document's ids. (GPT-2 text
    with no whitespace for longer than that is the exception: it is held until a cut.)"""
    pending = ""
    for chunk in chunks:
        pending += chunk
        while len(pending) > PIECE_CHARS:
            cut = tokenizer.cut(pending, PIECE_CHARS) or tokenizer.cut(pending, len(pending) - 1)
            if not cut:
                break
            yield pending[:cut]
            pending = pending[cut:]
    yield pending


def is_validation(first_piece: str, seed: int, val_fraction: float) -> bool:
    """A document's split, from a hash of (seed, its first piece): the same for any file
    name, order or worker count, and known before the rest of the document is read."""
    h = hashlib.sha256(seed.to_bytes(8, "little", signed=True) + first_piece.encode("utf-8", "surrogatepass"))
    return int.from_bytes(h.digest()[:8], "little") / 2**64 < val_fraction


# --- encoding in parallel ------------------------------------------------------------------

_tokenizer = None


def _init_worker(tokenizer_json: dict):
    global _tokenizer
    from parallel_gpt.tokenizers import from_json

    _tokenizer = from_json(tokenizer_json)


def _encode(text: str) -> np.ndarray:
    return _tokenizer.encode(text)


class Encoder:
    """Encodes pieces in order, in `workers` processes, with at most 2 x workers in flight."""

    def __init__(self, tokenizer, workers: int):
        self.tokenizer, self.workers = tokenizer, workers
        self.pool = None
        if workers > 1:
            ctx = multiprocessing.get_context("spawn")  # no JAX or threads inherited from the parent
            self.pool = ctx.Pool(workers, _init_worker, (tokenizer.to_json(),))
        self.pending = collections.deque()

    def submit(self, text: str, tag):
        """Queue `text`; returns the (ids, tag) of pieces that are done, oldest first."""
        if self.pool is None:
            return [(self.tokenizer.encode(text), tag)]
        self.pending.append((self.pool.apply_async(_encode, (text,)), tag))
        done = []
        while len(self.pending) > 2 * self.workers or (self.pending and self.pending[0][0].ready()):
            result, t = self.pending.popleft()
            done.append((result.get(), t))
        return done

    def drain(self):
        while self.pending:
            result, t = self.pending.popleft()
            yield result.get(), t

    def close(self):
        if self.pool is not None:
            self.pool.terminate()


# --- the prepared directory ----------------------------------------------------------------


def fingerprint(files: list[Path], settings: dict) -> str:
    """Of the inputs (path, size, modification time) and the settings."""
    h = hashlib.sha256(json.dumps({"format": META_FORMAT, **settings}, sort_keys=True).encode())
    for path in files:
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == META_FORMAT else None


def char_vocabulary(files, jsonl_field: str, progress) -> CharTokenizer:
    chars = set()
    for doc in documents(files, jsonl_field, progress):
        for chunk in doc:
            chars.update(chunk)
    return CharTokenizer("".join(sorted(chars)))


class Progress:
    """Bytes read, tokens written, tokens/s and ETA on stderr, when it is a terminal."""

    def __init__(self, total_bytes: int, passes: int):
        self.total, self.done, self.tokens, self.start, self.shown = total_bytes * passes, 0, 0, time.monotonic(), 0.0
        self.active = sys.stderr.isatty()

    def __call__(self, nbytes: int):
        self.done += nbytes
        now = time.monotonic()
        if self.active and now - self.shown > 0.5:
            self.shown = now
            elapsed = now - self.start
            eta = elapsed * (self.total - self.done) / max(self.done, 1)
            print(f"\r{self.done / 2**20:,.0f}/{self.total / 2**20:,.0f} MiB, {self.tokens:,} tokens, "
                  f"{self.tokens / max(elapsed, 1e-9):,.0f} tokens/s, ETA {eta:,.0f} s  ", end="", file=sys.stderr)

    def close(self):
        if self.active:
            print(file=sys.stderr)


def prepare(inputs: list[str], out: str, tokenizer: str = "gpt2", workers: int = 1, val_fraction: float = 0.0005,
            seed: int = 0, jsonl_field: str = "text", overwrite: bool = False) -> str:
    """Prepare `out` (see the module docstring); returns a line saying what was done."""
    if tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer={tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    if not 1 <= workers <= 1024:
        raise DataError(f"workers={workers} must be between 1 and 1024")
    if not -2**63 <= seed < 2**63:  # hashed as 8 bytes
        raise DataError(f"seed={seed} must be in [-2**63, 2**63)")
    if not out.strip():
        raise DataError("--out is empty: name the directory to write")
    out_dir = Path(out)
    check_overlap(inputs, out_dir.resolve())
    files = input_files(inputs, out_dir.resolve())
    settings = {"tokenizer": tokenizer, "val_fraction": val_fraction, "seed": seed, "jsonl_field": jsonl_field}
    digest = fingerprint(files, settings)
    existing = read_meta(out_dir)
    if existing is not None and existing.get("fingerprint") == digest:
        return f"{out_dir} already holds this dataset (fingerprint {digest[:12]}): nothing to do"
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise DataError(f"{out_dir} already holds another dataset or other files: pass --overwrite to replace it, "
                        f"or choose another --out")
    for stale in out_dir.parent.glob(f"{out_dir.name}.tmp-*"):  # left by an interrupted prepare
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        meta = _write(files, tmp, tokenizer, workers, val_fraction, seed, jsonl_field)
        meta.update(format=META_FORMAT, fingerprint=digest, settings=settings,
                    inputs=[str(p) for p in files][:1000])
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        for path in (tmp / "train.bin", tmp / "val.bin", tmp / "meta.json", tmp):  # on disk before the rename
            fsync(path)
        fault_point("prepare_written")
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return (f"{out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
            f"from {meta['train_documents'] + meta['val_documents']:,} documents ({meta['dtype']})")


def _write(files, tmp: Path, tokenizer_name: str, workers: int, val_fraction: float, seed: int,
           jsonl_field: str) -> dict:
    total = sum(p.stat().st_size for p in files)
    progress = Progress(total, 2 if tokenizer_name == "char" else 1)
    tokenizer = char_vocabulary(files, jsonl_field, progress) if tokenizer_name == "char" else GPT2Tokenizer()
    dtype = tokenizer.dtype
    splits = {s: {"file": open(tmp / f"{s}.bin", "wb"), "sha": hashlib.sha256(), "tokens": 0, "documents": 0}
              for s in ("train", "val")}
    eot = np.array([tokenizer.eot], dtype) if tokenizer.eot is not None else None
    encoder = Encoder(tokenizer, workers)

    def write(ids: np.ndarray, split: str):
        data = ids.astype(dtype, copy=False).tobytes()
        out = splits[split]
        out["file"].write(data)
        out["sha"].update(data)
        out["tokens"] += ids.size
        progress.tokens += ids.size

    written = 0

    def finish(done):
        nonlocal written
        for ids, (split, last) in done:
            write(ids, split)
            if last and eot is not None:
                write(eot, split)
            written += 1
            fault_point(f"prepare_piece_{written}")  # a kill test's "midway"

    try:
        for doc in documents(files, jsonl_field, progress):
            split, previous = None, None
            for piece in pieces(doc, tokenizer):  # each piece is submitted once the next one exists
                if split is None:
                    if not piece:
                        break  # an empty document
                    split = "val" if is_validation(piece, seed, val_fraction) else "train"
                    splits[split]["documents"] += 1
                if previous is not None:
                    finish(encoder.submit(previous, (split, False)))
                previous = piece
            if previous is not None:
                finish(encoder.submit(previous, (split, True)))
        finish(encoder.drain())
    finally:
        encoder.close()
        progress.close()
        for out in splits.values():
            out["file"].close()
    if not splits["train"]["documents"] + splits["val"]["documents"]:
        raise DataError(f"no documents in {', '.join(map(str, files[:3]))}: the inputs are empty")
    return {"tokenizer": tokenizer.to_json(), "dtype": dtype.name,
            **{f"{s}_tokens": v["tokens"] for s, v in splits.items()},
            **{f"{s}_documents": v["documents"] for s, v in splits.items()},
            "sha256": {f"{s}.bin": v["sha"].hexdigest() for s, v in splits.items()}}


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="+", metavar="INPUT")
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2")
    parser.add_argument("--out", required=True)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--val_fraction", type=float, default=0.0005)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jsonl_field", default="text",
                        help="the text field of JSON Lines rows and the text column of Parquet files")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    print(prepare(args.inputs, args.out, args.tokenizer, args.workers, args.val_fraction, args.seed,
                  args.jsonl_field, args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
