"""Process setup: host settings made before JAX starts, and output from process 0 only.

Multi-host initialisation (`jax.distributed`) belongs here too: it must run before any
other JAX call, like `keep_freed_memory`.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import platform

import jax

# glibc mallopt(3) parameters.
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed memory instead of returning it to the kernel.

    XLA:CPU allocates the buffers of every step anew: tens of megabytes of activations and
    gradients at the shapes we train on a CPU. By default glibc serves such blocks with
    mmap, or from per-thread heaps that it unmaps once empty, so each step touches fresh
    pages and the kernel zeroes them in page faults: the forward and backward pass of
    4/4/128 block 128 batch 16 takes 263 ms (134 ms of it system time) that way, and
    189 ms (14 ms) with this setting: one heap, no mmap, no trimming below 2 GiB. The costs:
    the memory of the largest step stays with the process, and compiling is slower with
    every thread on one heap (4.4 s -> 5.3 s for that model's training step). So the
    training entry point and the benchmarks use it and sampling does not.

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


def is_main_process() -> bool:
    """Process 0: the one that prints, logs and writes checkpoints."""
    return jax.process_index() == 0


def print0(*args, **kwargs):
    if is_main_process():
        print(*args, **kwargs, flush=True)
