"""What a restart and a checkpoint cost: start-up with a cold and a warm compilation cache,
and the training time a checkpoint blocks, written in the foreground and in the background.

    python benchmarks/goodput.py [--rounds 3] [--shapes cpu gpt2]

Start-up: the trainer is run for one step, `rounds` times with an empty compilation cache
(cold) and `rounds` times with the cache the first cold run filled (warm), alternating;
each run's `metrics.jsonl` goodput row gives its start-up (process start to the step
loop, compilation apart), its compilation and its wall time. "to first step" is start-up +
compilation + the first step.

Checkpoints: a state of the shape's size (model + AdamW moments) on one device is saved
`rounds` times each way, alternating: `checkpoint.save` of the state copied to host memory
(`DataParallel.to_host`: what a save blocked for before) against the copy +
`checkpoint.Writer.save` (what it blocks for now: the copy; the write goes on in the
background).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {  # (model shape, the trainer's other settings): the `cpu` preset's, and GPT-2 small's
    "cpu": (dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=128), []),
    "gpt2": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304),
             ["--tokenizer=gpt2", "--batch_size=1"]),
}


def train_settings(shape: str) -> list[str]:
    model, extra = SHAPES[shape]
    return ["--preset", "cpu", *(f"--{k}={v}" for k, v in model.items() if k != "vocab_size"), *extra]


def run_once(shape: str, out_dir: Path, cache: Path) -> dict:
    """The goodput row of one training step of `shape`, with `cache` as compilation cache."""
    cmd = [sys.executable, "-m", "parallel_gpt.train", *train_settings(shape), "--max_iters=1", "--eval_iters=1",
           "--sample_tokens=0", f"--out_dir={out_dir}", f"--compilation_cache={cache}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n{result.stderr}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in rows if "goodput" in r)


def startup(shape: str, rounds: int, tmp: Path) -> dict:
    warm_cache = tmp / f"{shape}_warm"
    runs = {"cold": [], "warm": []}
    run_once(shape, tmp / f"{shape}_fill", warm_cache)  # fills the warm cache
    for r in range(rounds):
        for kind in ("cold", "warm") if r % 2 == 0 else ("warm", "cold"):
            cache = warm_cache if kind == "warm" else tmp / f"{shape}_cold{r}"
            runs[kind].append(run_once(shape, tmp / f"{shape}_{kind}{r}", cache))

    def median(kind, key):
        return statistics.median(row[key] for row in runs[kind])

    table = {kind: {key: median(kind, key) for key in ("startup_s", "compile_s", "steps_s", "wall_s")}
             for kind in runs}
    for kind in runs:
        table[kind]["to_first_step_s"] = sum(table[kind][k] for k in ("startup_s", "compile_s", "steps_s"))
    table["warm_over_cold"] = statistics.median(
        sum(w[k] for k in ("startup_s", "compile_s", "steps_s")) / sum(c[k] for k in ("startup_s", "compile_s", "steps_s"))
        for w, c in zip(runs["warm"], runs["cold"]))
    return table


def blocked(shape: str, rounds: int, tmp: Path) -> dict:
    """Seconds a checkpoint blocks training, foreground against background, alternating."""
    import jax

    from parallel_gpt import checkpoint, parallel
    from parallel_gpt.model import GPT, GPTConfig
    from parallel_gpt.optim import AdamHParams

    config = GPTConfig(**SHAPES[shape][0], dropout=0.0).for_platform("cpu")
    model = jax.jit(lambda: GPT.create(config, key=jax.random.key(0)))()
    dp = parallel.DataParallel(parallel.make_mesh(1), hp=AdamHParams())
    state = dp.place(model)
    jax.block_until_ready(state)
    writer, times = checkpoint.Writer(), {"foreground": [], "background": []}
    for r in range(rounds):
        for kind in ("foreground", "background") if r % 2 == 0 else ("background", "foreground"):
            writer.wait()  # the previous background write is not this round's time
            t = time.perf_counter()
            host = dp.to_host(state)  # what the trainer copies to host memory
            arrays = {**checkpoint.flatten(host.model, "model"), **checkpoint.flatten(host.opt, "opt")}
            if kind == "foreground":
                checkpoint.save(tmp / f"ckpt_{shape}", 2 * r + 1, arrays, {}, keep=1)
            else:
                writer.save(tmp / f"ckpt_{shape}", 2 * r + 2, arrays, {}, keep=1)
            times[kind].append(time.perf_counter() - t)
    writer.wait()
    params = sum(x.size for x in jax.tree.leaves(model))
    return {"params": params, "state_bytes": 12 * params,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()},
            "background_over_foreground": statistics.median(b / f for b, f in zip(times["background"],
                                                                                  times["foreground"]))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", choices=SHAPES, default=list(SHAPES))
    ap.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    args = ap.parse_args(argv)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            print(f"measuring {shape} ...", file=sys.stderr, flush=True)
            report[shape] = {"startup": startup(shape, args.rounds, Path(tmp)),
                             "checkpoint": blocked(shape, args.rounds, Path(tmp))}
    print("| shape | cache | start-up s | compile s | to first step s | warm / cold |")
    print("|---|---|---:|---:|---:|---:|")
    for shape, r in report.items():
        for kind in ("cold", "warm"):
            s = r["startup"][kind]
            ratio = f"{r['startup']['warm_over_cold']:.2f}" if kind == "warm" else ""
            print(f"| {shape} | {kind} | {s['startup_s']:.2f} | {s['compile_s']:.2f} | {s['to_first_step_s']:.2f} "
                  f"| {ratio} |")
    print("\n| shape | state | blocked, foreground s | blocked, background s | background / foreground |")
    print("|---|---:|---:|---:|---:|")
    for shape, r in report.items():
        c = r["checkpoint"]
        print(f"| {shape} | {c['state_bytes'] / 2**30:.2f} GiB | {c['foreground_s']:.2f} | {c['background_s']:.2f} "
              f"| {c['background_over_foreground']:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.exit(main())
