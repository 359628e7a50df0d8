"""Sampling: `generate()` and the `python -m parallel_gpt.evaluate --prompt TEXT` CLI."""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from parallel_gpt import checkpoint, hf, runstate
from parallel_gpt.tokenizers import DataError
from parallel_gpt.model import GPT


@functools.partial(jax.jit, static_argnames=("max_new_tokens", "vocab_size", "top_k"))
def _sample(model, tokens, length, key, temperature, *, max_new_tokens, vocab_size, top_k):
    """Extend tokens[:length] by max_new_tokens ids, one compiled loop for any prompt length.

    `tokens` is a buffer of at least block_size + max_new_tokens ids; each step runs the
    model on the block_size window that ends at the last token (padding to the right of it
    cannot influence it: attention is causal) and samples the next id.
    """
    T = model.config.block_size

    def body(i, carry):
        tokens, key = carry
        n = length + i  # tokens so far
        start = jnp.maximum(n - T, 0)
        window = jax.lax.dynamic_slice(tokens, (start,), (T,))[None]  # (1, T)
        logits = model(window)[0, n - 1 - start, :vocab_size] / temperature  # (V,), padding ids excluded
        if top_k is not None:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        key, sub = jax.random.split(key)
        next_id = jax.random.categorical(sub, logits).astype(tokens.dtype)
        return tokens.at[n].set(next_id), key

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, body, (tokens, key))
    return tokens


def generate(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 500,
             temperature: float = 0.8, top_k: int | None = None, seed: int = 0) -> str:
    """The prompt followed by `max_new_tokens` sampled tokens, decoded with `tokenizer`."""
    if not prompt:
        raise DataError("the prompt is empty: pass at least one character, e.g. --prompt 'ROMEO:'")
    if temperature <= 0:
        raise DataError(f"temperature={temperature} must be > 0")
    if top_k is not None and not 1 <= top_k <= tokenizer.vocab_size:
        raise DataError(f"top_k={top_k} must be between 1 and the vocabulary size {tokenizer.vocab_size}")
    ids = tokenizer.encode(prompt)
    T = model.config.block_size
    buf = np.zeros(max(len(ids), T) + max_new_tokens, np.int32)
    buf[: len(ids)] = ids
    out = _sample(model, jnp.asarray(buf), len(ids), jax.random.key(seed), temperature,
                  max_new_tokens=max_new_tokens, vocab_size=tokenizer.vocab_size, top_k=top_k)
    return tokenizer.decode(np.asarray(out)[: len(ids) + max_new_tokens])


def load_model(out_dir: str, report=print) -> tuple[GPT, object, dict]:
    """The model (kernels chosen for JAX's default backend), tokenizer and metadata of the
    newest valid checkpoint in `out_dir`; CheckpointError (one line) when there is none
    this version can read."""
    found = checkpoint.load_latest(out_dir, report=report)
    if found is None:
        raise checkpoint.CheckpointError(
            f"no checkpoint in {out_dir!r}: train one first with `python -m parallel_gpt.train --out_dir={out_dir}`")
    arrays, meta = found
    where = f"the checkpoint of step {meta.get('step')} in {out_dir!r}"
    meta = runstate.read_meta(meta, where)
    tokenizer = runstate.read_tokenizer(meta, where)
    config = runstate.read_model_config(meta, where).for_platform(jax.default_backend())
    template = jax.eval_shape(lambda: GPT.create(config, key=jax.random.key(0)))
    model = checkpoint.unflatten(template, "model", arrays)
    return jax.tree.map(jnp.asarray, model), tokenizer, meta


def load_hf_model(path: str) -> tuple[GPT, object]:
    """The model (kernels chosen for JAX's default backend) and tokenizer of a Hugging Face
    GPT-2 directory; HFError (one line) for one this version cannot load."""
    config = hf.model_config(path).for_platform(jax.default_backend())
    template = jax.eval_shape(lambda: GPT.create(config, key=jax.random.key(0)))
    return jax.tree.map(jnp.asarray, hf.load_model(path, config, template)), hf.tokenizer(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel_gpt.evaluate", description=__doc__)
    ap.add_argument("--prompt", required=True, help="text to continue, encoded with the checkpoint's tokenizer "
                                                    "(character-level: every character must be in the vocabulary)")
    ap.add_argument("--out_dir", default="out", help="the training run's out_dir (default: out)")
    ap.add_argument("--init_from", default=None, help="sample from a Hugging Face GPT-2 directory instead")
    ap.add_argument("--max_new_tokens", type=int, default=500)
    ap.add_argument("--temperature", type=float, default=0.8)
    ap.add_argument("--top_k", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        print("error: --max_new_tokens must be >= 1", file=sys.stderr)
        return 2
    try:
        if args.init_from:
            model, tokenizer = load_hf_model(args.init_from)
        else:
            model, tokenizer, _ = load_model(args.out_dir, report=lambda m: print(m, file=sys.stderr))
        text = generate(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed)
    except (checkpoint.CheckpointError, DataError, hf.HFError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
