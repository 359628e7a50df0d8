"""Forward and backward pass of causal attention: each `attention` kernel that runs here, side by side.

    PYTHONPATH=. python benchmarks/attention.py                       # 4 heads x 32, batch 16, T = 128 and 256
    PYTHONPATH=. python benchmarks/attention.py --heads 12 --head_size 64 --batch 8 --seq 1024 --dtype bfloat16

The kernels time in alternating rounds (each round starting one further along the list),
the figure is the median over rounds of the time per call, compiled and warmed up first.
On a CPU `cudnn` is left out; on GPUs `cpu_blocks` runs too, for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from parallel_gpt.attention import causal_attention
from parallel_gpt.runtime import keep_freed_memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head_size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, nargs="+", default=[128, 256], help="sequence lengths")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--calls", type=int, default=10, help="timed calls per round")
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    keep_freed_memory()  # as the training entry point does, before JAX starts its threads
    platform, dtype = jax.default_backend(), jnp.dtype(args.dtype)
    kernels = ["cpu_blocks", "xla"] + (["cudnn"] if platform == "gpu" and dtype == jnp.bfloat16 else [])
    print(f"{platform}, {args.batch} x {args.heads} heads x {args.head_size}, {args.dtype}, forward + backward; "
          f"median of {args.rounds} alternating rounds of {args.calls} calls")
    for T in args.seq:
        q, k, v, probe = jax.random.normal(jax.random.key(0), (4, args.batch, T, args.heads, args.head_size), dtype)
        fns = {name: jax.jit(jax.grad(lambda q, k, v, name=name: jnp.sum(causal_attention(q, k, v, name) * probe)
                                      .astype(jnp.float32), (0, 1, 2))) for name in kernels}
        for f in fns.values():
            jax.block_until_ready(f(q, k, v))  # compile
            jax.block_until_ready(f(q, k, v))
        ms = {name: [] for name in fns}
        for r in range(args.rounds):
            for name in kernels[r % len(kernels):] + kernels[:r % len(kernels)]:
                t = time.perf_counter()
                for _ in range(args.calls):
                    out = fns[name](q, k, v)
                jax.block_until_ready(out)
                ms[name].append((time.perf_counter() - t) / args.calls * 1e3)
        print(f"T = {T}: " + ", ".join(f"{name} {statistics.median(t):.1f} ms" for name, t in ms.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
