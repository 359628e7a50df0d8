"""What the benchmark scripts share: the model config of a benchmark shape, synthetic data,
and timing of compiled steps in alternating rounds, with a guard against compiling while timed.

The scripts run as `python benchmarks/<script>.py`, which puts benchmarks/ on sys.path:
they import this module as `common`.
"""

from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from parallel_gpt.data import Corpus, DataLoader
from parallel_gpt.tokenizers import CharTokenizer
from parallel_gpt.model import GPTConfig, pad_vocab

SYNTHETIC_TOKENS = 1 << 20  # train split length: 1M random ids, ~2 MB, made in milliseconds
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # recorded by JAX for each XLA compile


class CompileCounter:
    """Counts XLA compilations, so that a timed step that recompiles is caught, not reported."""

    def __init__(self):
        self.count = 0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event, duration, **kwargs):
        self.count += event == BACKEND_COMPILE_EVENT


COMPILES = CompileCounter()


def model_config(n_layer: int, n_head: int, n_embd: int, block_size: int, vocab_size: int,
                 platform: str | None, dtype, remat: str = "none") -> GPTConfig:
    """The GPTConfig of a benchmark shape, built as training builds it: the tokenizer's
    `vocab_size` padded with `pad_vocab`, and the backend settings resolved for `platform`
    devices computing activations in `dtype`. No dropout: the steps compared must do the same work.

    `platform` None leaves the settings "auto": enough to check the shape (ValueError)
    before any device is chosen, not to build a model.
    """
    config = GPTConfig(block_size=block_size, vocab_size=pad_vocab(vocab_size), n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, dropout=0.0, remat=remat)
    return config if platform is None else config.for_platform(platform, dtype)


def synthetic_loader(vocab_size: int, block_size: int, batch_size: int) -> DataLoader:
    """The training DataLoader over uniform random token ids of a `vocab_size` vocabulary."""
    rng = np.random.default_rng(0)
    train = rng.integers(0, vocab_size, SYNTHETIC_TOKENS, dtype=np.uint16)
    val = rng.integers(0, vocab_size, block_size + 1, dtype=np.uint16)
    tokenizer = CharTokenizer("".join(map(chr, range(vocab_size))))  # never used to encode or decode
    return DataLoader(Corpus(train, val, tokenizer, "synthetic", "synthetic"), block_size, batch_size, seed=0)


class Runner:
    """One compiled step with its own state; batches are numbered on from where it stopped.

    `step(state, xb, yb) -> (state, metrics)` and `lower(state, xb, yb)`: a
    `parallel.DataParallel`'s `step` and `lower`, or a jitted function and its `lower`;
    `place(i)` makes and places batch i."""

    def __init__(self, step, lower, state, place):
        self.step, self.lower, self.state, self.place, self.next_batch = step, lower, state, place, 0

    def compile(self) -> float:
        """Seconds to trace, lower and compile the step ahead of time."""
        t = time.perf_counter()
        self.lower(self.state, *self.place(0)).compile()
        return time.perf_counter() - t

    def run(self, n: int) -> float:
        """Wall seconds of `n` steps, each next batch made and placed while the step runs."""
        batch = self.place(self.next_batch)
        jax.block_until_ready((self.state, batch))
        t = time.perf_counter()
        for i in range(self.next_batch, self.next_batch + n):
            self.state, _ = self.step(self.state, *batch)
            batch = self.place(i + 1)
        jax.block_until_ready(self.state)
        elapsed = time.perf_counter() - t
        self.next_batch += n
        return elapsed


def time_alternating(runners: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """{name: seconds per step in each round}. The runners alternate round by round, so that
    load from other processes hits them all alike, and each round starts with the next
    runner, so that none is always first; a JAX compilation while timing is an error."""
    per_step = {name: [] for name in runners}
    names = list(runners)
    compiled_before = COMPILES.count
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_step[name].append(runners[name].run(steps) / steps)
    if COMPILES.count > compiled_before:
        raise RuntimeError(f"{COMPILES.count - compiled_before} JAX compilation(s) during the timed steps: "
                           f"the step times are not steady state")
    return per_step


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    """Median over rounds of numerator / denominator. Each round's times were taken back to
    back, so their ratios are steadier than the ratio of the medians when the load drifts."""
    return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))
