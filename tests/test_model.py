import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parallel_gpt import attention
from parallel_gpt.attention_cpu import causal_attention_blocks
from parallel_gpt.model import GPT, GPTConfig, cross_entropy, pad_vocab

CFG = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.0).for_platform("cpu")


@pytest.fixture(scope="module")
def model():
    return GPT.create(CFG, key=jax.random.key(0))


def hand_count(c: GPTConfig) -> int:
    C, V, T, L = c.n_embd, c.vocab_size, c.block_size, c.n_layer
    per_block = (
        2 * 2 * C  # two LayerNorms, weight + bias
        + C * 3 * C + 3 * C  # fused qkv
        + C * C + C  # attention output projection
        + C * 4 * C + 4 * C  # MLP up
        + 4 * C * C + C  # MLP down
    )
    return V * C + T * C + L * per_block + 2 * C  # tied head: wte counted once; ln_f


def test_shapes_and_parameter_count(model):
    idx = jnp.zeros((3, 16), jnp.int32)
    assert model(idx).shape == (3, 16, 64)
    assert model(idx[:, :5]).shape == (3, 5, 64)
    assert model.num_params(non_embedding=False) == hand_count(CFG)
    assert model.num_params() == hand_count(CFG) - 16 * 32


def test_flops_per_token_hand_count(model):
    N = hand_count(CFG) - CFG.block_size * CFG.n_embd
    assert model.flops_per_token() == 6 * N + 12 * 2 * 16 * 32


def test_gpt2_small_flops_match_nanogpt():
    """nanoGPT's figures for GPT-2 small at block 1024 (vocabulary padded to 50304): it prints
    "number of parameters: 123.69M" (124,475,904 less the 786,432 position embeddings), and
    its estimate_mfu counts 6 * 123,689,472 + 12 * 12 * 1024 * 768 = 855,383,040 FLOPs per token."""
    c = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768).for_platform("gpu")
    m = jax.eval_shape(lambda: GPT.create(c, key=jax.random.key(0)))
    assert m.num_params() == 123_689_472
    assert m.flops_per_token() == 855_383_040


def test_causality(model):
    """Changing token t changes no logit at positions before t."""
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    base = model(idx)
    for t in (0, 5, 15):
        changed = model(idx.at[:, t].set((idx[:, t] + 1) % 64))
        np.testing.assert_array_equal(np.asarray(base[:, :t]), np.asarray(changed[:, :t]))
        assert not np.allclose(base[:, t:], changed[:, t:])


@pytest.mark.parametrize("T, block", [(10, 4), (12, 4), (3, 4), (70, 64)])
def test_causal_attention_blocks_match_dot_product_attention(T, block):
    # Query blocks of `block` rows, the last one shorter when T is not a multiple of it.
    q, k, v = jax.random.normal(jax.random.key(0), (3, 2, T, 3, 8))  # (B, T, nh, hs) each

    def value_and_grads(attention):
        return jax.jit(jax.value_and_grad(lambda *qkv: jnp.sum(jnp.sin(attention(*qkv))), (0, 1, 2)))(q, k, v)

    got = value_and_grads(lambda *qkv: causal_attention_blocks(*qkv, block=block))
    want = value_and_grads(lambda *qkv: jax.nn.dot_product_attention(*qkv, is_causal=True))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ln", ["explicit", "autodiff"])
def test_xla_attention_and_autodiff_layernorm_match_the_cpu_kernels(model, ln):
    # TPUs and float32 GPUs run XLA's dot_product_attention and JAX's own LayerNorm
    # derivative; CPUs run query blocks and the written-out LayerNorm backward. The whole
    # model gives the same loss and gradients with either (cuDNN needs a GPU).
    x, y = jax.random.randint(jax.random.key(2), (2, 2, 16), 0, 64)
    other = dataclasses.replace(CFG, attention="xla", layernorm_backward=ln)
    structure = jax.tree.structure(jax.eval_shape(lambda: GPT.create(other, key=jax.random.key(0))))
    other_model = jax.tree.unflatten(structure, jax.tree.leaves(model))  # the same weights

    def loss_and_grads(m):
        return jax.jit(jax.value_and_grad(lambda m: m.loss(x, y)))(m)

    assert other_model.h[0].attn.implementation == "xla"
    assert other_model.h[0].ln_1.explicit_backward == (ln == "explicit")
    for g, w in zip(jax.tree.leaves(loss_and_grads(other_model)), jax.tree.leaves(loss_and_grads(model))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting, platform, dtype, kernels", [
    ("auto", "cpu", jnp.float32, ("cpu_blocks", "explicit")),
    ("auto", "cpu", jnp.bfloat16, ("cpu_blocks", "explicit")),
    ("auto", "gpu", jnp.float32, ("xla", "autodiff")),
    ("auto", "gpu", jnp.bfloat16, ("cudnn", "autodiff")),
    ("auto", "tpu", jnp.bfloat16, ("xla", "autodiff")),
    ("xla", "cpu", jnp.float32, ("xla", "explicit")),
    ("cpu_blocks", "gpu", jnp.float32, ("cpu_blocks", "autodiff")),
])
def test_backend_settings_resolve_from_the_platform(setting, platform, dtype, kernels):
    c = GPTConfig(vocab_size=64, attention=setting).for_platform(platform, dtype)
    assert (c.attention, c.layernorm_backward) == kernels
    assert GPTConfig(vocab_size=64, layernorm_backward="autodiff").for_platform("cpu").layernorm_backward == "autodiff"


def test_backend_settings_that_cannot_run_say_what_to_change():
    with pytest.raises(ValueError, match="attention=cudnn needs NVIDIA GPUs, these devices are tpu"):
        GPTConfig(vocab_size=64, attention="cudnn").for_platform("tpu", jnp.bfloat16)
    with pytest.raises(ValueError, match="attention=cudnn takes 16-bit activations, not float32: use dtype=bfloat16"):
        GPTConfig(vocab_size=64, attention="cudnn").for_platform("gpu", jnp.float32)
    with pytest.raises(ValueError, match="attention='flash': use one of auto, xla, cudnn, cpu_blocks"):
        GPTConfig(attention="flash")
    with pytest.raises(ValueError, match=r"GPTConfig has attention='auto', layernorm_backward='auto', scan_layers='auto': .*for_platform"):
        GPT.create(GPTConfig(vocab_size=64), key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"GPTConfig has vocab_size=None"):
        GPT.create(GPTConfig().for_platform("cpu"), key=jax.random.key(0))
    assert attention.resolve("cudnn", "gpu", jnp.bfloat16) == "cudnn"


def test_gpt2_init(model):
    std = lambda x: float(jnp.std(x))  # noqa: E731
    assert abs(std(model.wte.weight) - 0.02) < 0.002
    assert abs(std(model.h[0].attn.c_attn.weight) - 0.02) < 0.002
    scaled = 0.02 / np.sqrt(2 * CFG.n_layer)
    assert abs(std(model.h[1].mlp.c_proj.weight) - scaled) < 0.1 * scaled
    assert abs(std(model.h[0].attn.c_proj.weight) - scaled) < 0.1 * scaled
    assert float(jnp.abs(model.h[0].attn.c_attn.bias).max()) == 0.0
    # Initial loss is about log(vocab): predictions start near uniform.
    idx, targets = jax.random.randint(jax.random.key(2), (2, 4, 16), 0, 64)
    assert abs(float(model.loss(idx, targets)) - np.log(64)) < 0.1


def test_head_is_tied_to_token_embedding(model):
    idx = jnp.arange(16)[None]
    grads = jax.grad(lambda m: m.loss(idx, idx))(model)
    vocab_by_width = [x for x in jax.tree.leaves(model) if x.shape == (model.config.vocab_size, model.config.n_embd)]
    assert len(vocab_by_width) == 1  # one (vocab, C) matrix: wte is the head too
    # Tokens never seen in the input still get gradient through the output head.
    assert float(jnp.abs(grads.wte.weight[40:]).sum()) > 0


def test_dropout_is_active_only_with_a_key():
    config = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=16, dropout=0.5).for_platform("cpu")
    m = GPT.create(config, key=jax.random.key(0))
    idx = jnp.arange(8)[None]
    np.testing.assert_array_equal(m(idx), m(idx))
    assert not np.allclose(m(idx, key=jax.random.key(1)), m(idx, key=jax.random.key(2)))


def test_cross_entropy_matches_numpy():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 5))
    targets = jnp.array([[0, 1, 2], [3, 4, 0]])
    lg = np.asarray(logits, np.float64)
    logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    expected = -np.mean(np.take_along_axis(logp, np.asarray(targets)[..., None], -1))
    assert abs(float(cross_entropy(logits, targets)) - expected) < 1e-6


def test_config_validation_and_vocab_padding():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    assert pad_vocab(65) == 128 and pad_vocab(64) == 64 and pad_vocab(50257) == 50304


def test_sequence_longer_than_block_size_is_rejected(model):
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(jnp.zeros((1, 17), jnp.int32))


def test_padding_ids_do_not_change_the_model():
    """A vocabulary of 50 padded to 64: the padded ids get -inf logits, and the loss and the
    probabilities of the 50 real ids are those of the same model without padding."""
    padded = GPTConfig(block_size=16, vocab_size=64, vocab_tokens=50, n_layer=1, n_head=2, n_embd=32,
                       dropout=0.0).for_platform("cpu")
    model = GPT.create(padded, key=jax.random.key(0))
    exact = dataclasses.replace(model, config=dataclasses.replace(padded, vocab_size=50, vocab_tokens=None),
                                wte=dataclasses.replace(model.wte, weight=model.wte.weight[:50]))
    idx = jax.random.randint(jax.random.key(1), (2, 16), 0, 50)
    logits = model(idx)
    assert bool(jnp.all(jnp.isneginf(logits[..., 50:])))
    np.testing.assert_allclose(jax.nn.softmax(logits)[..., :50], jax.nn.softmax(exact(idx)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(model.loss(idx, idx), exact.loss(idx, idx), rtol=1e-6)
    grads = jax.grad(lambda m: m.loss(idx, idx))(model)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
