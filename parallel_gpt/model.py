"""GPT in the minGPT layout: GPTConfig, CausalSelfAttention, MLP, Block, GPT.

Pre-LayerNorm blocks, learned position embeddings, an output head tied to the token
embedding and GPT-2 initialisation: N(0, 0.02) everywhere, with the two projections that
write into the residual stream scaled by 1/sqrt(2 * n_layer).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from parallel_gpt import attention, nn


LAYERNORM_BACKWARD = ("auto", "explicit", "autodiff")


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """The model: its shape, and the backend choices it computes with.

    Defaults are the model of nanoGPT's shakespeare_char run. `vocab_size` is the
    tokenizer's vocabulary padded with `pad_vocab`; None until a tokenizer sets it.
    `vocab_tokens` is the tokenizer's own count: the logits of the padding ids above it are
    -inf, so padding never changes the model's distribution (None: no padding ids). The
    backend settings may be "auto": `for_platform` resolves them for the devices the model
    runs on, and a model is built from a resolved config.
    """

    block_size: int = 256
    vocab_size: int | None = None
    vocab_tokens: int | None = None
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.2
    bias: bool = True
    layer_norm_eps: float = 1e-5
    remat: bool = False  # recompute each block's activations in the backward pass (saves memory)
    attention: str = "auto"  # see attention.SETTINGS
    layernorm_backward: str = "auto"  # "explicit" (nn.layer_norm's written-out pass) or "autodiff"

    def __post_init__(self):
        for name in ("block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size={self.vocab_size} must be a positive integer")
        if self.vocab_tokens is not None and not 1 <= self.vocab_tokens <= (self.vocab_size or self.vocab_tokens):
            raise ValueError(f"vocab_tokens={self.vocab_tokens} must be between 1 and vocab_size={self.vocab_size}")
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps={self.layer_norm_eps} must be > 0")
        if self.n_embd % self.n_head:
            lower = self.n_embd // self.n_head * self.n_head
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: "
                             f"use n_embd={lower or self.n_head} or {lower + self.n_head}, or another n_head")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.attention not in attention.SETTINGS:
            raise ValueError(f"attention={self.attention!r}: use one of {', '.join(attention.SETTINGS)}")
        if self.layernorm_backward not in LAYERNORM_BACKWARD:
            raise ValueError(f"layernorm_backward={self.layernorm_backward!r}: "
                             f"use one of {', '.join(LAYERNORM_BACKWARD)}")

    def for_platform(self, platform: str, dtype=jnp.float32) -> "GPTConfig":
        """This config with its "auto" settings chosen for `platform` ("cpu", "gpu", "tpu")
        devices computing activations in `dtype`. ValueError for a choice that cannot run there.

        LayerNorm's written-out backward pass is measured faster on CPUs only (README,
        Performance), so "auto" gives accelerators JAX's own derivative of the same forward pass.
        """
        ln = self.layernorm_backward
        return dataclasses.replace(
            self, attention=attention.resolve(self.attention, platform, dtype),
            layernorm_backward=("explicit" if platform == "cpu" else "autodiff") if ln == "auto" else ln)


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round a vocabulary size up so the output head's matmul has friendly shapes."""
    return -(-n // multiple) * multiple


def _layer_norm(config: GPTConfig) -> nn.LayerNorm:
    explicit = config.layernorm_backward == "explicit"
    return nn.LayerNorm.create(config.n_embd, bias=config.bias, eps=config.layer_norm_eps, explicit_backward=explicit)


def _split(key, n):
    return [None] * n if key is None else list(jax.random.split(key, n))


class CausalSelfAttention(nn.Module):
    c_attn: nn.Linear  # one fused projection to q, k, v
    c_proj: nn.Linear
    resid_drop: nn.Dropout
    n_head: int = nn.static()
    implementation: str = nn.static()  # a resolved `attention` setting

    @classmethod
    def create(cls, config: GPTConfig, *, key):
        k_attn, k_proj = jax.random.split(key)
        C = config.n_embd
        return cls(
            nn.Linear.create(C, 3 * C, bias=config.bias, key=k_attn),
            nn.Linear.create(C, C, bias=config.bias, std=0.02 / math.sqrt(2 * config.n_layer), key=k_proj),
            nn.Dropout(config.dropout),
            config.n_head,
            config.attention,
        )

    def __call__(self, x, *, key=None):
        # Dropout is applied to the attention output, not to the attention weights, so that
        # fused kernels (cuDNN flash attention) serve training too.
        return self.resid_drop(self.with_kv(x)[0], key=key)

    def qkv(self, x):
        """Queries, keys and values (..., T, nh, hs) each for x (..., T, C)."""
        *lead, T, C = x.shape
        qkv = self.c_attn(x).reshape(*lead, T, 3, self.n_head, C // self.n_head)  # (..., T, 3, nh, hs)
        return qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]

    def with_kv(self, x):
        """The output (B, T, C) before dropout, and the keys and values (B, T, nh, hs) it
        attended to: sampling's prefill keeps them as its cache."""
        B, T, C = x.shape
        q, k, v = self.qkv(x)  # (B, T, nh, hs) each
        y = attention.causal_attention(q, k, v, self.implementation)  # (B, T, nh, hs)
        return self.c_proj(y.reshape(B, T, C)), k, v  # (B, T, nh, hs) -> (B, T, C)


class MLP(nn.Module):
    c_fc: nn.Linear
    c_proj: nn.Linear
    drop: nn.Dropout

    @classmethod
    def create(cls, config: GPTConfig, *, key):
        k_fc, k_proj = jax.random.split(key)
        C = config.n_embd
        return cls(
            nn.Linear.create(C, 4 * C, bias=config.bias, key=k_fc),
            nn.Linear.create(4 * C, C, bias=config.bias, std=0.02 / math.sqrt(2 * config.n_layer), key=k_proj),
            nn.Dropout(config.dropout),
        )

    def __call__(self, x, *, key=None):
        return self.drop(self.c_proj(nn.gelu(self.c_fc(x))), key=key)  # (B, T, C)


class Block(nn.Module):
    ln_1: nn.LayerNorm
    attn: CausalSelfAttention
    ln_2: nn.LayerNorm
    mlp: MLP

    @classmethod
    def create(cls, config: GPTConfig, *, key):
        k_attn, k_mlp = jax.random.split(key)
        return cls(
            _layer_norm(config),
            CausalSelfAttention.create(config, key=k_attn),
            _layer_norm(config),
            MLP.create(config, key=k_mlp),
        )

    def __call__(self, x, *, key=None):
        k_attn, k_mlp = _split(key, 2)
        x = x + self.attn(self.ln_1(x), key=k_attn)
        return x + self.mlp(self.ln_2(x), key=k_mlp)


class GPT(nn.Module):
    wte: nn.Embedding  # (vocab_size, n_embd), also the output head
    wpe: nn.Embedding  # (block_size, n_embd)
    drop: nn.Dropout
    h: tuple[Block, ...]
    ln_f: nn.LayerNorm
    config: GPTConfig = nn.static()

    @classmethod
    def create(cls, config: GPTConfig, *, key):
        settings = {"vocab_size": config.vocab_size, "attention": config.attention,
                    "layernorm_backward": config.layernorm_backward}
        unresolved = [f"{k}={v!r}" for k, v in settings.items() if v in (None, "auto")]
        if unresolved:
            raise ValueError(f"GPTConfig has {', '.join(unresolved)}: set vocab_size and build the model from "
                             f"config.for_platform(platform, dtype)")
        k_wte, k_wpe, *k_blocks = jax.random.split(key, 2 + config.n_layer)
        return cls(
            nn.Embedding.create(config.vocab_size, config.n_embd, key=k_wte),
            nn.Embedding.create(config.block_size, config.n_embd, key=k_wpe),
            nn.Dropout(config.dropout),
            tuple(Block.create(config, key=k) for k in k_blocks),
            _layer_norm(config),
            config,
        )

    @classmethod
    def shapes(cls, config: GPTConfig) -> "GPT":
        """The model's tree with shapes and dtypes only (`jax.eval_shape`): a template to
        load arrays into, with nothing initialised."""
        return jax.eval_shape(lambda: cls.create(config, key=jax.random.key(0)))

    def __call__(self, idx, *, key=None, dtype=jnp.float32):
        """Logits (B, T, vocab_size) for token ids (B, T).

        `key` enables dropout (training); `dtype` is the activation dtype: weights stay
        float32 and are cast where they are used, the logits are float32.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        k_drop, *k_blocks = _split(key, 1 + len(self.h))
        x = self.wte(idx) + self.wpe.weight[None, :T]  # (B, T, C)
        x = self.drop(x.astype(dtype), key=k_drop)
        for block, k in zip(self.h, k_blocks):
            x = jax.checkpoint(Block.__call__)(block, x, key=k) if self.config.remat else block(x, key=k)
        return self.head(x)

    def head(self, x):
        """Float32 logits (..., vocab_size) for the last block's output x (..., C)."""
        logits = self.wte.attend(self.ln_f(x)).astype(jnp.float32)  # (B, T, vocab_size)
        n = self.config.vocab_tokens
        if n is not None and n < self.config.vocab_size:  # padding ids are never predicted
            logits = jnp.where(jnp.arange(self.config.vocab_size) < n, logits, -jnp.inf)
        return logits

    def loss(self, idx, targets, *, key=None, dtype=jnp.float32):
        """Mean cross-entropy of next-token prediction over all B * T positions."""
        logits = self(idx, key=key, dtype=dtype)
        return cross_entropy(logits, targets)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; by default without position embeddings (as nanoGPT counts).

        The token embedding counts once: it is also the output head.
        """
        n = sum(x.size for x in jax.tree.leaves(self))
        return n - self.wpe.weight.size if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token: 6N for the matmuls with weights (forward + backward)
        plus 12 * L * T * C for attention scores and values (nanoGPT's estimate_mfu)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.block_size * c.n_embd


def cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, T, V)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
