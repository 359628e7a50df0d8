"""Sampling with a KV cache: a prefill of the prompts, then cached decoding.

`generate(model, tokenizer, prompts, ...)` continues a batch of prompts of different
lengths. `prefill` runs the model once over the prompts (right-padded to the first power
of two that holds the longest) and fills a static cache of keys and values, (layers,
batch, block_size, heads, head size) each; `decode` then samples `n` tokens in a `lax.fori_loop`, each step computing
one position per row, writing its key and value with `lax.dynamic_update_slice` at that
row's own position and attending to the cache through an explicit mask of the positions
up to it. (`dot_product_attention(is_causal=True)` aligns its mask top-left, which is
wrong for one query against a longer cache.)

At block_size. When a row's next position would be block_size, every row is prefilled
again from the last half window of its tokens (block_size // 2) and decoding goes on:
the model never sees more than block_size tokens, as in training, and `max_new_tokens`
may exceed it. Sampling: greedy (temperature 0), temperature, top-k and top-p (nucleus).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from parallel_gpt.model import GPT
from parallel_gpt.tokenizers import DataError


def _attend(block_attn, x, k_cache, v_cache, positions):
    """One attention layer over the cache. x: (B, t, C) at absolute `positions` (B, t);
    returns the output (B, t, C) and the caches with this chunk's keys and values written."""
    B, t, C = x.shape
    nh = block_attn.n_head
    hs = C // nh
    qkv = block_attn.c_attn(x).reshape(B, t, 3, nh, hs)  # (B, t, 3, nh, hs)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, t, nh, hs) each
    write = jax.vmap(lambda cache, new, start: lax.dynamic_update_slice(cache, new, (start, 0, 0)))
    k_cache = write(k_cache, k.astype(k_cache.dtype), positions[:, 0])  # (B, T, nh, hs)
    v_cache = write(v_cache, v.astype(v_cache.dtype), positions[:, 0])
    T = k_cache.shape[1]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_cache) / jnp.sqrt(jnp.float32(hs)).astype(q.dtype)  # (B, nh, t, T)
    visible = jnp.arange(T)[None, None, None, :] <= positions[:, None, :, None]  # (B, 1, t, T)
    scores = jnp.where(visible, scores.astype(jnp.float32), -jnp.inf)
    y = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype), v_cache)  # (B, t, nh, hs)
    return block_attn.c_proj(y.reshape(B, t, C)), k_cache, v_cache


def forward(model: GPT, idx, positions, cache):
    """Logits (B, t, V) for tokens idx (B, t) at absolute `positions` (B, t), each row's
    positions consecutive; `cache` = (keys, values), each (L, B, T, nh, hs), is read for
    earlier positions and returned with these written."""
    keys, values = cache
    x = model.wte(idx) + model.wpe(positions)  # (B, t, C)
    new_k, new_v = [], []
    for i, block in enumerate(model.h):
        y, k, v = _attend(block.attn, block.ln_1(x), keys[i], values[i], positions)
        x = x + y
        x = x + block.mlp(block.ln_2(x))
        new_k.append(k)
        new_v.append(v)
    return model.head(x), (jnp.stack(new_k), jnp.stack(new_v))


def empty_cache(model: GPT, batch: int):
    c = model.config
    shape = (c.n_layer, batch, c.block_size, c.n_head, c.n_embd // c.n_head)
    return jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)


def prefill(model: GPT, window, lengths):
    """Cache and next-token logits (B, V) for prompts window[b, :lengths[b]] (B, t), t <=
    block_size. Only the first power of two >= the longest prompt is computed (one compile
    per power of two)."""
    t = min(window.shape[1], 1 << (int(np.max(lengths)) - 1).bit_length())
    return _prefill(model, window[:, :t], lengths)


@jax.jit
def _prefill(model: GPT, window, lengths):
    B, t = window.shape
    positions = jnp.broadcast_to(jnp.arange(t), (B, t))
    logits, cache = forward(model, window, positions, empty_cache(model, B))
    return cache, jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]  # (B, V)


def pick(logits, key, temperature, top_k: int | None, top_p):
    """Next ids (B,) from logits (B, V): greedy when temperature is 0, else sampled at
    `temperature` from the top_k ids and the smallest set of ids holding top_p of the mass."""
    if top_k is not None:
        kth = lax.top_k(logits, top_k)[0][:, -1:]  # (B, 1)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    probs = jax.nn.softmax(scaled, axis=-1)
    sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]  # (B, V), largest first
    before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of the larger ids
    cutoff = jnp.min(jnp.where(before < top_p, sorted_probs, jnp.inf), axis=-1, keepdims=True)  # keeps the largest
    scaled = jnp.where(probs < cutoff, -jnp.inf, scaled)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature > 0, sampled, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("top_k",), donate_argnums=(1, 3))
def decode(model: GPT, cache, logits, tokens, counts, positions, n, offset, key, temperature, top_p, *, top_k):
    """`n` sampled tokens per row (traced: any count, one compile). Row b's tokens so far
    are tokens[b, :counts[b]] (B, N), of which the cache holds the last positions[b];
    `logits` (B, V) predict each row's next token. Token `offset + i` of the sample draws
    with fold_in(key, offset + i), so the result does not depend on how calls split it.
    Returns (cache, logits, tokens, counts, positions) after the n tokens."""

    def step(i, carry):
        cache, logits, tokens, counts, positions = carry
        next_id = pick(logits, jax.random.fold_in(key, offset + i), temperature, top_k, top_p)  # (B,)
        tokens = jax.vmap(lambda row, tok, at: row.at[at].set(tok))(tokens, next_id, counts)
        new_logits, cache = forward(model, next_id[:, None], positions[:, None], cache)
        return cache, new_logits[:, 0], tokens, counts + 1, positions + 1

    return lax.fori_loop(0, n, step, (cache, logits, tokens, counts, positions))


def _windows(tokens: np.ndarray, counts: np.ndarray, keep: np.ndarray, T: int):
    """(B, T) windows holding each row's last keep[b] tokens, left-aligned."""
    window = np.zeros((len(tokens), T), np.int32)
    for b, (n, k) in enumerate(zip(counts, keep)):
        window[b, :k] = tokens[b, n - k:n]
    return window


def generate(model: GPT, tokenizer, prompts, max_new_tokens: int = 500, temperature: float = 0.8,
             top_k: int | None = None, top_p: float = 1.0, seed: int = 0, stream=None, chunk: int = 32):
    """Each prompt followed by `max_new_tokens` sampled tokens, decoded with `tokenizer`:
    a string for a string, a list for a list. temperature 0 is greedy. `stream(texts)`, if
    given, receives each row's newly decoded text every `chunk` tokens."""
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts or any(not p for p in prompts):
        raise DataError("a prompt is empty: pass at least one character, e.g. --prompt 'ROMEO:'")
    if temperature < 0:
        raise DataError(f"temperature={temperature} must be >= 0 (0: greedy)")
    if top_k is not None and not 1 <= top_k <= tokenizer.vocab_size:
        raise DataError(f"top_k={top_k} must be between 1 and the vocabulary size {tokenizer.vocab_size}")
    if not 0 < top_p <= 1:
        raise DataError(f"top_p={top_p} must be in (0, 1]")
    T = model.config.block_size
    encoded = [np.asarray(tokenizer.encode(p), np.int32) for p in prompts]
    counts = np.array([len(e) for e in encoded], np.int32)
    tokens = np.zeros((len(prompts), counts.max() + max_new_tokens), np.int32)
    for b, e in enumerate(encoded):
        tokens[b, :len(e)] = e
    keep = np.minimum(counts, T)  # a prompt longer than the window keeps its last block_size tokens
    cache, logits = prefill(model, jnp.asarray(_windows(tokens, counts, keep, T)), jnp.asarray(keep))
    state = (jnp.asarray(tokens), jnp.asarray(counts), jnp.asarray(keep))
    key, done = jax.random.key(seed), 0
    while done < max_new_tokens:
        room = T - int(state[2].max())
        if room == 0:  # a row's window is full: every row goes on from its last half window
            so_far, counts_now = np.asarray(state[0]), np.asarray(state[1])
            keep = np.minimum(counts_now, T // 2)
            cache, logits = prefill(model, jnp.asarray(_windows(so_far, counts_now, keep, T)), jnp.asarray(keep))
            state = (state[0], state[1], jnp.asarray(keep))
            continue
        n = min(max_new_tokens - done, room, chunk if stream else max_new_tokens)
        cache, logits, *state = decode(model, cache, logits, *state, n, done, key, temperature, top_p, top_k=top_k)
        if stream:
            new = np.asarray(state[0])
            stream([tokenizer.decode(new[b, c - n:c]) for b, c in enumerate(np.asarray(state[1]))])
        done += n
    tokens = np.asarray(state[0])
    texts = [tokenizer.decode(tokens[b, :c + max_new_tokens]) for b, c in enumerate(counts)]  # prompt lengths
    return texts[0] if single else texts


@functools.partial(jax.jit, static_argnames=("top_k",), donate_argnums=(1,))
def decode_recompute(model: GPT, tokens, counts, n, offset, key, temperature, top_p, *, top_k):
    """The path without a cache, for comparison (benchmarks/generate.py, the tests): each
    token runs the model over the window of the row's last block_size tokens. Within
    block_size it samples exactly what `decode` does. tokens (B, N) with N >= block_size."""
    T = model.config.block_size

    def step(i, carry):
        tokens, counts = carry
        start = jnp.maximum(counts - T, 0)  # (B,)
        window = jax.vmap(lambda row, s: lax.dynamic_slice(row, (s,), (T,)))(tokens, start)  # (B, T)
        logits = jnp.take_along_axis(model(window), (counts - 1 - start)[:, None, None], axis=1)[:, 0]  # (B, V)
        next_id = pick(logits, jax.random.fold_in(key, offset + i), temperature, top_k, top_p)
        tokens = jax.vmap(lambda row, tok, at: row.at[at].set(tok))(tokens, next_id, counts)
        return tokens, counts + 1

    return lax.fori_loop(0, n, step, (tokens, counts))
