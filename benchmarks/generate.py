"""Generation speed: KV-cache decoding against the recompute path, against transformers, and
against the memory floor.

    python benchmarks/generate.py [--rounds 2] [--cases char1 char8 gpt2_1 gpt2_8] [--dtype bfloat16]
                                  [--commands gpt2_1 gpt2_8] [--profile]

Each case is a model shape (random weights, float32), a batch, a prompt length and a number
of new tokens, continued greedily by `generate.decode` after `generate.prefill`, in
alternating rounds in one process with the path without a cache (`decode_recompute`, the
whole window per token, fewer tokens) and, at the GPT-2 shape with transformers installed
(the bench extra), with `GPT2LMHeadModel.generate(do_sample=False, use_cache=True)` on the
same weights (exported with `hf.export`). tokens/s is new tokens x batch / seconds, prefill
included, the median over rounds. `--dtype bfloat16` casts the weights (and so the cache) as
`evaluate --dtype bfloat16` does and times the cached path alone: the other two compute in
float32.

Roofline: a decode step must read every weight once (the position table aside: one row)
and each row's cached keys and values up to its position, 2 x layers x (position + 1) x
n_embd numbers (4 bytes each, 2 in bfloat16); the floor is those bytes, averaged over the
run's steps, over the host memory bandwidth, measured in the same run as (bytes read +
bytes written) / seconds of a 256 MiB array copy. A step's time is the decoding alone (prefill apart) / new tokens.

`--profile` times nothing: it traces 20 decode steps of each case with jax.profiler and
prints the decode program's op time by kind (XLA's op names: `dot` and `ynn_fusion` are
matrix products, `copy_dot_fusion` the output head at batch 1, `*dynamic-slice*` the
cache's blocks read out for attention).

`--commands gpt2_1 gpt2_8` times whole commands, alternating: `python -m parallel_gpt.evaluate
--init_from=DIR --top_k 1` with JAX's compilation cache filled by one earlier run (as a
user's second run has it), the same with `--compilation_cache=off` (a first run: every
program compiled), and a script that loads DIR with transformers and calls generate(), at
those GPT-2 cases (batch 8 as --num_samples 8; `--cases` with no names skips the
in-process cases).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from parallel_gpt import checkpoint, hf
from parallel_gpt.generate import decode, decode_recompute, prefill, sampling_mode
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.tokenizers import GPT2Tokenizer

SHAPES = {
    "shakespeare_char": GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=128, vocab_tokens=65,
                                  dropout=0.0),
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, vocab_tokens=50257,
                      dropout=0.0),
}
CASES = {  # shape, batch, prompt tokens, new tokens with the cache, new tokens recomputed (0: not run)
    "char1": ("shakespeare_char", 1, 128, 64, 16),
    "char8": ("shakespeare_char", 8, 128, 64, 16),
    "gpt2_1": ("gpt2", 1, 3, 200, 2),  # the new user: 3-token prompt, 200 new
    "gpt2_8": ("gpt2", 8, 512, 200, 0),  # recomputing 8 x 1024-token windows per token: minutes
}
GREEDY = sampling_mode(0.0, None, 1.0)


def bandwidth() -> float:
    """Host memory bandwidth, bytes/s: (read + written) / seconds of the best of 5 copies of 256 MiB."""
    src = np.ones(64 << 20, np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t)
    return 2 * src.nbytes / min(times)


def step_bytes(model: GPT, batch: int, prompt: int, new: int) -> float:
    """Bytes a decode step must read, averaged over the `new` steps after a `prompt`-token prefill."""
    c = model.config
    size = model.wte.weight.dtype.itemsize  # the cache has the weights' dtype
    weights = size * (model.num_params(non_embedding=True) + c.n_embd)  # every weight; one row of wpe
    mean_position = prompt + (new - 1) / 2
    return weights + size * 2 * c.n_layer * batch * (mean_position + 1) * c.n_embd


def timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def inputs(case: str, dtype=jnp.float32):
    """The case's model (random weights in `dtype`), prompts (B, P), prefill window (B,
    block_size) and lengths (B,), and a token buffer with room for the new tokens."""
    name, batch, P, n_cached, _ = CASES[case]
    config = SHAPES[name].for_platform(jax.default_backend(), dtype)
    model = jax.tree.map(lambda a: a.astype(dtype), GPT.create(config, key=jax.random.key(0)))
    T = config.block_size
    prompts = np.random.default_rng(0).integers(0, config.vocab_tokens, (batch, P)).astype(np.int32)
    window = jnp.asarray(np.pad(prompts, ((0, 0), (0, T - P))))
    lengths = jnp.full((batch,), P, jnp.int32)
    buffer = np.pad(prompts, ((0, 0), (0, T + n_cached - P)))  # one shape for every call: one compile each
    return model, prompts, window, lengths, buffer


def measure(case: str, rounds: int, with_transformers: bool, bw: float, dtype=jnp.float32):
    name, batch, P, n_cached, n_recompute = CASES[case]
    model, prompts, window, lengths, buffer = inputs(case, dtype)
    if dtype != jnp.float32:  # the recompute path and transformers compute in float32: not the same work
        n_recompute, with_transformers = 0, False
    key = jax.random.key(0)
    prefill_s = []  # the prefill's part of each cached run

    def cached(n):
        t = time.perf_counter()
        cache, logits = jax.block_until_ready(prefill(model, window, lengths))
        prefill_s.append(time.perf_counter() - t)
        return decode(model, cache, logits, jnp.asarray(buffer), lengths, lengths, n, 0, key, 0.0, 1.0, **GREEDY)[2]

    def recompute(n):
        return decode_recompute(model, jnp.asarray(buffer), lengths, n, 0, key, 0.0, 1.0, **GREEDY)[0]

    runs = {"cache": (cached, n_cached)}
    if n_recompute:  # the same greedy tokens both ways, and a warm start (compiled) for each
        np.testing.assert_array_equal(np.asarray(cached(n_recompute))[:, :P + n_recompute],
                                      np.asarray(recompute(n_recompute))[:, :P + n_recompute])
        runs["recompute"] = (recompute, n_recompute)
    else:
        cached(1)
    if with_transformers:
        runs["transformers"] = transformers_runner(model, prompts, n_cached)
    times = {k: [] for k in runs}
    prefill_s.clear()
    for _ in range(rounds):
        for k, (fn, n) in runs.items():
            times[k].append(timed(lambda: fn(n)))
    rate = {k: runs[k][1] * batch / statistics.median(v) for k, v in times.items()}
    step = statistics.median(t - p for t, p in zip(times["cache"], prefill_s[-rounds:])) / n_cached
    floor = step_bytes(model, batch, P, n_cached) / bw
    parts = [f"{k} {r:,.1f} tok/s" for k, r in rate.items()]
    if "recompute" in rate:
        parts.append(f"cache / recompute {rate['cache'] / rate['recompute']:.1f}x")
    if "transformers" in rate:
        parts.append(f"ours / transformers {rate['cache'] / rate['transformers']:.2f}x")
    print(f"{case} ({name}, {jnp.dtype(dtype).name}, batch {batch}, prompt {P}, {n_cached} new): "
          f"{'; '.join(parts)}; prefill "
          f"{statistics.median(prefill_s[-rounds:]):.2f} s; decode step {step * 1e3:.1f} ms, floor "
          f"{floor * 1e3:.1f} ms ({step_bytes(model, batch, P, n_cached) / 1e6:.0f} MB), step / floor "
          f"{step / floor:.2f}x", flush=True)


def profile(case: str, steps: int = 20):
    """Where a decode step's time goes: a jax.profiler trace of `steps` greedy steps after
    the case's prefill, the decode program's ops summed by kind (XLA's op name without its
    .N suffix). A while loop's own span holds its body's ops, so loops are left out."""
    model, _, window, lengths, buffer = inputs(case)

    def greedy(cache, logits):
        return decode(model, cache, logits, jnp.asarray(buffer), lengths, lengths, steps, 0, jax.random.key(0), 0.0,
                      1.0, **GREEDY)

    jax.block_until_ready(greedy(*prefill(model, window, lengths)))  # compiled
    cache, logits = jax.block_until_ready(prefill(model, window, lengths))
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        step = timed(lambda: greedy(cache, logits)) / steps
        jax.profiler.stop_trace()
        trace = json.load(gzip.open(next(Path(tmp).rglob("perfetto_trace.json.gz"))))
    kinds, calls = collections.Counter(), collections.Counter()
    for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
        if e.get("ph") == "X" and e.get("args", {}).get("hlo_module") == "jit_decode":
            kind = re.sub(r"\.\d+$", "", e["name"])
            if kind != "while":
                kinds[kind] += e["dur"] / 1e3 / steps  # ms per step
                calls[kind] += 1 / steps
    print(f"{case}: decode step {step * 1e3:.1f} ms (traced), of which ops by kind (ms per step, calls per step):")
    top = kinds.most_common(8)
    for kind, ms in top:
        print(f"  {ms:7.2f} ms {calls[kind]:6.0f}  {kind}")
    print(f"  {sum(kinds.values()) - sum(ms for _, ms in top):7.2f} ms         the other {len(kinds) - len(top)} kinds",
          flush=True)


def transformers_runner(model: GPT, prompts: np.ndarray, n: int):
    import torch
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as tmp:
        hf.export(model.config, checkpoint.flatten(model, "model"), GPT2Tokenizer(), tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp).eval()
    ids = torch.from_numpy(prompts.astype(np.int64))

    def run(n):
        with torch.no_grad():
            return theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, use_cache=True, pad_token_id=0).numpy()

    return run, n


HF_SCRIPT = textwrap.dedent("""
    import sys, torch
    from transformers import AutoTokenizer, GPT2LMHeadModel
    path, prompt, n, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    model = GPT2LMHeadModel.from_pretrained(path).eval()
    ids = AutoTokenizer.from_pretrained(path)([prompt] * samples, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                             pad_token_id=0)
    print(out.shape)
""")


def commands(rounds: int, cases: list[str]):
    """Whole commands, alternating: evaluate (compilation cache filled, and off) against a
    transformers script, on one exported directory."""
    config = SHAPES["gpt2"].for_platform(jax.default_backend())
    model = GPT.create(config, key=jax.random.key(0))
    tokenizer = GPT2Tokenizer()
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as cache:
        hf.export(config, checkpoint.flatten(model, "model"), tokenizer, tmp)
        for case in cases:
            prompt, samples, n = {"gpt2_1": ("Hello, world", 1, 200), "gpt2_8": ("the" + " the" * 511, 8, 200)}[case]
            assert len(tokenizer.encode(prompt)) in (3, 512)
            ours = [sys.executable, "-m", "parallel_gpt.evaluate", f"--init_from={tmp}", "--prompt", prompt,
                    "--max_new_tokens", str(n), "--top_k", "1", "--num_samples", str(samples),
                    f"--compilation_cache={cache}"]
            cmds = {"ours": ours, "ours, compiling": ours[:-1] + ["--compilation_cache=off"],
                    "transformers": [sys.executable, "-c", HF_SCRIPT, tmp, prompt, str(n), str(samples)]}
            subprocess.run(ours, check=True, capture_output=True)  # fills the compilation cache, as a first run does
            times = {k: [] for k in cmds}
            for _ in range(rounds):
                for k, cmd in cmds.items():
                    t = time.perf_counter()
                    subprocess.run(cmd, check=True, capture_output=True)
                    times[k].append(time.perf_counter() - t)
            rate = {k: n * samples / statistics.median(v) for k, v in times.items()}
            print(f"whole command, batch {samples}, prompt {len(tokenizer.encode(prompt))}, {n} new: "
                  + ", ".join(f"{k} {r:.1f} tok/s ({statistics.median(times[k]):.1f} s)" for k, r in rate.items())
                  + "; ours / transformers " + ", ".join(f"{rate[k] / rate['transformers']:.2f}x ({k})"
                                                          for k in ("ours", "ours, compiling")), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--commands", nargs="*", default=[], choices=["gpt2_1", "gpt2_8"],
                    help="also time whole evaluate commands at these cases")
    ap.add_argument("--profile", action="store_true",
                    help="instead of timing, trace 20 decode steps of each case and sum the ops by kind")
    args = ap.parse_args()
    if args.profile:
        for case in args.cases:
            profile(case)
        return
    try:
        import transformers  # noqa: F401
        have_transformers = True
    except ImportError:
        have_transformers = False
    bw = bandwidth()
    print(f"{jax.devices()[0].platform}; medians of {args.rounds} alternating rounds; greedy; memory bandwidth "
          f"(256 MiB copy, read + written) {bw / 1e9:.1f} GB/s", flush=True)
    for case in args.cases:
        measure(case, args.rounds, have_transformers and CASES[case][0] == "gpt2", bw, jnp.dtype(args.dtype))
    if args.commands and have_transformers:
        commands(args.rounds, args.commands)


if __name__ == "__main__":
    main()
