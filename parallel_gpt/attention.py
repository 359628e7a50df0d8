"""Causal self-attention kernels and the `attention` setting that chooses one.

| setting      | kernel                                                        | `auto` picks it for          |
|--------------|---------------------------------------------------------------|------------------------------|
| `xla`        | `jax.nn.dot_product_attention`, XLA's implementation           | TPUs; GPUs at float32        |
| `cudnn`      | the same call with cuDNN's flash attention (16-bit inputs only) | GPUs at bfloat16             |
| `cpu_blocks` | `attention_cpu.causal_attention_blocks` (query blocks)          | CPUs                         |

`auto` is resolved once, from the platform of the mesh's devices and the activation dtype
(`GPTConfig.for_platform`); the model itself never looks at global state to choose.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from parallel_gpt.attention_cpu import causal_attention_blocks

SETTINGS = ("auto", "xla", "cudnn", "cpu_blocks")


def resolve(setting: str, platform: str, dtype) -> str:
    """The kernel for `setting` on `platform` ("cpu", "gpu", "tpu") devices computing in `dtype`.

    Raises ValueError, saying what to change, for a kernel that cannot run there."""
    sixteen_bit = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
    if setting == "auto":
        if platform == "cpu":
            return "cpu_blocks"
        return "cudnn" if platform == "gpu" and sixteen_bit else "xla"
    if setting == "cudnn" and platform != "gpu":
        raise ValueError(f"attention=cudnn needs NVIDIA GPUs, these devices are {platform}: use attention=auto")
    if setting == "cudnn" and not sixteen_bit:
        raise ValueError(f"attention=cudnn takes 16-bit activations, not {jnp.dtype(dtype).name}: "
                         f"use dtype=bfloat16, or attention=xla")
    return setting


def causal_attention(q, k, v, implementation: str):
    """Causal softmax attention, (B, T, nh, hs) -> (B, T, nh, hs), with a resolved kernel."""
    if implementation == "cpu_blocks":
        return causal_attention_blocks(q, k, v)
    if implementation in ("xla", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    raise ValueError(f"attention={implementation!r} is not a kernel: resolve the config with "
                     f"GPTConfig.for_platform (or choose one of {', '.join(SETTINGS[1:])}) before building the model")
