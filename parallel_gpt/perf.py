"""Peak FLOP/s, model FLOPs utilisation (MFU), and the host allocator setting for CPU runs.

MFU = model FLOPs per token x tokens per second / peak FLOP/s of the devices used.
Peak figures are dense (no sparsity) per device from vendor data sheets; on a CPU there is
no data sheet figure, so the peak is the throughput of a large float32 matmul measured on
this host (all its cores together: simulated CPU devices share them).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import importlib.util
import platform
import time

import jax
import jax.numpy as jnp

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    XLA:CPU allocates the buffers of every step anew: tens of megabytes of activations and
    gradients at the shapes we train on a CPU. By default glibc serves such blocks with
    mmap, or from per-thread heaps that it unmaps once empty, so each step touches fresh
    pages and the kernel zeroes them in page faults: the forward and backward pass of
    4/4/128 block 128 batch 16 took 263 ms (134 ms of it system time), and 189 ms (14 ms)
    with this setting: one heap, no mmap, no trimming below 2 GiB. The costs: the memory of
    the largest step stays with the process, and compiling is slower with every thread on
    one heap (4.4 s -> 5.3 s for that model's training step). So the training entry point
    uses it and sampling does not.

    Process-wide, and it only works before JAX starts its CPU threads: call it first thing.
    Returns whether it applied: with glibc, when JAX will compute on the CPU (JAX_PLATFORMS
    starts with cpu, or no accelerator plugin is installed); elsewhere it does nothing.
    """
    if platform.libc_ver()[0] != "glibc" or not _computes_on_cpu():
        return False
    libc = ctypes.CDLL("libc.so.6")
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def _computes_on_cpu() -> bool:
    """Whether JAX's default backend will be the CPU, found without initialising a backend."""
    platforms = jax.config.jax_platforms
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    # GPU plugins register under the `jax_plugins` namespace or entry-point group; TPUs need libtpu.
    return not (importlib.metadata.entry_points(group="jax_plugins")
                or importlib.util.find_spec("jax_plugins") or importlib.util.find_spec("libtpu"))


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
