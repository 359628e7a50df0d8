"""Throughput and memory of `python -m parallel_gpt.prepare`, side by side with a plain loop.

    python benchmarks/prepare.py [--mb 256] [--rounds 2] [--gpt2_step]

Generates a corpus of `--mb` MiB (text files of ~1 MiB documents drawn from a seeded word
list), then in alternating rounds, each in a fresh process: our prepare with 1 worker and
with every core, and the plain single-process loop nanoGPT's prepare.py amounts to
(`tiktoken` `encode_ordinary_batch` over the documents, every id kept in memory, then
written to one file). Reports MB/s, tokens/s and peak RSS of each (medians over rounds;
with workers, the largest worker's peak too: its rusage, which also counts the process
that started it as it was then, before any text was read). Then the host time to build one batch of
8 x 1024 tokens from the memory-mapped result, and with --gpt2_step its share of one
GPT-2 small training step on this machine's devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will can more about up said "
         "into them time only new some could these two may first then do any like my now over such our man me "
         "even most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long "
         "get here between both life being under never day same another know while last might us great old year "
         "naïve café 1984 3.14 don't it's (see above) \"quoted\" -- well, yes; no! why?").split()

RUNNER = """
import json, resource, sys, time
mode, out, files = sys.argv[1], sys.argv[2], sys.argv[3:]
t = time.perf_counter()
if mode == "plain":
    import numpy as np, tiktoken
    from parallel_gpt.tokenizers import gpt2_encoding
    enc = gpt2_encoding()
    ids = []
    for path in files:
        for doc_ids in enc.encode_ordinary_batch([open(path, encoding="utf-8").read()]):
            ids.extend(doc_ids)
            ids.append(enc.eot_token)
    np.array(ids, np.uint16).tofile(out)
    tokens = len(ids)
else:
    from parallel_gpt import prepare
    prepare.prepare(files, out, "gpt2", workers=int(mode), val_fraction=0.05)
    meta = json.load(open(out + "/meta.json"))
    tokens = meta["train_tokens"] + meta["val_tokens"]
seconds = time.perf_counter() - t
# This process's own peak (VmHWM): its rusage would also count the benchmark that started it.
hwm_kib = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
print(json.dumps({"seconds": seconds, "tokens": tokens, "rss_mib": hwm_kib / 1024,
                  "children_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def make_corpus(folder: Path, mib: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = np.array(WORDS)
    files = []
    for i in range(mib):
        n = int(rng.integers(120_000, 230_000))  # ~1 MiB of text
        text = " ".join(words[rng.integers(0, len(words), n)])
        text = text.replace(" man ", " man.\n").replace(" day ", " day.\n\n")
        path = folder / f"doc{i:05d}.txt"
        path.write_text(text[: 1 << 20])
        files.append(str(path))
    return files


def run(mode: str, out: str, files: list[str]) -> dict:
    result = subprocess.run([sys.executable, "-c", RUNNER, mode, out, *files], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"error: {mode} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=256, help="corpus size in MiB")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gpt2_step", action="store_true", help="also time one GPT-2 small step (slow on a CPU)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        files = make_corpus(tmp / "corpus", args.mb)
        size = sum(os.path.getsize(f) for f in files)
        modes = {"prepare, 1 worker": "1", f"prepare, {cores} workers": str(cores), "plain tiktoken loop": "plain"}
        results = {name: [] for name in modes}
        for r in range(args.rounds):
            for name, mode in modes.items():
                out = str(tmp / f"out-{r}-{mode}")
                results[name].append(run(mode, out, files))
        print(f"corpus: {size / 2**20:.0f} MiB in {len(files)} documents; {cores} cores; "
              f"medians of {args.rounds} alternating rounds")
        print(f"{'':24} {'MB/s':>8} {'Mtokens/s':>10} {'peak RSS MiB':>13} {'worker RSS MiB':>15}")
        for name, rs in results.items():
            s = statistics.median(r["seconds"] for r in rs)
            worker = f"{max(r['children_rss_mib'] for r in rs):15.0f}" if modes[name] not in ("1", "plain") else ""
            print(f"{name:24} {size / 1e6 / s:8.1f} {rs[0]['tokens'] / 1e6 / s:10.2f} "
                  f"{max(r['rss_mib'] for r in rs):13.0f} {worker}")
        batch_time(str(tmp / "out-0-1"), args.gpt2_step)


def batch_time(prepared: str, gpt2_step: bool):
    from parallel_gpt.data import DataLoader, load_corpus

    corpus = load_corpus(prepared)
    corpus = dataclasses.replace(corpus, val=corpus.train)  # batch() reads train only; a small run may have no val
    loader = DataLoader(corpus, block_size=1024, batch_size=8, seed=0)
    loader.batch(0)
    times = []
    for step in range(1, 201):
        t = time.perf_counter()
        loader.batch(step)
        times.append(time.perf_counter() - t)
    host = statistics.median(times)
    print(f"host time to build a batch of 8 x 1024 from the memory map: {host * 1e3:.2f} ms (median of 200)")
    if gpt2_step:
        step = gpt2_small_step(loader)
        print(f"one GPT-2 small step (batch 8 x 1024) on this machine: {step:.2f} s; the batch is "
              f"{100 * host / step:.2g}% of it")


def gpt2_small_step(loader) -> float:
    import jax

    from parallel_gpt import parallel
    from parallel_gpt.model import GPT, GPTConfig
    from parallel_gpt.optim import AdamHParams

    mesh = parallel.make_layout(8, 1, 1)
    config = GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, vocab_size=50304)
    config = config.for_platform(mesh.devices.flat[0].platform, np.dtype("float32"))
    dp = parallel.DataParallel(mesh, hp=AdamHParams())
    state = dp.place(GPT.create(config, key=jax.random.key(0)))
    state, m = dp.step(state, *dp.batch(*loader.batch(0)))  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    state, m = dp.step(state, *dp.batch(*loader.batch(1)))
    jax.block_until_ready(m)
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
