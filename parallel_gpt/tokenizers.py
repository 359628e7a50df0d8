"""Tokenizers behind one small interface: characters, and GPT-2's byte-pair encoding.

Both have `encode(text) -> ids`, `decode(ids) -> text`, `vocab_size`, `eot` (the
end-of-text id that separates documents, None for characters), `dtype` (the smallest
unsigned integer type that holds every id: how token files store them), `cut(text, limit)`
(where long text can be encoded in pieces without changing its ids) and `to_json()`;
`from_json` rebuilds one from a checkpoint or a prepared dataset's meta.json.

GPT-2's BPE (`r50k_base`, 50,257 ids) runs through the `tiktoken` package, fully offline:
its ranks file ships in this package (`assets/gpt2.tiktoken.gz`; see
`assets/gpt2.tiktoken.LICENSE`) and is checked against its SHA-256 on load.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gzip
import hashlib
import re
from pathlib import Path

import numpy as np

from parallel_gpt.errors import DataError

ASSETS = Path(__file__).resolve().parent / "assets"
# OpenAI's gpt2.tiktoken, byte-identical to the copy the MIT-licensed openai-whisper sdist
# carries as whisper/assets/gpt2.tiktoken; tiktoken pins the same hash for r50k_base.
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# tiktoken's r50k_base pre-tokenizer, verbatim (tiktoken_ext/openai_public.py): contractions,
# letters, digits, other symbols, whitespace. Equivalent to GPT-2's original pattern.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT = "<|endoftext|>"
# Where GPT-2 text can be cut: a space or line break after a non-whitespace character.
_GPT2_CUT = re.compile(r"(?<=\S)[ \n]")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    chars: str  # the vocabulary, sorted; token id = index
    eot = None

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        # One code point per character (an unpaired surrogate from JSON text too).
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)
        vocab = np.frombuffer(self.chars.encode("utf-32-le", "surrogatepass"), np.uint32)  # sorted, as chars is
        ids = np.searchsorted(vocab, codes)
        known = vocab[np.minimum(ids, len(vocab) - 1)] == codes if len(vocab) else np.zeros(len(codes), bool)
        if not known.all():
            unknown = "".join(sorted(set(text) - set(self.chars)))
            raise DataError(f"characters not in the vocabulary: {unknown!r}; use only these: {self.chars!r}")
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def cut(self, text: str, limit: int) -> int:
        """Every character is a token: text can be cut anywhere."""
        return min(limit, len(text))

    def to_json(self) -> dict:
        return {"type": "char", "chars": self.chars}


@dataclasses.dataclass(frozen=True)
class GPT2Tokenizer:
    """GPT-2's byte-pair encoding. `encode` treats "<|endoftext|>" in text as plain text
    unless `allow_eot` (documents are separated by the `eot` id, not by that string)."""

    eot = 50256
    vocab_size = 50257

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode(self, text: str, allow_eot: bool = False) -> np.ndarray:
        enc, allowed = gpt2_encoding(), {EOT} if allow_eot else set()
        try:  # straight into an array: a list of Python ints would take 36 bytes per token
            ids = enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
        except UnicodeEncodeError:  # unpaired surrogates (JSON's "\ud800"): replaced, as tiktoken's encode does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = enc.encode_to_numpy(text, allowed_special=allowed, disallowed_special=())
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        return gpt2_encoding().decode([int(i) for i in ids])

    def cut(self, text: str, limit: int) -> int:
        """The largest c <= limit where text[c] is a space or line break after a
        non-whitespace character, or 0 if there is none: encode(text[:c]) followed by
        encode(text[c:]) is exactly encode(text). No pre-token of GPT2_PATTERN joins a
        non-whitespace character to the whitespace after it, so c is a pre-token boundary,
        and the pattern looks only forward (`(?!\\S)`, `$`) and never past that
        non-whitespace character, so text[:c] splits into the same pre-tokens. (Python's
        `\\S` excludes every character the pattern's `\\s` includes, and more.)"""
        end = limit + 1
        while end > 1:  # backwards, 64 Ki characters at a time: the cut is usually near the limit
            start = max(1, end - (1 << 16))
            last = None
            for last in _GPT2_CUT.finditer(text, start, end):
                pass
            if last is not None:
                return last.start()
            end = start
        return 0

    def to_json(self) -> dict:
        return {"type": "gpt2"}


@functools.lru_cache(maxsize=None)
def gpt2_encoding():
    """The `tiktoken.Encoding` for r50k_base, from the shipped ranks file."""
    import tiktoken

    data = gzip.decompress((ASSETS / "gpt2.tiktoken.gz").read_bytes())
    if hashlib.sha256(data).hexdigest() != GPT2_RANKS_SHA256:
        raise DataError(f"{ASSETS / 'gpt2.tiktoken.gz'} is damaged (SHA-256 mismatch): reinstall parallel_gpt")
    # The format tiktoken.load.load_tiktoken_bpe reads: one "base64(token) rank" per line.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT: 50256},
                             explicit_n_vocab=50257)


TOKENIZERS = ("char", "gpt2")


def from_json(obj: dict):
    """The tokenizer a checkpoint or a prepared dataset recorded; DataError for one this
    version does not know."""
    kind = obj.get("type") if isinstance(obj, dict) else None
    if kind == "char" and isinstance(obj.get("chars"), str):
        return CharTokenizer(obj["chars"])
    if kind == "char":
        raise DataError(f"a char tokenizer whose chars are {type(obj.get('chars')).__name__}, not a string: "
                        f"the file is damaged")
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise DataError(f"a tokenizer this version does not know ({kind!r}): use the version of parallel_gpt that wrote it")
