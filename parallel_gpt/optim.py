"""AdamW written by hand: `adam_i` updates one leaf, `jax.tree.map` applies it to the model.

Contract of `adam_update(model, grads, state, hp, grad_norm=None, decays=None)`:
  * `grads` has the structure of `model` (float32 leaves); `state` is an `AdamState`
    from `adam_init(model)`; `hp` holds the hyperparameters (an `AdamHParams`).
  * The gradient is first clipped to a global L2 norm of `hp.grad_clip` (0 disables).
  * The learning rate of update t (t = state.count, counted from 0) is `lr_schedule(t, hp)`.
  * Moments use the bias-corrected Adam rule; weight decay is decoupled (AdamW:
    p -= lr * wd * p) and applies to the leaves `decays` marks True (a tree of bools of
    the model's structure; `GPT.decays`: matmul weights and embeddings, not biases or
    LayerNorm gains). Default: leaves with ndim >= 2.
  * `grad_norm`, when the caller has it already, is the global norm of `grads` (of every
    device's shards when the state is sharded: `sharding.StateLayout.grad_norm`).
  * Returns (new_model, new_state, lr): the learning rate used. Pure: it runs inside jit/pmap.

`guarded_update(model, grads, loss, state, hp)` is the same update, skipped when the loss
or the gradient norm is not finite; it is what the training step calls.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class AdamState(NamedTuple):
    count: jax.Array  # int32 scalar: number of updates applied so far
    mu: object  # first moments, same structure as the model
    nu: object  # second moments, same structure as the model


@dataclasses.dataclass(frozen=True)
class AdamHParams:
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    decay_lr: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def __post_init__(self):
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ValueError(f"learning_rate={self.learning_rate} must be > 0 and min_lr={self.min_lr} >= 0")
        if self.warmup_iters < 0 or self.lr_decay_iters < 1:
            raise ValueError(f"warmup_iters={self.warmup_iters} must be >= 0 "
                             f"and lr_decay_iters={self.lr_decay_iters} >= 1")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError(f"beta1={self.beta1} and beta2={self.beta2} must be in [0, 1)")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError(f"eps={self.eps} must be > 0, weight_decay={self.weight_decay} and "
                             f"grad_clip={self.grad_clip} >= 0 (grad_clip=0: no clipping)")


def adam_init(model) -> AdamState:
    """Zero moments for `model`'s leaves (arrays, or shapes: `jax.ShapeDtypeStruct`s)."""
    zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731
    return AdamState(jnp.zeros((), jnp.int32), jax.tree.map(zeros, model), jax.tree.map(zeros, model))


def lr_schedule(step, hp: AdamHParams):
    """Linear warmup from lr/warmup to lr over `warmup_iters` updates, then cosine decay to
    `min_lr` at `lr_decay_iters`, then constant `min_lr` (nanoGPT's get_lr)."""
    if not hp.decay_lr:
        return jnp.asarray(hp.learning_rate, jnp.float32)
    step = jnp.asarray(step, jnp.float32)
    warm = hp.learning_rate * (step + 1) / max(hp.warmup_iters, 1)
    progress = (step - hp.warmup_iters) / max(hp.lr_decay_iters - hp.warmup_iters, 1)
    cosine = 0.5 * (1.0 + jnp.cos(math.pi * jnp.clip(progress, 0.0, 1.0)))
    decayed = hp.min_lr + cosine * (hp.learning_rate - hp.min_lr)
    return jnp.where(step < hp.warmup_iters, warm, decayed)


def global_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)))


def adam_i(param, grad, mu, nu, i, *, lr, beta1, beta2, eps, weight_decay, decays=None):
    """One AdamW update of a single leaf at update index `i` (0-based); `decays`: whether
    weight decay applies (default: param.ndim >= 2)."""
    mu = beta1 * mu + (1 - beta1) * grad
    nu = beta2 * nu + (1 - beta2) * jnp.square(grad)
    t = (i + 1).astype(jnp.float32)
    mu_hat = mu / (1 - beta1**t)
    nu_hat = nu / (1 - beta2**t)
    decay = weight_decay if (param.ndim >= 2 if decays is None else decays) else 0.0
    param = param - lr * (mu_hat / (jnp.sqrt(nu_hat) + eps) + decay * param)
    return param, mu, nu


def adam_update(model, grads, state: AdamState, hp: AdamHParams, grad_norm=None, decays=None):
    if decays is None:
        decays = jax.tree.map(lambda p: p.ndim >= 2, model)
    if grad_norm is None:
        grad_norm = global_norm(grads)
    if hp.grad_clip > 0:
        scale = jnp.minimum(1.0, hp.grad_clip / (grad_norm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
    lr = lr_schedule(state.count, hp)
    update = functools.partial(
        adam_i, i=state.count, lr=lr, beta1=hp.beta1, beta2=hp.beta2, eps=hp.eps, weight_decay=hp.weight_decay
    )
    out = jax.tree.map(lambda p, g, m, v, d: update(p, g, m, v, decays=d), model, grads, state.mu, state.nu, decays)
    model, mu, nu = jax.tree.transpose(jax.tree.structure(model), jax.tree.structure((0, 0, 0)), out)
    return model, AdamState(state.count + 1, mu, nu), lr


def guarded_update(model, grads, loss, state: AdamState, hp: AdamHParams, grad_norm=None, decays=None):
    """`adam_update`, skipped when `loss` or the gradient norm is not finite.

    Returns (model, state, metrics): a skipped update returns model and state unchanged and
    metrics["nonfinite"] = 1; metrics also hold the loss, the gradient norm (before
    clipping) and the learning rate of this update.
    """
    if grad_norm is None:
        grad_norm = global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A conditional rather than a select between old and new state: the update then writes
    # into the donated buffers instead of keeping both copies alive.
    model, state, lr = lax.cond(
        finite,
        lambda: adam_update(model, grads, state, hp, grad_norm=grad_norm, decays=decays),
        lambda: (model, state, lr_schedule(state.count, hp)),
    )
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "nonfinite": (~finite).astype(jnp.int32)}
    return model, state, metrics
