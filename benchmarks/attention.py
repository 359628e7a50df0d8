"""Forward and backward pass of causal attention: each `attention` kernel that runs here, side by side.

    PYTHONPATH=. python benchmarks/attention.py                       # 4 heads x 32, batch 16, T = 128 and 256
    PYTHONPATH=. python benchmarks/attention.py --heads 12 --head_size 64 --batch 8 --seq 1024 --dtype bfloat16

The kernels are compiled and warmed up, then timed in alternating rounds
(`common.time_alternating`); the figure is the median over rounds of the time per call.
On a CPU `cudnn` is left out; on GPUs `cpu_blocks` runs too, for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from common import time_alternating

from parallel_gpt.attention import causal_attention
from parallel_gpt.runtime import keep_freed_memory


class KernelRunner:
    """Forward and backward of one kernel, with the `run(n) -> seconds` interface of common.Runner."""

    def __init__(self, name: str, q, k, v, probe):
        loss = lambda q, k, v: jnp.sum(causal_attention(q, k, v, name) * probe).astype(jnp.float32)  # noqa: E731
        self.grad, self.args = jax.jit(jax.grad(loss, (0, 1, 2))), (q, k, v)
        self.run(2)  # compile and warm up

    def run(self, n: int) -> float:
        t = time.perf_counter()
        for _ in range(n):
            out = self.grad(*self.args)
        jax.block_until_ready(out)
        return time.perf_counter() - t


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
        runners = {name: KernelRunner(name, q, k, v, probe) for name in kernels}
        per_call = time_alternating(runners, args.rounds, args.calls)
        print(f"T = {T}: " + ", ".join(f"{name} {1e3 * statistics.median(s):.1f} ms" for name, s in per_call.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
