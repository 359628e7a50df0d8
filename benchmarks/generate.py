"""Generation speed: KV-cache decoding against the recompute path, and against transformers.

    python benchmarks/generate.py [--rounds 3] [--shapes shakespeare_char gpt2] [--batches 1 8]

For each model shape (random weights) and batch: the same prompts (half a window long)
continued greedily by `generate.decode` (prefill done, cache filled) and by
`generate.decode_recompute` (the whole window per token), in alternating rounds in one
process; tokens/s is new tokens x batch / seconds, prefill included, the median over
rounds (the cached run's prefill and decoding are also reported apart). With
transformers installed (the bench extra), the GPT-2 shape is also run through
`GPT2LMHeadModel.generate` with its cache on the same weights (exported with
`hf.export`), same prompt, same number of new tokens, alternating with ours.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from parallel_gpt import checkpoint, hf
from parallel_gpt.generate import decode, decode_recompute, prefill
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.tokenizers import GPT2Tokenizer

SHAPES = {  # (config, new tokens for the cache, new tokens for the recompute path)
    "shakespeare_char": (GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=256, vocab_size=128, vocab_tokens=65,
                                   dropout=0.0), 64, 16),
    "gpt2": (GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, vocab_tokens=50257,
                       dropout=0.0), 16, 2),
}


def timed(fn) -> float:
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def measure(name: str, batch: int, rounds: int, with_transformers: bool):
    config, n_cached, n_recompute = SHAPES[name]
    config = config.for_platform(jax.default_backend())
    model = GPT.create(config, key=jax.random.key(0))
    T, P = config.block_size, config.block_size // 2
    prompts = np.random.default_rng(0).integers(0, config.vocab_tokens, (batch, P)).astype(np.int32)
    window = jnp.asarray(np.pad(prompts, ((0, 0), (0, T - P))))
    lengths = jnp.full((batch,), P, jnp.int32)
    key = jax.random.key(0)
    buffer = np.pad(prompts, ((0, 0), (0, T + n_cached - P)))  # one shape for every call: one compile each

    def cached(n, parts=None):
        t = time.perf_counter()
        cache, logits = jax.block_until_ready(prefill(model, window, lengths))
        if parts is not None:
            parts.append(time.perf_counter() - t)
        return decode(model, cache, logits, jnp.asarray(buffer), lengths, lengths, n, 0, key, 0.0, 1.0, top_k=None)[2]

    def recompute(n):
        tokens = jnp.asarray(buffer)
        return decode_recompute(model, tokens, lengths, n, 0, key, 0.0, 1.0, top_k=None)[0]

    # The same greedy tokens both ways, and a warm start (compiled) for each.
    np.testing.assert_array_equal(np.asarray(cached(n_recompute))[:, :P + n_recompute],
                                  np.asarray(recompute(n_recompute))[:, :P + n_recompute])
    prefill_s = []  # the prefill's part of each cached run
    runs = {"cache": (lambda n: cached(n, prefill_s), n_cached), "recompute": (recompute, n_recompute)}
    if with_transformers:
        runs["transformers (cache)"] = transformers_runner(model, prompts, n_cached)
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, (fn, n) in runs.items():
            times[k].append(timed(lambda: fn(n)))
    rate = {k: runs[k][1] * batch / statistics.median(v) for k, v in times.items()}
    decode_s = statistics.median(t - p for t, p in zip(times["cache"], prefill_s))
    line = ", ".join(f"{k} {r:,.1f} tok/s" for k, r in rate.items())
    print(f"{name:17} batch {batch}: {line}; cache / recompute {rate['cache'] / rate['recompute']:.1f}x; "
          f"of the cached run: prefill {statistics.median(prefill_s):.2f} s, decoding alone "
          f"{n_cached * batch / decode_s:,.1f} tok/s")


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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = ap.parse_args()
    try:
        import transformers  # noqa: F401
        have_transformers = True
    except ImportError:
        have_transformers = False
    print(f"{jax.devices()[0].platform}; medians of {args.rounds} alternating rounds; greedy; prompts of "
          f"block_size / 2 tokens")
    for name in args.shapes:
        for batch in args.batches:
            measure(name, batch, args.rounds, have_transformers and name == "gpt2")


if __name__ == "__main__":
    main()
