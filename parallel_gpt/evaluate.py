"""`python -m parallel_gpt.evaluate --prompt TEXT`: sample from a run's newest checkpoint or a
Hugging Face GPT-2 directory (`generate.generate`: prefill and KV-cache decoding)."""

from __future__ import annotations

import argparse
import math
import sys

import jax
import jax.numpy as jnp

from parallel_gpt import checkpoint, hf, runstate, runtime
from parallel_gpt.errors import ConfigError, run_cli
from parallel_gpt.generate import generate
from parallel_gpt.model import GPT

MAX_TOKENS = 2**28
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(out_dir: str, report=print, dtype=jnp.float32) -> tuple[GPT, object, dict]:
    """The model (weights cast to `dtype`, kernels chosen for JAX's default backend and that
    dtype), tokenizer and metadata of the newest valid checkpoint in `out_dir`;
    CheckpointError (one line) when there is none this version can read."""
    arrays, meta, config, tokenizer = runstate.read_newest(out_dir, report)
    config = config.for_platform(jax.default_backend(), dtype)
    model = checkpoint.unflatten(GPT.shapes(config), "model", arrays)
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), model), tokenizer, meta


def load_hf_model(path: str, dtype=jnp.float32) -> tuple[GPT, object]:
    """The model (weights cast to `dtype`, kernels chosen for JAX's default backend and that
    dtype) and tokenizer of a Hugging Face GPT-2 directory; HFError (one line) for one this
    version cannot load."""
    hf.check_dir(path, "--init_from")
    config = hf.model_config(path).for_platform(jax.default_backend(), dtype)
    model = hf.load_model(path, config, GPT.shapes(config))
    return jax.tree.map(lambda a: jnp.asarray(a, dtype), model), hf.tokenizer(path)


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel_gpt.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompt", required=True, help="text to continue, encoded with the checkpoint's tokenizer "
                                                    "(character-level: every character must be in the vocabulary)")
    ap.add_argument("--out_dir", default="out", help="the training run's out_dir (default: out)")
    ap.add_argument("--init_from", default=None, help="sample from a Hugging Face GPT-2 directory instead")
    ap.add_argument("--max_new_tokens", type=int, default=500)
    ap.add_argument("--num_samples", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus: sample from the ids holding this much mass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32",
                    help="float32, or bfloat16: weights (kept float32 in checkpoints), cache and activations cast "
                         "once at load; half the bytes a decode step reads, for accelerators (README, Sampling)")
    ap.add_argument("--compilation_cache", default="auto",
                    help="JAX's persistent compilation cache: auto (~/.cache/parallel_gpt/xla), off, or a directory")
    args = ap.parse_args(argv)
    runtime.use_compilation_cache(args.compilation_cache)
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--max_new_tokens and --num_samples must be >= 1")
    # The samples' ids are held in one int32 array: this bound keeps it under 4 GiB.
    if args.max_new_tokens * args.num_samples > MAX_TOKENS:
        raise ConfigError(f"--max_new_tokens x --num_samples = {args.max_new_tokens * args.num_samples:,} is more "
                          f"than {MAX_TOKENS:,} tokens: sample less in one call")
    if not all(math.isfinite(v) for v in (args.temperature, args.top_p)):
        raise ConfigError("--temperature and --top_p must be finite numbers")
    if not 0 <= args.seed < 2**31:
        raise ConfigError(f"--seed={args.seed} must be in [0, 2**31)")
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype={args.dtype}: use one of {', '.join(DTYPES)}")
    dtype = DTYPES[args.dtype]
    if args.init_from:
        model, tokenizer = load_hf_model(args.init_from, dtype)
    else:
        model, tokenizer, _ = load_model(args.out_dir, report=lambda m: print(m, file=sys.stderr), dtype=dtype)
    shown = []  # a single sample is printed as it is produced, after the inputs were checked

    def show(new):
        print(("" if shown else args.prompt) + new[0], end="", flush=True)
        shown.append(True)

    texts = generate(model, tokenizer, [args.prompt] * args.num_samples, args.max_new_tokens, args.temperature,
                     args.top_k, args.top_p, args.seed, stream=show if args.num_samples == 1 else None)
    if shown:
        print()
    else:
        print("\n---------------\n".join(texts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
