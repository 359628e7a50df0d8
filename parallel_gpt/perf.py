"""Peak FLOP/s and model FLOPs utilisation (MFU).

MFU = model FLOPs per token x tokens per second / peak FLOP/s of the devices used.
Peak figures are dense (no sparsity) per device from vendor data sheets; on a CPU there is
no data sheet figure, so the peak is the throughput of a large float32 matmul measured on
this host (all its cores together: simulated CPU devices share them).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device by device_kind substring: (bfloat16, float32).
# float32 matmuls on NVIDIA GPUs run on tensor cores as TF32 under JAX's default precision.
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100": (989e12, 494e12),  # SXM
    "A100": (312e12, 156e12),
    "L4": (121e12, 60e12),
    "A10G": (70e12, 35e12),
    "TPU v6": (918e12, 918e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v5 lite": (197e12, 197e12),  # v5e
    "TPU v5e": (197e12, 197e12),
    "TPU v4": (275e12, 275e12),
    "TPU v3": (123e12, 123e12),
}


@functools.lru_cache(maxsize=None)
def measured_cpu_flops(n: int = 1024, repeats: int = 5) -> float:
    """FLOP/s of an (n, n) @ (n, n) float32 matmul on the first CPU device, best of `repeats`."""
    device = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(devices, dtype: str = "float32") -> float | None:
    """Total peak FLOP/s of `devices`; None for an accelerator missing from the table."""
    devices = list(devices)
    if devices[0].platform == "cpu":
        return measured_cpu_flops()
    kind = devices[0].device_kind
    for name, (bf16, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return len(devices) * (bf16 if dtype == "bfloat16" else fp32)
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak: float | None) -> float | None:
    return None if not peak else flops_per_token * tokens_per_second / peak
