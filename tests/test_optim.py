import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_gpt.optim import AdamHParams, AdamState, adam_init, adam_update, global_norm, lr_schedule

HP = AdamHParams(learning_rate=1e-2, min_lr=1e-3, warmup_iters=10, lr_decay_iters=110, beta1=0.9, beta2=0.99,
                 eps=1e-8, weight_decay=0.1, grad_clip=1.0)


def test_adamw_step_matches_hand_computation():
    params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": jnp.array([0.1, -0.2])}
    grads = {"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "b": jnp.array([0.05, -0.05])}
    state = adam_init(params)
    # Two updates, so the second uses non-zero moments and t = 2 bias correction.
    new, state, lr = adam_update(params, grads, state, HP)
    new, state, lr = adam_update(new, grads, state, HP)

    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    g = {k: np.asarray(v, np.float64) for k, v in grads.items()}
    norm = math.sqrt(sum((x**2).sum() for x in g.values()))
    scale = min(1.0, HP.grad_clip / (norm + 1e-6))
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t in (1, 2):
        lr = HP.learning_rate * t / HP.warmup_iters  # warmup: lr * (step + 1) / warmup
        for k in p:
            gk = g[k] * scale
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.99 * v[k] + 0.01 * gk**2
            update = (m[k] / (1 - 0.9**t)) / (np.sqrt(v[k] / (1 - 0.99**t)) + 1e-8)
            decay = HP.weight_decay if p[k].ndim >= 2 else 0.0  # biases are not decayed
            p[k] = p[k] - lr * (update + decay * p[k])
    for k in p:
        np.testing.assert_allclose(np.asarray(new[k]), p[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(state.mu[k]), m[k], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(state.nu[k]), v[k], rtol=1e-5)
    assert state.count.dtype == jnp.int32 and int(state.count) == 2
    assert abs(float(global_norm(grads)) - norm) < 1e-6 and float(lr) == pytest.approx(2 * HP.learning_rate / 10)


def test_clipping_bounds_the_update_direction():
    params = {"w": jnp.ones((2, 2))}
    big = {"w": jnp.full((2, 2), 100.0)}
    hp = AdamHParams(grad_clip=1.0, weight_decay=0.0)
    _, state, _ = adam_update(params, big, adam_init(params), hp)
    assert float(global_norm(big)) == pytest.approx(200.0)
    assert float(global_norm(state.mu)) == pytest.approx(0.1 * 1.0, rel=1e-5)  # (1 - beta1) * clipped grad


def test_schedule_warmup_then_cosine_to_min_lr():
    lr = lambda s: float(lr_schedule(s, HP))  # noqa: E731
    assert lr(0) == pytest.approx(1e-3)  # 1/10 of the peak at the first update
    assert lr(9) == pytest.approx(1e-2)
    assert lr(10) == pytest.approx(1e-2)
    assert lr(60) == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3))  # halfway through the cosine
    assert lr(110) == pytest.approx(1e-3)
    assert lr(10_000) == pytest.approx(1e-3)
    values = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert float(lr_schedule(500, AdamHParams(decay_lr=False, learning_rate=3e-4))) == pytest.approx(3e-4)


def test_state_is_a_pytree_with_int32_count():
    state = adam_init({"w": jnp.ones((3,))})
    assert isinstance(state, AdamState)
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 3 and state.count.dtype == jnp.int32
    jitted = jax.jit(lambda p, g, s: adam_update(p, g, s, HP))
    _, s2, _ = jitted({"w": jnp.ones((3,))}, {"w": jnp.ones((3,))}, state)
    assert int(s2.count) == 1
