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
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from parallel_gpt import attention, nn


LAYERNORM_BACKWARD = ("auto", "explicit", "autodiff")
# What each block keeps for the backward pass: "none" all its activations, "full" only its
# input (everything else is recomputed), "dots" the outputs of its matmuls with the weights
# (`jax.checkpoint_policies.dots_with_no_batch_dims_saveable`: the attention scores and the
# elementwise work are recomputed). true / false, the setting's values before, mean full / none.
REMAT = ("none", "full", "dots")
_REMAT_ALIASES = {True: "full", False: "none", "true": "full", "false": "none"}
# The name of a block's parameters gathered from fully sharded state (`GPT.__call__`'s
# `gather`): never kept for the backward pass, which gathers them again.
GATHERED = "gathered_params"


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
    remat: str = "none"  # see REMAT: what each block keeps for the backward pass
    # Blocks stacked on a leading layer axis and run by lax.scan (see GPT): true, false, or auto
    # (`for_platform`: false on CPUs, true on accelerators).
    scan_layers: str | bool = "auto"
    attention: str = "auto"  # see attention.SETTINGS
    layernorm_backward: str = "auto"  # "explicit" (nn.layer_norm's written-out pass) or "autodiff"

    def __post_init__(self):
        object.__setattr__(self, "remat", _REMAT_ALIASES.get(self.remat, self.remat))
        if self.remat not in REMAT:
            raise ValueError(f"remat={self.remat!r}: use one of {', '.join(REMAT)} (or true for full)")
        object.__setattr__(self, "scan_layers", {"true": True, "false": False}.get(self.scan_layers, self.scan_layers))
        if self.scan_layers not in (True, False, "auto"):
            raise ValueError(f"scan_layers={self.scan_layers!r}: use true, false or auto")
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
        Layers are scanned on accelerators, where compiling one block instead of n_layer
        saves minutes, and unrolled on CPUs, where a scanned step measured 1.09-1.33x slower
        (README, Sharded state and scanned layers).
        """
        ln, scan = self.layernorm_backward, self.scan_layers
        return dataclasses.replace(
            self, attention=attention.resolve(self.attention, platform, dtype),
            layernorm_backward=("explicit" if platform == "cpu" else "autodiff") if ln == "auto" else ln,
            scan_layers=platform != "cpu" if scan == "auto" else scan)


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
    """The model. Its blocks are held one of two ways (`config.scan_layers`): a tuple of
    `n_layer` Blocks run one after another, or one Block whose every leaf has a leading
    layer axis (n_layer, ...), run by `lax.scan`: one compiled block whatever the depth.
    Both draw the same weights from the same key and compute the same function;
    checkpoints, Hugging Face conversion and sampling see the tuple (`unstack_layers`)."""

    wte: nn.Embedding  # (vocab_size, n_embd), also the output head
    wpe: nn.Embedding  # (block_size, n_embd)
    drop: nn.Dropout
    h: tuple[Block, ...] | Block  # a Block of stacked (n_layer, ...) leaves when config.scan_layers
    ln_f: nn.LayerNorm
    config: GPTConfig = nn.static()

    @classmethod
    def create(cls, config: GPTConfig, *, key):
        settings = {"vocab_size": config.vocab_size, "attention": config.attention,
                    "layernorm_backward": config.layernorm_backward, "scan_layers": config.scan_layers}
        unresolved = [f"{k}={v!r}" for k, v in settings.items() if v in (None, "auto")]
        if unresolved:
            raise ValueError(f"GPTConfig has {', '.join(unresolved)}: set vocab_size and build the model from "
                             f"config.for_platform(platform, dtype)")
        keys = jax.random.split(key, 2 + config.n_layer)
        block = lambda k: Block.create(config, key=k)  # noqa: E731
        return cls(
            nn.Embedding.create(config.vocab_size, config.n_embd, key=keys[0]),
            nn.Embedding.create(config.block_size, config.n_embd, key=keys[1]),
            nn.Dropout(config.dropout),
            jax.vmap(block)(keys[2:]) if config.scan_layers else tuple(block(k) for k in keys[2:]),
            _layer_norm(config),
            config,
        )

    @classmethod
    def shapes(cls, config: GPTConfig) -> "GPT":
        """The model's tree as checkpoints hold it (blocks as a tuple, whatever
        `config.scan_layers`) with shapes and dtypes only (`jax.eval_shape`): a template to
        load arrays into, with nothing initialised."""
        config = dataclasses.replace(config, scan_layers=False)
        return jax.eval_shape(lambda: cls.create(config, key=jax.random.key(0)))

    def unstack_layers(self) -> "GPT":
        """This model with its blocks as a tuple (config.scan_layers False): the same arrays
        sliced, on the host when they are numpy arrays. The moments of AdamW (`optim.AdamState`),
        trees of the model's structure, unstack alike."""
        if not self.config.scan_layers:
            return self
        blocks = tuple(jax.tree.map(lambda a: a[i], self.h) for i in range(self.config.n_layer))
        return dataclasses.replace(self, h=blocks, config=dataclasses.replace(self.config, scan_layers=False))

    def stack_layers(self) -> "GPT":
        """This model with its blocks stacked (config.scan_layers True); numpy arrays stay on the host."""
        if self.config.scan_layers:
            return self
        stack = lambda *a: (np.stack if isinstance(a[0], np.ndarray) else jnp.stack)(a)  # noqa: E731
        return dataclasses.replace(self, h=jax.tree.map(stack, *self.h),
                                   config=dataclasses.replace(self.config, scan_layers=True))

    def decays(self) -> "GPT":
        """For each leaf, whether AdamW decays it: matmul weights and embeddings, whose shape
        in one layer has two dimensions, not biases or LayerNorm gains. Python bools, from
        the logical shapes (a sharded leaf's shard says nothing)."""
        mask = jax.tree.map(lambda a: len(a.shape) >= 2, self)
        if self.config.scan_layers:  # the layer axis is not a dimension of the weight
            mask = dataclasses.replace(mask, h=jax.tree.map(lambda a: len(a.shape) >= 3, self.h))
        return mask

    def __call__(self, idx, *, key=None, dtype=jnp.float32, gather=None):
        """Logits (B, T, vocab_size) for token ids (B, T).

        `key` enables dropout (training); `dtype` is the activation dtype: weights stay
        float32 and are cast where they are used, the logits are float32.
        `gather(module, name)`, for fully sharded state (`sharding.StateLayout`), returns the
        whole parameters of the module named `name` ("wte", "wpe+ln_f" for the two together,
        or "h" for one block) from this device's shards of them; each block's are gathered
        just before it runs, so that one block's whole weights exist at a time.
        """
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size={self.config.block_size}")
        model = self
        if gather is not None:
            # Every collective must depend on the one before it by data: XLA:CPU gives all
            # collectives of a program one rendezvous key and runs the scan over the blocks
            # (its gathers) while a collective it does not depend on runs (measured: a crash).
            # ln_f, needed only by the head, shares wpe's all-gather: x depends on wpe and the
            # blocks on x, and in the backward pass their one reduce-scatter waits for wpe's
            # gradient, which comes after the blocks'.
            wpe, ln_f = gather((self.wpe, self.ln_f), "wpe+ln_f")
            model = dataclasses.replace(self, wte=gather(self.wte, "wte"), wpe=wpe, ln_f=ln_f)
        keys = jax.random.split(key, 1 + self.config.n_layer) if key is not None else None
        x = model.wte(idx) + model.wpe.weight[None, :T]  # (B, T, C)
        x = model.drop(x.astype(dtype), key=None if keys is None else keys[0])
        x = model.blocks(x, None if keys is None else keys[1:], gather)
        return model.head(x)

    def blocks(self, x, keys=None, gather=None):
        """x (B, T, C) through every block; keys (n_layer,) for dropout or None. Each block is
        one `jax.checkpoint`ed function when `config.remat` or `gather` asks for it."""
        def run(block, x, key):
            if gather is not None:
                block = jax.tree.map(lambda a: checkpoint_name(a, GATHERED), gather(block, "h"))
            return block(x, key=key)

        policy = _remat_policy(self.config.remat, gathered=gather is not None)
        if policy is not None:
            # Inside a scan, JAX's advice: CSE across iterations is not a risk there.
            run = jax.checkpoint(run, policy=policy, prevent_cse=not self.config.scan_layers)
        if self.config.scan_layers:
            x, _ = lax.scan(lambda x, layer: (run(layer[0], x, layer[1]), None), x, (self.h, keys))
            return x
        for i, block in enumerate(self.h):
            x = run(block, x, None if keys is None else keys[i])
        return x

    def head(self, x):
        """Float32 logits (..., vocab_size) for the last block's output x (..., C)."""
        logits = self.wte.attend(self.ln_f(x)).astype(jnp.float32)  # (B, T, vocab_size)
        n = self.config.vocab_tokens
        if n is not None and n < self.config.vocab_size:  # padding ids are never predicted
            logits = jnp.where(jnp.arange(self.config.vocab_size) < n, logits, -jnp.inf)
        return logits

    def loss(self, idx, targets, *, key=None, dtype=jnp.float32, gather=None):
        """Mean cross-entropy of next-token prediction over all B * T positions."""
        logits = self(idx, key=key, dtype=dtype, gather=gather)
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


def _remat_policy(remat: str, gathered: bool):
    """The `jax.checkpoint` policy of one block, or None for no checkpoint at all. Gathered
    parameters are never saved: the backward pass gathers them again, as FSDP does."""
    if remat == "full":
        return jax.checkpoint_policies.nothing_saveable
    if remat == "dots":
        return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    return jax.checkpoint_policies.save_anything_except_these_names(GATHERED) if gathered else None


def cross_entropy(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # (B, T, V)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()
