"""Causal attention for CPUs: query blocks, with a written-out backward pass.

Chosen by `attention=cpu_blocks` (what `auto` picks on CPUs; see attention.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def causal_attention_blocks(q, k, v, block: int = 64):
    """Causal softmax attention, (B, T, nh, hs) -> (B, T, nh, hs), in blocks of `block` queries.

    Query block i attends only to keys 0 .. (i + 1) * block - 1: the score blocks wholly
    above the diagonal are never computed (a quarter of the work at T = 128, three eighths
    at T = 256), and XLA:CPU runs the smaller products faster per FLOP. The backward pass
    is written out so that every product has the (m, k) @ (k, n) layout XLA:CPU is fastest
    at (transposing the (T, hs) operands, not the (T, T) ones). `benchmarks/attention.py`
    measures it against the other kernels; README, Performance, has the figures.
    """
    return _attention_fwd(q, k, v, block)[0]


def _query_blocks(T: int, block: int):
    return [(start, min(start + block, T)) for start in range(0, T, block)]


def _attention_fwd(q, k, v, block):
    T, hs = q.shape[1], q.shape[-1]
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))  # (B, nh, T, hs) each
    kT = jnp.swapaxes(k, 2, 3)  # (B, nh, hs, T)
    probs, ys = [], []
    for start, end in _query_blocks(T, block):
        s = jnp.einsum("bhqd,bhdk->bhqk", q[:, :, start:end], kT[..., :end]) * hs**-0.5  # (B, nh, end - start, end)
        causal = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        s = jnp.where(causal[None, None], s.astype(jnp.float32), -jnp.inf)  # the diagonal keeps every row finite
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        probs.append(p)
        ys.append(jnp.einsum("bhqk,bhkd->bhqd", p, v[:, :, :end]))  # (B, nh, end - start, hs)
    y = jnp.swapaxes(jnp.concatenate(ys, axis=2), 1, 2)  # (B, T, nh, hs)
    return y, (q, k, v, tuple(probs))


def _attention_bwd(block, residuals, dy):
    q, k, v, probs = residuals  # (B, nh, T, hs) each, and each block's probabilities
    B, nh, T, hs = q.shape
    scale = hs**-0.5
    dy = jnp.swapaxes(dy, 1, 2)  # (B, T, nh, hs) -> (B, nh, T, hs)
    dyT, qT, vT = (jnp.swapaxes(a, 2, 3) for a in (dy, q, v))  # (B, nh, hs, T) each
    dq = []
    dkT = jnp.zeros((B, nh, hs, T), jnp.float32)
    dvT = jnp.zeros((B, nh, hs, T), jnp.float32)
    for (start, end), p in zip(_query_blocks(T, block), probs):
        dp = jnp.einsum("bhqd,bhdk->bhqk", dy[:, :, start:end], vT[..., :end], preferred_element_type=jnp.float32)
        ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))  # softmax backward; masked p are 0
        ds = ds.astype(q.dtype)  # (B, nh, end - start, end)
        dq.append(jnp.einsum("bhqk,bhkd->bhqd", ds, k[:, :, :end]) * scale)
        dkT = dkT.at[..., :end].add(jnp.einsum("bhdq,bhqk->bhdk", qT[..., start:end], ds) * scale)
        dvT = dvT.at[..., :end].add(jnp.einsum("bhdq,bhqk->bhdk", dyT[..., start:end], p))
    dq = jnp.swapaxes(jnp.concatenate(dq, axis=2), 1, 2)  # (B, T, nh, hs)
    dk, dv = (jnp.transpose(a, (0, 3, 1, 2)).astype(q.dtype) for a in (dkT, dvT))  # (B, nh, hs, T) -> (B, T, nh, hs)
    return dq, dk, dv


causal_attention_blocks.defvjp(_attention_fwd, _attention_bwd)
