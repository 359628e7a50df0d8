"""KV-cache generation against the recompute path, sampling rules, and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_gpt.generate import decode_recompute, empty_cache, forward, generate, prefill
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.tokenizers import CharTokenizer, DataError

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
CFG = GPTConfig(block_size=24, vocab_size=64, vocab_tokens=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32,
                dropout=0.0).for_platform("cpu")
MODEL = GPT.create(CFG, key=jax.random.key(0))
PROMPTS = ["a", "hello there", "the quick brown fox."]  # three lengths in one batch


def test_cached_logits_equal_the_full_forward_pass_at_every_position():
    rng = np.random.default_rng(0)
    lengths = np.array([1, 7, 16], np.int32)
    seqs = rng.integers(0, TOK.vocab_size, (3, 24)).astype(np.int32)
    window = np.where(np.arange(24) < lengths[:, None], seqs, 0)
    cache, last = prefill(MODEL, jnp.asarray(window), jnp.asarray(lengths))
    full = np.asarray(MODEL(jnp.asarray(seqs)))  # (B, 24, V)
    np.testing.assert_allclose(last[:, :TOK.vocab_size], full[np.arange(3), lengths - 1, :TOK.vocab_size],
                               atol=1e-5, rtol=1e-5)
    positions = lengths.copy()
    for _ in range(24 - 16):  # feed the rest of each sequence one token at a time
        logits, cache = forward(MODEL, jnp.asarray(seqs[np.arange(3), positions])[:, None],
                                jnp.asarray(positions)[:, None], cache)
        np.testing.assert_allclose(logits[:, 0, :TOK.vocab_size], full[np.arange(3), positions, :TOK.vocab_size],
                                   atol=1e-5, rtol=1e-5)
        positions += 1


def recompute(n, seed, temperature, top_p, top_k):
    """PROMPTS continued by `n` tokens through the path without a cache."""
    ids = [TOK.encode(p) for p in PROMPTS]
    tokens = np.zeros((len(ids), 32), np.int32)
    for b, e in enumerate(ids):
        tokens[b, :len(e)] = e
    counts = np.array([len(e) for e in ids], np.int32)
    out, _ = decode_recompute(MODEL, jnp.asarray(tokens), jnp.asarray(counts), n, 0, jax.random.key(seed),
                              temperature, top_p, top_k=top_k)
    return [TOK.decode(np.asarray(out)[b, :c + n]) for b, c in enumerate(counts)]


def test_greedy_tokens_equal_the_recompute_path_for_prompts_of_several_lengths():
    cached = generate(MODEL, TOK, PROMPTS, max_new_tokens=4, temperature=0.0)
    assert cached == recompute(4, seed=0, temperature=0.0, top_p=1.0, top_k=None)


def test_sampling_is_the_recompute_paths_within_the_window_and_top_p_zero_is_greedy():
    kw = dict(max_new_tokens=4, temperature=0.9, top_k=10, top_p=0.8, seed=5)
    assert generate(MODEL, TOK, PROMPTS, **kw) == recompute(4, seed=5, temperature=0.9, top_p=0.8, top_k=10)
    assert generate(MODEL, TOK, PROMPTS, 30, temperature=1.0, top_p=1e-9, seed=1) == \
        generate(MODEL, TOK, PROMPTS, 30, temperature=0.0)


def test_a_seed_gives_one_sample_whatever_the_calls_and_past_the_window():
    kw = dict(max_new_tokens=60, temperature=1.0, seed=7)  # 60 > block_size: the window slides
    first = generate(MODEL, TOK, PROMPTS, **kw)
    streamed = []
    assert generate(MODEL, TOK, PROMPTS, **kw, stream=streamed.append, chunk=5) == first
    assert [p + "".join(s[b] for s in streamed) for b, p in enumerate(PROMPTS)] == first
    assert generate(MODEL, TOK, PROMPTS, **kw) == first
    assert [len(t) for t in first] == [len(p) + 60 for p in PROMPTS]
    assert generate(MODEL, TOK, PROMPTS, **{**kw, "seed": 8}) != first


def test_padding_ids_are_never_sampled():
    text = generate(MODEL, TOK, "a", max_new_tokens=200, temperature=2.0, seed=0)
    assert set(text) <= set(TOK.chars)


@pytest.mark.parametrize("kw, message", [
    (dict(prompts=""), "a prompt is empty"),
    (dict(temperature=-1.0), "temperature=-1.0 must be >= 0"),
    (dict(top_k=0), "top_k=0 must be between 1"),
    (dict(top_p=0.0), "top_p=0.0 must be in"),
    (dict(prompts="A"), "not in the vocabulary"),
])
def test_bad_sampling_input_is_a_clear_error(kw, message):
    args = {"prompts": "a", **kw}
    with pytest.raises(DataError, match=message):
        generate(MODEL, TOK, args.pop("prompts"), 5, **args)


def test_empty_cache_shape():
    k, v = empty_cache(MODEL, 3)
    assert k.shape == v.shape == (2, 3, 24, 2, 16)
