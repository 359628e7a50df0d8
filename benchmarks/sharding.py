"""What the state_sharding levels and scanned layers cost: step time and compile time.

    PYTHONPATH=. python benchmarks/sharding.py steps [--devices 1,8] [--rounds 5]
    PYTHONPATH=. python benchmarks/sharding.py compile [--layers 12,24,48] [--topology cpu:1]

steps: the training step at each level (replicated, optimizer, full; layers unrolled, as
`auto` has them on CPUs) and replicated with scanned layers, on N devices, the `cpu`
preset's shape and batch, timed in alternating rounds in one process (one process
per device count: on a CPU that is how N devices are simulated; they share the host's
cores, so the figure is what the levels' collectives cost, not scaling). Each time is
reported as the median over rounds of its ratio to replicated's in the same round.

compile: the step of a GPT-2-wide model (n_embd 768, 12 heads, block 1024, vocab 50304,
batch 1 per device) at each depth, layers unrolled and scanned, compiled ahead of time by
`plan.compile_step` (no arrays allocated) for `--topology`: cpu:1 here, or a TPU slice
through libtpu (`pip install -e '.[tpu]'`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys

LEVELS = ("replicated", "optimizer", "full")


def steps(n_devices: int, rounds: int, n_steps: int) -> dict:
    """{level: seconds per step in each round} on `n_devices`, alternating, in this process."""
    import jax

    from common import Runner, synthetic_loader, time_alternating  # benchmarks/ is on sys.path
    from parallel_gpt import parallel
    from parallel_gpt.config import PRESETS, make_config
    from parallel_gpt.model import GPT

    tconf = make_config("cpu", {})
    batch = PRESETS["cpu"]["batch_size"]
    mesh = parallel.make_layout(batch, 1, n_devices)
    config = tconf.model_config(65).for_platform("cpu")  # the Shakespeare characters' vocabulary
    loader = synthetic_loader(65, config.block_size, batch)
    runners = {}
    for name, level, scan in [*((level, level, False) for level in LEVELS), ("replicated, scanned", "replicated", True)]:
        dp = parallel.DataParallel(mesh, hp=tconf.optim, state_sharding=level)
        model = GPT.create(dataclasses.replace(config, scan_layers=scan), key=jax.random.key(0))
        runners[name] = Runner(dp.step, dp.lower, dp.place(model), lambda s, dp=dp: dp.batch(*loader.batch(s)))
        runners[name].compile()
        runners[name].run(3)  # warm up
    return time_alternating(runners, rounds, n_steps)


def compile_times(layers: list[int], topology: str) -> list[dict]:
    from parallel_gpt import plan
    from parallel_gpt.config import make_config

    t = plan.target(topology)
    out = []
    for n_layer in layers:
        for scan in (False, True):
            tconf = make_config("cpu", {"n_layer": n_layer, "n_head": 12, "n_embd": 768, "block_size": 1024,
                                        "dropout": 0.0, "batch_size": len(t.devices), "scan_layers": scan,
                                        "tokenizer": "gpt2"})
            config = tconf.model_config(50257).for_platform(t.platform)
            step = plan.compile_step(tconf, config, t)
            out.append({"n_layer": n_layer, "scan_layers": scan, "compile_s": step["compile_seconds"]})
            print(f"{n_layer} layers, scan_layers={scan}: {step['compile_seconds']:.1f} s", flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=("steps", "compile"))
    ap.add_argument("--devices", default="1,8", help="device counts for steps, comma-separated")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=10, help="steps per round")
    ap.add_argument("--layers", default="12,24,48", help="depths for compile, comma-separated")
    ap.add_argument("--topology", default="cpu:1", help="what compile compiles for (plan's --topology)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--point", type=int, help=argparse.SUPPRESS)  # steps on this many devices (a subprocess)
    args = ap.parse_args(argv)
    if args.point:
        print(json.dumps(steps(args.point, args.rounds, args.steps)))
        return 0
    if args.what == "compile":
        import jax
        jax.config.update("jax_platforms", "cpu")  # as plan: compile-only TPU devices come from libtpu all the same
        if args.topology.startswith("cpu:"):
            jax.config.update("jax_num_cpu_devices", int(args.topology[4:]))
        figures = compile_times([int(n) for n in args.layers.split(",")], args.topology)
        by = {(f["n_layer"], f["scan_layers"]): f["compile_s"] for f in figures}
        deepest, shallowest = max(f["n_layer"] for f in figures), min(f["n_layer"] for f in figures)
        for scan in (False, True):
            print(f"scan_layers={scan}: {deepest} layers / {shallowest} layers = "
                  f"{by[deepest, scan] / by[shallowest, scan]:.2f}x")
    else:
        figures = {}
        for n in (int(d) for d in args.devices.split(",")):
            env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n}",
                   "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.abspath(__file__)),
                                                              os.environ.get("PYTHONPATH")]))}
            done = subprocess.run([sys.executable, __file__, "steps", "--point", str(n), "--rounds", str(args.rounds),
                                   "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
            per_step = json.loads(done.stdout.strip().splitlines()[-1])
            figures[n] = {name: {"step_ms": 1000 * statistics.median(times),
                                 "vs_replicated": statistics.median(a / b for a, b in zip(times,
                                                                                          per_step["replicated"]))}
                          for name, times in per_step.items()}
            print(f"{n} device(s): " + ", ".join(f"{name} {f['step_ms']:.1f} ms ({f['vs_replicated']:.2f}x)"
                                                 for name, f in figures[n].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
