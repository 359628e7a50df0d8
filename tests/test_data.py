import dataclasses
import json

import numpy as np
import pytest

from parallel_gpt import prepare
from parallel_gpt.data import VAL_PLAYS, DataLoader, load_corpus, markdown_play_to_text, shakespeare_plays
from parallel_gpt.tokenizers import DataError

PLAY = """# Hamlet

## ACT I

### SCENE I. Elsinore. A platform before the castle.

_FRANCISCO at his post. Enter to him BERNARDO_

**BERNARDO**  
Who's there?

**FRANCISCO**  
Nay, answer me: stand,  
and unfold yourself.

_Exit_

**HORATIO**  
__\\[Aside]_ Friends to this ground\\--and liegemen.

_Sings_

A second stanza,  
sung.
"""


def test_markdown_to_plain_speeches():
    assert markdown_play_to_text(PLAY) == (
        "BERNARDO:\nWho's there?\n\n"
        "FRANCISCO:\nNay, answer me: stand,\nand unfold yourself.\n\n"
        "HORATIO:\nFriends to this ground--and liegemen.\nA second stanza,\nsung.\n\n"
    )


def test_shakespeare_corpus_holds_out_whole_plays(cache_dir):
    plays = shakespeare_plays()
    assert len(plays) >= 37 and set(VAL_PLAYS) <= set(plays)
    corpus = load_corpus("shakespeare", cache_dir=cache_dir)
    text_val = corpus.tokenizer.decode(corpus.val[:2000])
    assert corpus.train.dtype == np.uint16 and corpus.train.size > 3_000_000
    assert 0.08 < corpus.val.size / (corpus.train.size + corpus.val.size) < 0.16
    assert ":\n" in text_val and "**" not in text_val and "_" not in text_val
    assert "HAMLET:" not in corpus.tokenizer.decode(corpus.train)  # a held-out play's hero
    assert isinstance(corpus.train, np.memmap)
    again = load_corpus("shakespeare", cache_dir=cache_dir)  # read back from the cache
    np.testing.assert_array_equal(again.train, corpus.train)
    assert again.fingerprint == corpus.fingerprint


def test_shakespeare_in_gpt2_tokens(cache_dir):
    corpus = load_corpus("shakespeare", "gpt2", cache_dir=cache_dir)
    assert corpus.tokenizer.to_json() == {"type": "gpt2"} and corpus.train.dtype == np.uint16
    assert corpus.tokenizer.decode(corpus.train[:6]).startswith(corpus.tokenizer.decode(corpus.train[:3]))
    assert 0.2 < corpus.train.size / load_corpus("shakespeare", cache_dir=cache_dir).train.size < 0.4


def test_text_file_dataset_and_cache_invalidation(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 100)
    corpus = load_corpus(str(path), cache_dir=tmp_path / "cache")
    assert corpus.train.size == 900 and corpus.val.size == 100
    path.write_text("xyz" * 500)  # a changed file is encoded again
    corpus = load_corpus(str(path), cache_dir=tmp_path / "cache")
    assert corpus.tokenizer.chars == "xyz" and corpus.train.size + corpus.val.size == 1500


@pytest.mark.parametrize("content, message", [
    (None, "does not exist"),
    (b"", "is empty"),
    (b"\xff\xfe bad bytes", "is not UTF-8"),
])
def test_bad_dataset_files(tmp_path, content, message):
    path = tmp_path / "d.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_corpus(str(path), cache_dir=tmp_path / "cache")


def _corpus(tmp_path, n=5000):
    path = tmp_path / "t.txt"
    path.write_text("".join(chr(97 + (i * 7) % 26) for i in range(n)))
    return load_corpus(str(path), cache_dir=tmp_path / "cache")


def test_split_shorter_than_a_block_is_rejected(tmp_path):
    corpus = _corpus(tmp_path, n=300)  # val split: 30 tokens
    with pytest.raises(DataError, match="val split .* 30 tokens, fewer than block_size\\+1=33"):
        DataLoader(corpus, block_size=32, batch_size=4, seed=0)


def test_global_batch_is_a_pure_function_of_seed_and_step(tmp_path):
    corpus = _corpus(tmp_path)
    a, b = DataLoader(corpus, 16, 8, seed=3), DataLoader(corpus, 16, 8, seed=3)
    xa, ya = a.batch(7)
    xb, yb = b.batch(7)
    np.testing.assert_array_equal(xa, xb)
    assert xa.shape == (8, 16) and xa.dtype == np.int32
    np.testing.assert_array_equal(xa[:, 1:], ya[:, :-1])  # targets are inputs shifted by one
    assert not np.array_equal(a.batch(8)[0], xa)
    assert not np.array_equal(DataLoader(corpus, 16, 8, seed=4).batch(7)[0], xa)
    np.testing.assert_array_equal(a.eval_batch("val", 0)[0], b.eval_batch("val", 0)[0])


def test_processes_take_disjoint_rows_of_the_same_global_batch(tmp_path):
    corpus = _corpus(tmp_path)
    full = DataLoader(corpus, 16, 8, seed=0).batch(3)[0]
    parts = [DataLoader(corpus, 16, 8, seed=0, process_index=p, process_count=4).batch(3)[0] for p in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), full)


def test_a_prepared_directory_loads_through_memory_maps_and_batches_like_an_array(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(20):
        (docs / f"{i:02d}.txt").write_text(f"Document {i}: " + "the quick brown fox jumps. " * (50 + i))
    prepare.prepare([str(docs)], str(tmp_path / "prepared"), "gpt2", val_fraction=0.2, seed=1)
    corpus = load_corpus(str(tmp_path / "prepared"))
    assert isinstance(corpus.train, np.memmap) and corpus.tokenizer.eot == 50256
    in_memory = dataclasses.replace(corpus, train=np.array(corpus.train), val=np.array(corpus.val))
    for step in (0, 5):
        for a, b in zip(DataLoader(corpus, 32, 8, seed=0).batch(step), DataLoader(in_memory, 32, 8, seed=0).batch(step)):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(DataError, match="holds gpt2 tokens, not char"):
        load_corpus(str(tmp_path / "prepared"), "char")


def _prepared_dir(folder, train_tokens: int, val_tokens: int = 4096):
    """A prepared directory of zero tokens, written as sparse files (no disk, no time)."""
    folder.mkdir()
    for split, n in (("train", train_tokens), ("val", val_tokens)):
        with open(folder / f"{split}.bin", "wb") as f:
            f.truncate(2 * n)
    meta = {"format": prepare.META_FORMAT, "tokenizer": {"type": "gpt2"}, "dtype": "uint16",
            "train_tokens": train_tokens, "val_tokens": val_tokens, "sha256": {"train.bin": "0", "val.bin": "0"}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def _rss_anon_kib() -> int:
    return int(open("/proc/self/status").read().split("RssAnon:")[1].split()[0])


def test_batches_from_a_large_prepared_directory_take_no_memory_of_its_size(tmp_path):
    corpus = load_corpus(str(_prepared_dir(tmp_path / "big", 1 << 30)))  # 2 GiB of uint16 tokens
    loader = DataLoader(corpus, 1024, 8, seed=0)
    loader.batch(0)
    before = _rss_anon_kib()
    for step in range(1, 101):
        x, _ = loader.batch(step)
    assert x.shape == (8, 1024) and type(x) is np.ndarray
    assert _rss_anon_kib() - before < 4096  # KiB: the process's own memory did not take in the corpus


def test_a_damaged_prepared_directory_is_one_clear_error(tmp_path):
    folder = _prepared_dir(tmp_path / "d", 5000)
    with open(folder / "train.bin", "r+b") as f:
        f.truncate(6000)
    with pytest.raises(DataError, match=r"train.bin has 6000 bytes, which does not match meta.json \(5000 uint16"):
        load_corpus(str(folder))
    (folder / "val.bin").unlink()
    (folder / "train.bin").unlink()
    with pytest.raises(DataError, match="cannot read .*train.bin .*--overwrite"):
        load_corpus(str(folder))
    (folder / "meta.json").write_text('{"format": %d, "tokenizer": {"type": "gpt2"}}' % prepare.META_FORMAT)
    with pytest.raises(DataError, match="meta.json lacks its tokenizer, dtype or sha256"):
        load_corpus(str(folder))
