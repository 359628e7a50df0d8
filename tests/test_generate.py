"""KV-cache generation against the recompute path, sampling rules, and determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_gpt.generate import (_prefill, decode, decode_recompute, decode_step, empty_cache, generate, prefill,
                                   sampling_mode)
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.errors import ConfigError, DataError
from parallel_gpt.tokenizers import CharTokenizer

TOK = CharTokenizer.from_text("abcdefghijklmnopqrstuvwxyz .\n")
CFG = GPTConfig(block_size=24, vocab_size=64, vocab_tokens=TOK.vocab_size, n_layer=2, n_head=2, n_embd=32,
                dropout=0.0).for_platform("cpu")
MODEL = GPT.create(CFG, key=jax.random.key(0))
PROMPTS = ["a", "hello there", "the quick brown fox."]  # three lengths in one batch; the longest is 20
# Cache blocks: 5 pads the 24-position window to 25 (5 blocks), 8 divides it (3 blocks), 128 is one block of 24.
KV_BLOCKS = [5, 8, 128]


@pytest.mark.parametrize("kv_block", KV_BLOCKS)
def test_cached_logits_equal_the_full_forward_pass_at_every_position(kv_block):
    rng = np.random.default_rng(0)
    lengths = np.array([1, 7, 16], np.int32)
    seqs = rng.integers(0, TOK.vocab_size, (3, 24)).astype(np.int32)
    window = np.where(np.arange(24) < lengths[:, None], seqs, 0)
    cache, last = prefill(MODEL, jnp.asarray(window), jnp.asarray(lengths), kv_block)
    full = np.asarray(MODEL(jnp.asarray(seqs)))  # (B, 24, V)
    np.testing.assert_allclose(last[:, :TOK.vocab_size], full[np.arange(3), lengths - 1, :TOK.vocab_size],
                               atol=1e-5, rtol=1e-5)
    positions = lengths.copy()
    for _ in range(24 - 16):  # feed the rest of each sequence one token at a time, up to the window's edge
        logits, cache = decode_step(MODEL, jnp.asarray(seqs[np.arange(3), positions]), jnp.asarray(positions),
                                    cache, kv_block)
        np.testing.assert_allclose(logits[:, :TOK.vocab_size], full[np.arange(3), positions, :TOK.vocab_size],
                                   atol=1e-5, rtol=1e-5)
        positions += 1
    assert positions.max() == CFG.block_size  # the last step wrote position 23


@pytest.mark.parametrize("lengths", [[1, 1, 1], [2, 1, 1], [3, 1, 2], [5, 8, 1], [9, 3, 16], [17, 2, 24]])
def test_each_prefill_bucket_and_the_step_after_it_equal_the_full_forward_pass(lengths):
    # The prefill computes the first power of two >= the longest prompt: 1, 2, 4, 8, 16, and the whole
    # 24-position window (32 clipped to it); at 24 the next position is the window's edge, not decoded.
    lengths = np.array(lengths, np.int32)
    seqs = np.random.default_rng(1).integers(0, TOK.vocab_size, (3, 24)).astype(np.int32)
    window = np.where(np.arange(24) < lengths[:, None], seqs, 0)
    cache, last = prefill(MODEL, jnp.asarray(window), jnp.asarray(lengths))
    full = np.asarray(MODEL(jnp.asarray(seqs)))[..., :TOK.vocab_size]  # (B, 24, V)
    np.testing.assert_allclose(last[:, :TOK.vocab_size], full[np.arange(3), lengths - 1], atol=1e-5, rtol=1e-5)
    at = np.minimum(lengths, 23)  # a full window (24) writes position 23 again, with the same key and value
    logits, _ = decode_step(MODEL, jnp.asarray(seqs[np.arange(3), at]), jnp.asarray(at), cache)
    np.testing.assert_allclose(logits[:, :TOK.vocab_size], full[np.arange(3), at], atol=1e-5, rtol=1e-5)


def test_bfloat16_weights_keep_a_bfloat16_cache_and_the_float32_logits_close():
    model = jax.tree.map(lambda a: a.astype(jnp.bfloat16), MODEL)  # what evaluate --dtype bfloat16 loads
    seqs = np.random.default_rng(0).integers(0, TOK.vocab_size, (3, 24)).astype(np.int32)
    lengths = np.array([1, 7, 16], np.int32)
    cache, last = prefill(model, jnp.asarray(seqs), jnp.asarray(lengths))
    assert {a.dtype for a in jax.tree.leaves(cache)} == {jnp.dtype(jnp.bfloat16)} and last.dtype == jnp.float32
    full = np.asarray(MODEL(jnp.asarray(seqs)))[..., :TOK.vocab_size]  # (B, 24, V) float32
    errors = [np.abs(last[:, :TOK.vocab_size] - full[np.arange(3), lengths - 1]).max()]
    positions = lengths.copy()
    for _ in range(24 - 16):
        logits, cache = decode_step(model, jnp.asarray(seqs[np.arange(3), positions]), jnp.asarray(positions), cache)
        errors.append(np.abs(logits[:, :TOK.vocab_size] - full[np.arange(3), positions]).max())
        positions += 1
    # bfloat16 keeps 8 significant bits (2**-8 = 0.4% per rounding) and these logits reach 0.6: measured 1.8e-3,
    # bounded at about four roundings of the largest logit.
    assert max(errors) < 1e-2, errors


def recompute(n, seed, temperature, top_p, top_k):
    """PROMPTS continued by `n` tokens through the path without a cache."""
    ids = [TOK.encode(p) for p in PROMPTS]
    tokens = np.zeros((len(ids), 32), np.int32)
    for b, e in enumerate(ids):
        tokens[b, :len(e)] = e
    counts = np.array([len(e) for e in ids], np.int32)
    out, _ = decode_recompute(MODEL, jnp.asarray(tokens), jnp.asarray(counts), n, 0, jax.random.key(seed),
                              temperature, top_p, **sampling_mode(temperature, top_k, top_p))
    return [TOK.decode(np.asarray(out)[b, :c + n]) for b, c in enumerate(counts)]


@pytest.mark.parametrize("kv_block", KV_BLOCKS)
def test_greedy_tokens_equal_the_recompute_path_for_prompts_of_several_lengths(kv_block):
    # 4 new tokens take the longest prompt (20) to the window's edge: the last is predicted at position 23.
    cached = generate(MODEL, TOK, PROMPTS, max_new_tokens=4, temperature=0.0, kv_block=kv_block)
    assert cached == recompute(4, seed=0, temperature=0.0, top_p=1.0, top_k=None)


@pytest.mark.parametrize("kv_block", KV_BLOCKS)
@pytest.mark.parametrize("top_k, top_p", [(None, 1.0), (10, 1.0), (None, 0.8), (10, 0.8)])
def test_sampling_is_the_recompute_paths_within_the_window(kv_block, top_k, top_p):
    kw = dict(max_new_tokens=4, temperature=0.9, top_k=top_k, top_p=top_p, seed=5)
    assert generate(MODEL, TOK, PROMPTS, **kw, kv_block=kv_block) == recompute(4, 5, 0.9, top_p, top_k)


def test_top_p_near_zero_and_top_k_one_are_greedy():
    greedy = generate(MODEL, TOK, PROMPTS, 30, temperature=0.0)
    assert generate(MODEL, TOK, PROMPTS, 30, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(MODEL, TOK, PROMPTS, 30, temperature=1.0, top_p=1e-9, seed=1) == greedy


@pytest.mark.parametrize("kv_block", [5, 128])
def test_a_seed_gives_one_sample_whatever_the_calls_and_past_the_window(kv_block):
    kw = dict(max_new_tokens=60, temperature=1.0, seed=7, kv_block=kv_block)  # 60 > block_size: the window slides
    first = generate(MODEL, TOK, PROMPTS, **kw)
    streamed = []
    assert generate(MODEL, TOK, PROMPTS, **kw, stream=streamed.append, chunk=5) == first
    assert [p + "".join(s[b] for s in streamed) for b, p in enumerate(PROMPTS)] == first
    assert generate(MODEL, TOK, PROMPTS, **kw) == first
    assert [len(t) for t in first] == [len(p) + 60 for p in PROMPTS]
    assert generate(MODEL, TOK, PROMPTS, **{**kw, "seed": 8}) != first


class IdsSeen:
    """TOK, except that decode records the ids it is given (any id, without raising) and returns a dot per id."""

    def __init__(self):
        self.ids = []

    def __getattr__(self, name):
        return getattr(TOK, name)

    def decode(self, ids):
        self.ids.extend(int(i) for i in ids)
        return "." * len(ids)


def test_padding_ids_are_never_sampled():
    # Ids 29..63 pad the vocabulary to 64; at temperature 2 the flattened distribution would draw them if their
    # logits were finite. 200 tokens after a 1-token prompt slide the 24-position window 15 times.
    tok = IdsSeen()
    generate(MODEL, tok, "a", max_new_tokens=200, temperature=2.0, seed=0)
    assert len(tok.ids) == 1 + 200
    assert max(tok.ids) < TOK.vocab_size < CFG.vocab_size


@pytest.mark.parametrize("kw, error, message", [
    (dict(prompts=""), DataError, "a prompt is empty"),
    (dict(temperature=-1.0), ConfigError, "temperature=-1.0 must be >= 0"),
    (dict(top_k=0), ConfigError, "top_k=0 must be between 1"),
    (dict(top_p=0.0), ConfigError, "top_p=0.0 must be in"),
    (dict(prompts="A"), DataError, "not in the vocabulary"),
])
def test_bad_sampling_input_is_a_clear_error(kw, error, message):
    args = {"prompts": "a", **kw}
    with pytest.raises(error, match=message):
        generate(MODEL, TOK, args.pop("prompts"), 5, **args)


def test_empty_cache_shape():
    keys, values = empty_cache(MODEL, 3)
    assert [k.shape for k in keys] == [v.shape for v in values] == [(3, 2, 24, 16)] * 2
    assert empty_cache(MODEL, 3, kv_block=5)[0][0].shape == (3, 2, 25, 16)  # whole blocks of 5


def test_a_different_max_new_tokens_in_the_same_bucket_does_not_compile_again():
    kw = dict(temperature=0.7, top_k=5, seed=3)
    decode.clear_cache()  # whatever other tests compiled
    _prefill.clear_cache()
    generate(MODEL, TOK, PROMPTS, max_new_tokens=40, **kw)  # tokens buffer: 20 + 40 -> 64
    compiled = decode._cache_size(), _prefill._cache_size()
    generate(MODEL, TOK, PROMPTS, max_new_tokens=33, **{**kw, "temperature": 1.3, "seed": 4})  # 53 -> 64
    generate(MODEL, TOK, ["ab", "c", "d"], max_new_tokens=50, **kw)  # 52 -> 64; prompts of 2: a new prefill
    assert decode._cache_size() == compiled[0] == 1
    assert _prefill._cache_size() == compiled[1] + 1
