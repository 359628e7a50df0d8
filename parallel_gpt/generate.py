"""Sampling with a KV cache: a prefill of the prompts, then cached decoding.

`generate(model, tokenizer, prompts, ...)` continues a batch of prompts of different
lengths. `prefill` runs the model once over the prompts (right-padded to the first power
of two that holds the longest) through the training attention kernel and keeps each
layer's keys and values: the cache, one (batch, heads, T, head size) array per layer for
keys and one for values, T being block_size rounded up to whole blocks of `kv_block`
positions. `decode` then samples `n` tokens in a `lax.fori_loop`, each step computing one
position per row: it writes that position's key and value into the layer's array in place
(a scatter on a loop-carried buffer; no copy of the cache) and attends over the filled
blocks only, `max(position) // kv_block + 1` of them, with an online softmax. A step thus
reads every weight once plus the cache up to the furthest row, as it must. The cache has the
weights' dtype (bfloat16 weights: half the bytes), the softmax's sums are float32.

At block_size. When a row's next position would be block_size, every row is prefilled
again from the last half window of its tokens (block_size // 2) and decoding goes on:
the model never sees more than block_size tokens, as in training, and `max_new_tokens`
may exceed it. Sampling: greedy (temperature 0 or top_k 1), temperature, top-k and top-p
(nucleus); the work a mode does not need (sorting, random draws) is not compiled in.

Compilations: `prefill` once per power-of-two prompt length, `decode` once per sampling
mode and token-buffer bucket (a power of two >= prompt + new tokens), so requests that
differ only in `max_new_tokens`, temperature or seed within a bucket reuse the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parallel_gpt.model import GPT
from parallel_gpt.errors import ConfigError, DataError

KV_BLOCK = 128  # cache positions attended per inner step: at most 127 read past the furthest row


def _pow2(n: int) -> int:
    return 1 << (int(n) - 1).bit_length()


def empty_cache(model: GPT, batch: int, kv_block: int = KV_BLOCK):
    """(keys, values): a tuple of (B, nh, T, hs) zeros per layer each, in the weights' dtype, T =
    block_size rounded up to whole blocks of min(kv_block, block_size)."""
    c = model.config
    block = min(kv_block, c.block_size)
    shape = (batch, c.n_head, -(-c.block_size // block) * block, c.n_embd // c.n_head)
    dtype = model.wte.weight.dtype
    return tuple(tuple(jnp.zeros(shape, dtype) for _ in range(c.n_layer)) for _ in range(2))


def prefill(model: GPT, window, lengths, kv_block: int = KV_BLOCK):
    """Cache and next-token logits (B, V) for prompts window[b, :lengths[b]] (B, t), t <=
    block_size. Only the first power of two >= the longest prompt is computed (one compile
    per power of two), and the head only at each row's last prompt position."""
    t = min(window.shape[1], _pow2(np.max(lengths)))
    return _prefill(model, window[:, :t], lengths, kv_block=kv_block)


@functools.partial(jax.jit, static_argnames=("kv_block",))
def _prefill(model: GPT, window, lengths, *, kv_block):
    B, t = window.shape
    keys, values = empty_cache(model, B, kv_block)
    x = model.wte(window) + model.wpe.weight[None, :t]  # (B, t, C)
    new_k, new_v = [], []
    for block, k_cache, v_cache in zip(model.h, keys, values):
        y, k, v = block.attn.with_kv(block.ln_1(x))  # k, v: (B, t, nh, hs)
        x = x + y
        x = x + block.mlp(block.ln_2(x))
        new_k.append(lax.dynamic_update_slice(k_cache, jnp.swapaxes(k, 1, 2), (0, 0, 0, 0)))  # (B, nh, T, hs)
        new_v.append(lax.dynamic_update_slice(v_cache, jnp.swapaxes(v, 1, 2), (0, 0, 0, 0)))
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, C)
    return (tuple(new_k), tuple(new_v)), model.head(last)  # (B, V)


def _attend_blocks(q, k_cache, v_cache, positions, kv_block: int):
    """Attention (B, nh, hs) of one query per row q (B, nh, hs) to cache positions 0 ..
    positions[b], reading blocks of kv_block positions up to the furthest row's, with an
    online softmax (running max, normaliser and weighted sum per head, all float32)."""
    B, nh, hs = q.shape
    q = q * hs**-0.5

    def block(j, carry):
        m, norm, acc = carry  # (B, nh), (B, nh), (B, nh, hs)
        k = lax.dynamic_slice_in_dim(k_cache, j * kv_block, kv_block, axis=2)  # (B, nh, kv_block, hs)
        v = lax.dynamic_slice_in_dim(v_cache, j * kv_block, kv_block, axis=2)
        s = jnp.einsum("bhd,bhkd->bhk", q, k, preferred_element_type=jnp.float32)  # (B, nh, kv_block)
        visible = j * kv_block + jnp.arange(kv_block)[None, None, :] <= positions[:, None, None]  # (B, 1, kv_block)
        s = jnp.where(visible, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))  # finite: block 0 holds position 0 of every row
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        acc = acc * scale[..., None] + jnp.einsum("bhk,bhkd->bhd", p.astype(v.dtype), v,
                                                  preferred_element_type=jnp.float32)
        return m_new, norm * scale + p.sum(-1), acc

    init = (jnp.full((B, nh), -jnp.inf), jnp.zeros((B, nh)), jnp.zeros((B, nh, hs)))
    _, norm, acc = lax.fori_loop(0, jnp.max(positions) // kv_block + 1, block, init)
    return (acc / norm[..., None]).astype(q.dtype)


def decode_step(model: GPT, ids, positions, cache, kv_block: int = KV_BLOCK):
    """Logits (B, V) for one token per row, ids (B,) at `positions` (B,), and the cache
    with their keys and values written; `cache` holds each row's earlier positions."""
    B = ids.shape[0]
    write = jax.vmap(lambda c, new, at: lax.dynamic_update_slice(c, new, (0, at, 0)))  # one position per row
    x = model.wte(ids) + model.wpe(positions)  # (B, C)
    keys, values = [], []
    for block, k_cache, v_cache in zip(model.h, *cache):
        q, k, v = block.attn.qkv(block.ln_1(x)[:, None])  # (B, 1, nh, hs) each
        k_cache = write(k_cache, jnp.swapaxes(k, 1, 2).astype(k_cache.dtype), positions)  # (B, nh, T, hs)
        v_cache = write(v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), positions)
        y = _attend_blocks(q[:, 0], k_cache, v_cache, positions, min(kv_block, k_cache.shape[2]))  # (B, nh, hs)
        x = x + block.attn.c_proj(y.reshape(B, -1))  # (B, C)
        x = x + block.mlp(block.ln_2(x))
        keys.append(k_cache)
        values.append(v_cache)
    return model.head(x), (tuple(keys), tuple(values))


def pick(logits, key, temperature, top_p, *, top_k: int | None, nucleus: bool):
    """Next ids (B,) from logits (B, V). top_k 1 is greedy (the caller maps temperature 0
    to it); otherwise sampled at `temperature` from the top_k ids (all when None) and, when
    `nucleus`, from the smallest set of them holding top_p of the mass. Only the top_k
    candidates are sorted (lax.top_k), the whole vocabulary only for nucleus without top_k."""
    if top_k == 1:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    ids = None
    if top_k is not None or nucleus:
        logits, ids = lax.top_k(logits, top_k or logits.shape[-1])  # (B, k), largest first
    scaled = logits / temperature
    if nucleus:
        probs = jax.nn.softmax(scaled, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the larger candidates; the first is kept
        scaled = jnp.where(before < top_p, scaled, -jnp.inf)
    choice = jax.random.categorical(key, scaled, axis=-1)  # (B,)
    return (choice if ids is None else jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]).astype(jnp.int32)


def sampling_mode(temperature: float, top_k: int | None, top_p: float) -> dict:
    """The static part of the sampling arguments: what `pick` compiles."""
    greedy = temperature == 0 or top_k == 1
    return {"top_k": 1 if greedy else top_k, "nucleus": not greedy and top_p < 1}


@functools.partial(jax.jit, static_argnames=("top_k", "nucleus", "kv_block"), donate_argnums=(1, 3))
def decode(model: GPT, cache, logits, tokens, counts, positions, n, offset, key, temperature, top_p, *,
           top_k, nucleus, kv_block=KV_BLOCK):
    """`n` sampled tokens per row (traced: any count, one compile). Row b's tokens so far
    are tokens[b, :counts[b]] (B, N), of which the cache holds the last positions[b];
    `logits` (B, V) predict each row's next token. Token `offset + i` of the sample draws
    with fold_in(key, offset + i), so the result does not depend on how calls split it.
    Returns (cache, logits, tokens, counts, positions) after the n tokens."""

    def step(i, carry):
        cache, logits, tokens, counts, positions = carry
        next_id = pick(logits, jax.random.fold_in(key, offset + i), temperature, top_p, top_k=top_k, nucleus=nucleus)
        tokens = jax.vmap(lambda row, tok, at: row.at[at].set(tok))(tokens, next_id, counts)
        new_logits, cache = decode_step(model, next_id, positions, cache, kv_block)
        return cache, new_logits, tokens, counts + 1, positions + 1

    return lax.fori_loop(0, n, step, (cache, logits, tokens, counts, positions))


def _windows(tokens: np.ndarray, counts: np.ndarray, keep: np.ndarray, T: int):
    """(B, T) windows holding each row's last keep[b] tokens, left-aligned."""
    window = np.zeros((len(tokens), T), np.int32)
    for b, (n, k) in enumerate(zip(counts, keep)):
        window[b, :k] = tokens[b, n - k:n]
    return window


def generate(model: GPT, tokenizer, prompts, max_new_tokens: int = 500, temperature: float = 0.8,
             top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stream=None, chunk: int = 32,
             kv_block: int = KV_BLOCK):
    """Each prompt followed by `max_new_tokens` sampled tokens, decoded with `tokenizer`:
    a string for a string, a list for a list. temperature 0 is greedy. `stream(texts)`, if
    given, receives each row's newly decoded text every `chunk` tokens. `kv_block`: cache
    positions attended per inner step (module docstring)."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts or any(not p for p in prompts):
        raise DataError("a prompt is empty: pass at least one character, e.g. --prompt 'ROMEO:'")
    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and not 1 <= top_k <= tokenizer.vocab_size:
        raise ConfigError(f"top_k={top_k} must be between 1 and the vocabulary size {tokenizer.vocab_size}")
    if not 0 < top_p <= 1:
        raise ConfigError(f"top_p={top_p} must be in (0, 1]")
    model = model.unstack_layers()  # the cache is a tuple per layer
    T = model.config.block_size
    encoded = [np.asarray(tokenizer.encode(p), np.int32) for p in prompts]
    counts = np.array([len(e) for e in encoded], np.int32)
    tokens = np.zeros((len(prompts), _pow2(counts.max() + max_new_tokens)), np.int32)  # one compile per bucket
    for b, e in enumerate(encoded):
        tokens[b, :len(e)] = e
    keep = np.minimum(counts, T)  # a prompt longer than the window keeps its last block_size tokens
    cache, logits = prefill(model, jnp.asarray(_windows(tokens, counts, keep, T)), jnp.asarray(keep), kv_block)
    mode = sampling_mode(temperature, top_k, top_p)
    state = (jnp.asarray(tokens), jnp.asarray(counts), jnp.asarray(keep))
    key, done = jax.random.key(seed), 0
    while done < max_new_tokens:
        room = T - int(state[2].max())
        if room == 0:  # a row's window is full: every row goes on from its last half window
            so_far, counts_now = np.asarray(state[0]), np.asarray(state[1])
            keep = np.minimum(counts_now, T // 2)
            cache, logits = prefill(model, jnp.asarray(_windows(so_far, counts_now, keep, T)), jnp.asarray(keep),
                                    kv_block)
            state = (state[0], state[1], jnp.asarray(keep))
            continue
        n = min(max_new_tokens - done, room, chunk if stream else max_new_tokens)
        cache, logits, *state = decode(model, cache, logits, *state, n, done, key, temperature, top_p, **mode,
                                       kv_block=kv_block)
        if stream:
            new = np.asarray(state[0])
            stream([tokenizer.decode(new[b, c - n:c]) for b, c in enumerate(np.asarray(state[1]))])
        done += n
    tokens = np.asarray(state[0])
    texts = [tokenizer.decode(tokens[b, :c + max_new_tokens]) for b, c in enumerate(counts)]  # prompt lengths
    return texts[0] if single else texts


@functools.partial(jax.jit, static_argnames=("top_k", "nucleus"), donate_argnums=(1,))
def decode_recompute(model: GPT, tokens, counts, n, offset, key, temperature, top_p, *, top_k, nucleus):
    """The path without a cache, for comparison (benchmarks/generate.py, the tests): each
    token runs the model over the window of the row's last block_size tokens. Within
    block_size it samples exactly what `decode` does. tokens (B, N) with N >= block_size."""
    T = model.config.block_size

    def step(i, carry):
        tokens, counts = carry
        start = jnp.maximum(counts - T, 0)  # (B,)
        window = jax.vmap(lambda row, s: lax.dynamic_slice(row, (s,), (T,)))(tokens, start)  # (B, T)
        logits = jnp.take_along_axis(model(window), (counts - 1 - start)[:, None, None], axis=1)[:, 0]  # (B, V)
        next_id = pick(logits, jax.random.fold_in(key, offset + i), temperature, top_p, top_k=top_k, nucleus=nucleus)
        tokens = jax.vmap(lambda row, tok, at: row.at[at].set(tok))(tokens, next_id, counts)
        return tokens, counts + 1

    return lax.fori_loop(0, n, step, (tokens, counts))
