"""Training throughput, MFU and data-parallel scaling of the real pmapped training step.

From the repository root (`pip install -e .` makes the PYTHONPATH=. unnecessary):

    PYTHONPATH=. python benchmarks/throughput.py                                  # the `cpu` preset's shape and batch, 1 device
    PYTHONPATH=. python benchmarks/throughput.py --sweep both --devices 1,2,4,8 --json scaling.json --plot scaling.png
    PYTHONPATH=. python benchmarks/throughput.py --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 \\
        --vocab_size 50304 --batch_size 16 --dtype bfloat16 --json gpt2.json  # GPT-2 small, one GPU

Every measurement point (a device count and a global batch) runs in a fresh subprocess of
this script: on a CPU that is how `--xla_force_host_platform_device_count=N` simulates N
devices (they share the host's cores, so CPU sweeps check correctness, not scaling); on
accelerators the first N real devices are used, and a fresh process also gives each point
its own peak-memory counter. The parent process never touches a device.

In each point: the step is compiled ahead of time (compile time), run `--warmup` steps,
then timed for `--rounds` rounds of `--steps` steps, blocking on the results; the step time
is the median over rounds. The loop is the training loop's: `parallel.DataParallel`'s step
on the state it placed, and each next batch is made by `DataLoader.batch` and placed
by `parallel.shard_batch` while the current step runs. On one device the same step under
plain `jax.jit` (the same loss, gradient and `optim.guarded_update` code without the device
axis, donated state) is timed in alternating rounds with the pmap step, in the same process,
and the median of the rounds' time ratios is reported.

`--batch_size` is the batch per device: the global batch is batch_size x devices, except in
the strong-scaling sweep, where it stays batch_size x (smallest device count).
Tokens are synthetic (uniform random ids) but go through the real DataLoader. The model's
backend settings (attention kernel, LayerNorm backward) are resolved for the devices' platform
and the activation dtype, as the training entry point resolves them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

from common import Runner, median_ratio, model_config, synthetic_loader, time_alternating  # benchmarks/ is on sys.path
from parallel_gpt import optim, parallel, perf, runtime
from parallel_gpt.errors import run_cli
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.optim import AdamHParams, adam_init


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Throughput, MFU and scaling of the pmapped GPT training step.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n_layer", type=int, default=4)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=64)
    p.add_argument("--vocab_size", type=int, default=77,
                   help="tokenizer vocabulary, padded to a multiple of 64 as in training (77: the Shakespeare characters)")
    p.add_argument("--batch_size", type=int, default=16, help="sequences per device (see the module docstring)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the step time is their median")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compiling")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="activation dtype")
    p.add_argument("--grad_accum", type=int, default=1, help="micro-batches per device per step")
    p.add_argument("--remat", choices=("none", "full", "dots"), default="none",
                   help="what each block keeps for the backward pass (model.REMAT)")
    p.add_argument("--devices", default="1", help="device counts, comma-separated, e.g. 1,2,4,8")
    p.add_argument("--sweep", choices=("none", "weak", "strong", "both"), default="none",
                   help="weak: fixed batch per device; strong: fixed global batch; none: one device count")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--plot", metavar="FILE.png", help="plot tokens/s and scaling efficiency (needs matplotlib)")
    p.add_argument("--point", help=argparse.SUPPRESS)  # "N,G": measure one point (the subprocess's job)
    return p.parse_args(argv)


def shape_config(args, platform: str | None) -> GPTConfig:
    """The model config of the command line's shape for `platform` devices (see `common.model_config`)."""
    return model_config(args.n_layer, args.n_head, args.n_embd, args.block_size, args.vocab_size,
                        platform, args.dtype, remat=args.remat)


def jit_step(hp: AdamHParams, dtype, grad_accum: int):
    """The training step on one device under plain `jax.jit`: `parallel.step` without the
    device axis (no pmean, no dropout key), the same loss, gradient and update code."""

    def one_device_step(state, xb, yb):
        loss, grads = parallel.loss_and_grads(state.model, xb, yb, None, grad_accum, dtype)
        model, opt, metrics = optim.guarded_update(state.model, grads, loss, state.opt, hp)
        return parallel.TrainState(model, opt), metrics

    return jax.jit(one_device_step, donate_argnums=0)


def peak_memory_bytes(devices) -> int | None:
    """Largest allocator peak over `devices`; None where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in devices]
    if any(s is None or "peak_bytes_in_use" not in s for s in stats):
        return None
    return max(s["peak_bytes_in_use"] for s in stats)


def measure_point(args, n_devices: int, global_batch: int) -> dict:
    """All figures of one (device count, global batch) point, in this process."""
    dtype, hp = jnp.dtype(args.dtype), AdamHParams()
    mesh = parallel.make_layout(global_batch, args.grad_accum, n_devices)
    config = shape_config(args, mesh.devices.flat[0].platform)
    loader = synthetic_loader(args.vocab_size, args.block_size, global_batch)
    # A fresh model per runner: donation deletes the buffers a runner was given.
    fresh = lambda: GPT.create(config, key=jax.random.key(0))  # noqa: E731
    dp = parallel.DataParallel(mesh, hp=hp, dtype=dtype, grad_accum=args.grad_accum)
    place = lambda s: dp.batch(*loader.batch(s))  # noqa: E731
    state = dp.place(fresh())
    params, flops_per_token = state.model.num_params(), state.model.flops_per_token()
    runners = {"pmap": Runner(dp.step, dp.lower, state, place)}
    compile_s = {"pmap": runners["pmap"].compile()}
    runners["pmap"].run(args.warmup)
    # Read before any other state exists: the counter is a high-water mark for the process.
    memory = peak_memory_bytes(mesh.devices.flat)

    host_s = []
    for s in range(args.steps):
        t = time.perf_counter()
        jax.block_until_ready(place(s))
        host_s.append(time.perf_counter() - t)

    if n_devices == 1:
        device = mesh.devices.flat[0]
        # Committed to the device like the outputs, or the second call would compile again.
        model = fresh()
        one_device = jit_step(hp, dtype, args.grad_accum)
        runners["jit"] = Runner(one_device, one_device.lower,
                                jax.device_put(parallel.TrainState(model, adam_init(model)), device),
                                lambda s: tuple(jax.device_put(a, device) for a in loader.batch(s)))
        compile_s["jit"] = runners["jit"].compile()
        runners["jit"].run(args.warmup)

    per_step = time_alternating(runners, args.rounds, args.steps)

    tokens = global_batch * args.block_size
    peak = perf.peak_flops(mesh.devices.flat, args.dtype)
    step_s = statistics.median(per_step["pmap"])
    point = {
        "devices": n_devices, "global_batch": global_batch, "per_device_batch": global_batch // n_devices,
        "tokens_per_step": tokens, "compile_s": compile_s["pmap"], "step_s": step_s,
        "step_s_rounds": per_step["pmap"], "tokens_per_s": tokens / step_s,
        "peak_flops": peak, "mfu": perf.mfu(flops_per_token, tokens / step_s, peak),
        "peak_memory_bytes": memory, "host_batch_s": statistics.median(host_s),
        "host_batch_fraction": statistics.median(host_s) / step_s,
        "platform": mesh.devices.flat[0].platform, "device_kind": mesh.devices.flat[0].device_kind,
        "params": params, "flops_per_token": flops_per_token,
    }
    if "jit" in runners:
        jit_s = statistics.median(per_step["jit"])
        point["jit"] = {"compile_s": compile_s["jit"], "step_s": jit_s, "step_s_rounds": per_step["jit"],
                        "tokens_per_s": tokens / jit_s,
                        "pmap_over_jit": median_ratio(per_step["pmap"], per_step["jit"])}
    return point


# --- the parent: plan the points, run each in a subprocess, report ---------------------------


def plan(args) -> tuple[list[int], list[tuple[int, int]]]:
    """(device counts, sorted unique (devices, global batch) points), checked up front."""
    try:
        counts = sorted({int(d) for d in args.devices.split(",")})
    except ValueError:
        raise SystemExit(f"error: --devices={args.devices!r}: give device counts separated by commas, e.g. 1,2,4,8")
    if counts[0] < 1:
        raise SystemExit("error: device counts must be >= 1")
    if args.sweep == "none" and len(counts) > 1:
        raise SystemExit(f"error: --devices={args.devices} lists several counts: give one, or use --sweep weak|strong|both")
    for name in ("batch_size", "steps", "rounds", "warmup", "grad_accum"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name} must be >= 1")
    try:
        shape_config(args, None)  # the devices are the subprocesses' to choose
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.plot and args.sweep == "none":
        raise SystemExit("error: --plot draws a sweep: add --sweep weak, strong or both")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("error: --plot needs matplotlib: pip install matplotlib")
    points = {(n, args.batch_size * n) for n in counts if args.sweep in ("none", "weak", "both")}
    if args.sweep in ("strong", "both"):
        global_batch = args.batch_size * counts[0]
        for n in counts:
            if global_batch % n:
                raise SystemExit(f"error: strong scaling keeps the global batch {global_batch} (batch_size x {counts[0]}), "
                                 f"which {n} devices do not divide: use a batch_size that makes it a multiple of {n}")
            points.add((n, global_batch))
    for n, g in points:
        if g // n % args.grad_accum:
            raise SystemExit(f"error: grad_accum={args.grad_accum} does not divide the per-device batch {g // n} "
                             f"at {n} devices: use a grad_accum that divides it")
    return counts, sorted(points)


def run_point(argv: list[str], n: int, global_batch: int) -> dict:
    """Measure one point in a fresh process that sees `n` simulated devices if it runs on a CPU."""
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    cmd = [sys.executable, os.path.abspath(__file__), *argv, f"--point={n},{global_batch}"]
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode:
        raise SystemExit(f"error: the measurement at {n} device(s), global batch {global_batch}, "
                         f"failed with exit code {proc.returncode} (its stderr is above)")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def scaling(points: list[dict]) -> list[dict]:
    """Scaling efficiency: tokens/s per device relative to the smallest device count's.
    Weak scaling (same batch per device) and strong scaling (same global batch) share it."""
    base = points[0]["tokens_per_s"] / points[0]["devices"]
    return [{"devices": p["devices"], "global_batch": p["global_batch"], "tokens_per_s": p["tokens_per_s"],
             "speedup": p["tokens_per_s"] / points[0]["tokens_per_s"],
             "efficiency": p["tokens_per_s"] / p["devices"] / base} for p in points]


def _fmt(x, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return "n/a" if x is None else f"{x * scale:{spec}}{suffix}"


def markdown(report: dict) -> str:
    first, config = report["points"][0], report["config"]
    options = (f", remat {config['remat']}" if config["remat"] != "none" else "") + (f", grad_accum {config['grad_accum']}"
                                                         if config["grad_accum"] > 1 else "")
    lines = [f"{first['params'] / 1e6:.2f}M parameters, {first['flops_per_token'] / 1e6:.1f} MFLOP/token, "
             f"{config['dtype']}{options}, {first['platform']} ({first['device_kind']}), "
             f"{config['rounds']} rounds x {config['steps']} steps after {config['warmup']} warm-up steps",
             "",
             "| devices | global batch | compile s | step ms | tokens/s | MFU | peak FLOP/s | peak memory | host batch ms (% of step) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for p in report["points"]:
        lines.append(f"| {p['devices']} | {p['global_batch']} | {p['compile_s']:.2f} | {1e3 * p['step_s']:.2f} | "
                     f"{p['tokens_per_s']:,.0f} | {_fmt(p['mfu'], '.1f', 100, '%')} | "
                     f"{_fmt(p['peak_flops'], '.3g')} | {_fmt(p['peak_memory_bytes'], '.2f', 2**-30, ' GiB')} | "
                     f"{1e3 * p['host_batch_s']:.2f} ({100 * p['host_batch_fraction']:.1f}%) |")
    jit = next((p for p in report["points"] if "jit" in p), None)
    if jit:
        lines += ["", f"pmap vs plain jit, 1 device, global batch {jit['global_batch']} (alternating rounds):", "",
                  "| step | compile s | step ms | tokens/s |", "|---|---:|---:|---:|",
                  f"| pmap | {jit['compile_s']:.2f} | {1e3 * jit['step_s']:.2f} | {jit['tokens_per_s']:,.0f} |",
                  f"| jit | {jit['jit']['compile_s']:.2f} | {1e3 * jit['jit']['step_s']:.2f} | "
                  f"{jit['jit']['tokens_per_s']:,.0f} |",
                  "", f"pmap / jit step time, median of the rounds' ratios: {jit['jit']['pmap_over_jit']:.3f} (target <= 1.02)"]
    for kind in ("weak", "strong"):
        if kind in report:
            lines += ["", f"{kind} scaling:", "", "| devices | global batch | tokens/s | speedup | efficiency |",
                      "|---:|---:|---:|---:|---:|"]
            lines += [f"| {r['devices']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} | {r['speedup']:.2f} | "
                      f"{100 * r['efficiency']:.0f}% |" for r in report[kind]]
    if first["platform"] == "cpu" and len(report["points"]) > 1:
        lines += ["", "Simulated CPU devices share the host's cores: these sweeps check correctness, not scaling."]
    return "\n".join(lines)


def plot(report: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, (ax_tok, ax_eff) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("weak", "strong"):
        rows = report.get(kind)
        if rows:
            ax_tok.plot([r["devices"] for r in rows], [r["tokens_per_s"] for r in rows], "o-", label=f"{kind} scaling")
            ax_eff.plot([r["devices"] for r in rows], [100 * r["efficiency"] for r in rows], "o-", label=f"{kind} scaling")
    counts = sorted({r["devices"] for kind in ("weak", "strong") for r in report.get(kind, [])})
    for ax, label in ((ax_tok, "tokens/s"), (ax_eff, "scaling efficiency (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(n) for n in counts])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("devices")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    first = report["points"][0]
    fig.suptitle(f"{first['params'] / 1e6:.2f}M-parameter GPT, {report['config']['dtype']}, {first['device_kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.point:
        runtime.keep_freed_memory()  # as the training entry point does
        n, global_batch = map(int, args.point.split(","))

        def point(_) -> int:
            print(json.dumps(measure_point(args, n, global_batch)))
            return 0

        return run_cli(point, argv)

    counts, points = plan(args)
    results = {}
    for n, global_batch in points:
        print(f"measuring {n} device(s), global batch {global_batch} ...", file=sys.stderr, flush=True)
        results[n, global_batch] = run_point(argv, n, global_batch)
    report = {"config": {k: v for k, v in vars(args).items() if k != "point"}, "points": list(results.values())}
    if args.sweep in ("weak", "both"):
        report["weak"] = scaling([results[n, args.batch_size * n] for n in counts])
    if args.sweep in ("strong", "both"):
        report["strong"] = scaling([results[n, args.batch_size * counts[0]] for n in counts])
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
