import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_gpt import nn


def test_modules_are_frozen_pytrees_with_static_hyperparameters():
    ln = nn.LayerNorm.create(4)
    leaves, treedef = jax.tree.flatten(ln)
    assert len(leaves) == 2  # weight and bias; eps lives in the tree structure
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert isinstance(rebuilt, nn.LayerNorm) and rebuilt.eps == ln.eps
    with pytest.raises(dataclasses.FrozenInstanceError):
        ln.eps = 1.0
    assert nn.LayerNorm(ln.weight, ln.bias, eps=1e-3) != ln
    assert jax.tree.structure(nn.LayerNorm(ln.weight, ln.bias, eps=1e-3)) != treedef
    assert jax.tree.leaves(nn.Dropout(0.5)) == []


def test_linear_matches_a_plain_matmul_and_has_optional_bias():
    k = jax.random.key(0)
    lin = nn.Linear.create(3, 5, key=k)
    assert lin.weight.shape == (3, 5) and lin.bias.shape == (5,)
    x = jax.random.normal(jax.random.key(1), (2, 4, 3))
    np.testing.assert_allclose(lin(x), x @ lin.weight + lin.bias[None, None], rtol=1e-6)
    assert nn.Linear.create(3, 5, bias=False, key=k).bias is None
    assert jax.tree.leaves(nn.Linear.create(3, 5, bias=False, key=k))[0].shape == (3, 5)


def test_embedding_lookup_and_tied_projection():
    emb = nn.Embedding.create(10, 4, key=jax.random.key(0))
    ids = jnp.array([[1, 2], [9, 0]])
    np.testing.assert_array_equal(emb(ids), emb.weight[ids])
    h = jax.random.normal(jax.random.key(1), (2, 2, 4))
    np.testing.assert_allclose(emb.attend(h), h @ emb.weight.T, rtol=1e-6)


def test_layernorm_normalises_the_last_axis():
    ln = nn.LayerNorm.create(8)
    x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (4, 8))
    y = ln(x)
    np.testing.assert_allclose(y.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1.0, atol=1e-3)
    assert ln(x.astype(jnp.bfloat16)).dtype == jnp.bfloat16


@pytest.mark.parametrize("explicit_backward", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layernorm_gradients_match_autodiff_of_the_formula(bias, dtype, explicit_backward):
    k_x, k_w, k_b, k_dy = jax.random.split(jax.random.key(0), 4)
    x = (1.0 + 3.0 * jax.random.normal(k_x, (2, 5, 16))).astype(dtype)
    weight = 1.0 + 0.1 * jax.random.normal(k_w, (16,))
    b = 0.1 * jax.random.normal(k_b, (16,)) if bias else None
    probe = jax.random.normal(k_dy, x.shape)  # a loss that weighs every output differently

    def reference(x, weight, b):  # the textbook formula, differentiated by JAX
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        y = (xf - mean) / jnp.sqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + 1e-5) * weight[None, None]
        return (y if b is None else y + b[None, None]).astype(x.dtype)

    def loss(f):
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * probe), (0, 1, 2))(x, weight, b)

    layer_norm = lambda x, w, b: nn.LayerNorm(w, b, explicit_backward=explicit_backward)(x)  # noqa: E731
    (got, got_grads), (want, want_grads) = loss(layer_norm), loss(reference)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, want, rtol=tol)
    assert got_grads[0].dtype == dtype and (got_grads[2] is None) == (not bias)
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_dropout_is_real_and_keyed():
    drop = nn.Dropout(0.25)
    x = jnp.ones((200, 200))
    np.testing.assert_array_equal(drop(x), x)  # no key: evaluation, identity
    y = drop(x, key=jax.random.key(0))
    kept = np.asarray(y != 0)
    assert abs(kept.mean() - 0.75) < 0.01
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)  # inverted scaling keeps the mean
    np.testing.assert_array_equal(y, drop(x, key=jax.random.key(0)))
    assert not np.array_equal(y, drop(x, key=jax.random.key(1)))
    np.testing.assert_array_equal(nn.Dropout(0.0)(x, key=jax.random.key(0)), x)


def test_gelu_is_the_tanh_form():
    x = jnp.linspace(-5, 5, 101)
    np.testing.assert_allclose(nn.gelu(x), jax.nn.gelu(x, approximate=True), rtol=1e-6, atol=1e-7)
