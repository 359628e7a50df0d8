"""The character tokenizer and GPT-2's BPE (offline, from the shipped ranks file)."""

import json
import random

import numpy as np
import pytest

from parallel_gpt.tokenizers import CharTokenizer, DataError, GPT2Tokenizer, from_json

MIXED = "Ünïcödé: naïve café, 日本語のテキスト, emoji 🎉👩‍💻, tabs\tand\r\nnewlines,  double  spaces "


@pytest.mark.parametrize("text, ids", [
    ("Hello world", [15496, 995]),
    ("Hello, world!", [15496, 11, 995, 0]),
    (" the", [262]),
    ("don't", [9099, 470]),
])
def test_gpt2_known_ids(text, ids):
    assert GPT2Tokenizer().encode(text).tolist() == ids


def test_gpt2_end_of_text_is_special_only_when_allowed():
    tok = GPT2Tokenizer()
    assert tok.encode("a<|endoftext|>b", allow_eot=True).tolist() == [64, 50256, 65]
    assert 50256 not in tok.encode("a<|endoftext|>b").tolist()  # documents' text never makes the separator
    assert tok.eot == 50256 and tok.vocab_size == 50257 and tok.dtype == np.uint16


@pytest.mark.parametrize("tok", [GPT2Tokenizer(), CharTokenizer.from_text(MIXED)])
def test_round_trips(tok):
    assert tok.decode(tok.encode(MIXED)) == MIXED
    assert from_json(json.loads(json.dumps(tok.to_json()))) == tok


def test_char_tokenizer_refuses_unknown_characters():
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.encode("world hello").dtype == np.uint16 and tok.eot is None
    with pytest.raises(DataError, match=r"not in the vocabulary: 'QZ'"):
        tok.encode("Zero Q")


def test_an_unknown_tokenizer_is_a_clear_error():
    with pytest.raises(DataError, match="a tokenizer this version does not know \\('sentencepiece'\\)"):
        from_json({"type": "sentencepiece"})


# Letters, digits, symbols, contractions, CJK, emoji and whitespace of every kind the
# GPT-2 pattern treats differently (U+001C is whitespace to Python but not to the pattern).
PARTS = ["a", "Z", "é", "日", "7", "42", ".", "!?", "'s", "'ll", "'", "🎉", "-", " ", "  ", "\n", "\n\n", "\t",
         "\r\n", "\u00a0", "\u2028", "\x1c", " the", " 'quoted'"]


def test_gpt2_text_cut_where_cut_says_encodes_to_the_ids_of_the_whole():
    tok, rng = GPT2Tokenizer(), random.Random(0)
    cuts = 0
    for _ in range(300):
        text = "".join(rng.choice(PARTS) for _ in range(rng.randint(1, 30)))
        whole = tok.encode(text).tolist()
        for limit in range(1, len(text)):
            c = tok.cut(text, limit)
            assert 0 <= c <= limit
            if c:
                cuts += 1
                assert tok.encode(text[:c]).tolist() + tok.encode(text[c:]).tolist() == whole, (text, c)
    assert cuts > 1000
    assert tok.cut("no_whitespace_at_all", 10) == 0 and tok.cut("x " * 100_000, 150_001) == 150_001
    assert tok.cut("a b" + "c" * 200_000, 150_000) == 1  # found 64 Ki-character windows back


def test_unpaired_surrogates_from_json_text_encode():
    text = json.loads('"a\\ud800b \\ud83c\\udf89"')  # one unpaired surrogate, one pair
    assert GPT2Tokenizer().encode(text).tolist() == [64, 4210, 65, 12520, 236, 231]
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
