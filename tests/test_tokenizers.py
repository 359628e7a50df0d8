"""The character tokenizer and GPT-2's BPE (offline, from the shipped ranks file)."""

import json

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
