import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from parallel_gpt import nn, parallel
from parallel_gpt.errors import LayoutError
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.optim import AdamHParams, adam_init

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0).for_platform("cpu")
HP = AdamHParams(learning_rate=3e-3, min_lr=3e-4, warmup_iters=3, lr_decay_iters=20)


def batches(n_steps, batch=16, seed=0):
    """Random tokens with a learnable target: y = (3x + 1) mod 64."""
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        x = rng.integers(0, 64, (batch, CFG.block_size)).astype(np.int32)
        yield x, (3 * x + 1) % 64


def run(n_devices, n_steps=20, config=CFG, hp=HP, data=None, **kw):
    mesh = parallel.make_mesh(n_devices)
    dp = parallel.DataParallel(mesh, hp=hp, **kw)
    state = dp.place(GPT.create(config, key=jax.random.key(0)))
    losses = []
    for x, y in data if data is not None else batches(n_steps):
        state, metrics = dp.step(state, *dp.batch(x, y))
        losses.append(float(metrics["loss"]))
    return state.model, state.opt, np.array(losses), mesh


def test_one_device_and_eight_devices_agree():
    """Same seed, dropout 0, same global batch: same losses and the same final parameters."""
    m1, o1, l1, _ = run(1)
    m8, o8, l8, _ = run(8)
    assert np.max(np.abs(l1 - l8) / l1) <= 1e-5
    assert l1[-1] < l1[0]
    for a, b in zip(jax.tree.leaves((m1, o1)), jax.tree.leaves((m8, o8))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_state_stays_replicated_one_array_per_leaf():
    model, opt, _, mesh = run(8, n_steps=2)
    replicated = NamedSharding(mesh, P())
    template = GPT.create(CFG, key=jax.random.key(0))
    for leaf, ref in zip(jax.tree.leaves((model, opt)), jax.tree.leaves((template, adam_init(template)))):
        assert leaf.shape == ref.shape  # no stacked (n_devices, ...) replicas
        assert leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
        assert len(leaf.addressable_shards) == 8


def test_batches_are_split_over_the_device_axis():
    mesh = parallel.make_mesh(8)
    x = parallel.shard_batch(np.arange(16 * 4, dtype=np.int32).reshape(16, 4), mesh)
    assert x.shape == (8, 2, 4)
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, P(parallel.AXIS)), 3)
    np.testing.assert_array_equal(np.asarray(x.addressable_shards[3].data)[0], np.arange(24, 32).reshape(2, 4))


def test_overfitting_one_batch_drives_the_loss_near_zero():
    x, y = next(batches(1, batch=8))
    hp = AdamHParams(learning_rate=1e-2, min_lr=1e-2, warmup_iters=0, weight_decay=0.0)
    _, _, losses, _ = run(8, config=CFG, hp=hp, data=[(x, y)] * 150)
    assert losses[0] > 3.5 and losses[-1] < 0.05


def test_gradient_accumulation_equals_one_big_batch():
    m1, _, l1, _ = run(2, n_steps=5)
    m4, _, l4, _ = run(2, n_steps=5, grad_accum=4)
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    # Adam divides by sqrt(v): float-rounding differences in near-zero gradients show up at
    # ~1e-6 in parameters of size ~1e-2.
    for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_dropout_masks_differ_per_device_and_replay_per_update():
    drop, ones = nn.Dropout(0.5), jnp.ones((64,))

    def masks(count):  # each device's mask for update `count`, stacked: (8, 64)
        return np.asarray(jax.pmap(lambda _: drop(ones, key=parallel.dropout_key(7, count)), axis_name=parallel.AXIS)(
            jnp.arange(8)))

    first = masks(3)
    assert len({m.tobytes() for m in first}) == 8  # every device draws its own mask
    np.testing.assert_array_equal(masks(3), first)  # the same update draws the same masks again
    assert not np.array_equal(masks(4)[0], first[0])  # the next update draws new ones


def test_dropout_training_stays_finite():
    cfg = dataclasses.replace(CFG, dropout=0.1)
    _, _, l8, _ = run(8, n_steps=5, config=cfg)
    _, _, plain, _ = run(8, n_steps=5)
    assert np.all(np.isfinite(l8)) and not np.allclose(l8[1:], plain[1:])


def test_nonfinite_gradient_skips_the_update():
    dp = parallel.DataParallel(parallel.make_mesh(8), hp=HP)
    model = GPT.create(CFG, key=jax.random.key(0))
    bad = dataclasses.replace(model, ln_f=dataclasses.replace(model.ln_f, weight=model.ln_f.weight.at[0].set(jnp.nan)))
    state = dp.place(bad)
    before = [np.asarray(a) for a in jax.tree.leaves(state)]
    new, metrics = dp.step(state, *dp.batch(*next(batches(1))))
    assert int(metrics["nonfinite"]) == 1 and int(new.opt.count) == 0
    for a, b in zip(before, jax.tree.leaves(new)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_a_stop_request_comes_back_in_the_metrics():
    dp = parallel.DataParallel(parallel.make_mesh(8), hp=HP)
    state = dp.place(GPT.create(CFG, key=jax.random.key(0)))
    state, metrics = dp.step(state, *dp.batch(*next(batches(1))))
    assert int(metrics["stop"]) == 0
    _, metrics = dp.step(state, *dp.batch(*next(batches(1))), signum=15)
    assert int(metrics["stop"]) == 15


def test_layout_errors_say_what_to_change():
    with pytest.raises(LayoutError, match=r"batch_size=30 is not divisible by the 8 devices: use 24 or 32"):
        parallel.make_layout(30)
    with pytest.raises(LayoutError, match=r"grad_accum=3 does not divide the per-device batch 4 "):
        parallel.make_layout(32, grad_accum=3)
    assert parallel.make_layout(32, grad_accum=4, devices=2).size == 2
    with pytest.raises(LayoutError, match=r"devices=9 but this process has 8 cpu device\(s\)"):
        parallel.make_mesh(9)


def test_bfloat16_activations_train_close_to_float32():
    _, _, l32, _ = run(2, n_steps=10)
    m16, o16, l16, _ = run(2, n_steps=10, dtype=jnp.bfloat16)
    assert np.all(np.isfinite(l16)) and l16[-1] < l16[0]
    np.testing.assert_allclose(l16, l32, rtol=0.02)
    # Master weights and optimizer state stay float32.
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves((m16, o16)))


def test_remat_gives_the_same_step():
    remat = dataclasses.replace(CFG, remat=True)
    _, _, plain, _ = run(2, n_steps=3)
    _, _, again, _ = run(2, n_steps=3, config=remat)
    np.testing.assert_allclose(plain, again, rtol=1e-6)
