"""`train(model, dataloader, tconf)` and the `python -m parallel_gpt.train` command.

    python -m parallel_gpt.train [--preset NAME] [--key=value ...]

Without --preset the defaults are sized for the backend found: `cpu` on a CPU (a few
minutes), `shakespeare_char` (nanoGPT's) on GPUs and TPUs. Exit codes: 0 done, 2 bad input
(one line on stderr says what to change), 3 stopped after `max_nonfinite` consecutive
non-finite updates, 75 interrupted by SIGTERM/SIGINT after saving a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from parallel_gpt import checkpoint, parallel, perf, runstate
from parallel_gpt.checkpoint import fault_point
from parallel_gpt.config import ConfigError, TrainConfig, default_preset, make_config, parse_overrides
from parallel_gpt.data import DataError, DataLoader, load_corpus
from parallel_gpt.evaluate import generate
from parallel_gpt.metrics import Reporter
from parallel_gpt.model import GPT
from parallel_gpt.optim import AdamState, adam_init
from parallel_gpt.runtime import is_main_process, keep_freed_memory, print0

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 75


class NonFiniteError(RuntimeError):
    pass


class Interrupted(Exception):
    pass


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop reads once per step; a second one exits at once."""

    def __init__(self):
        self.requested = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        if is_main_process():  # os.write, not print: the signal may land inside a print
            os.write(sys.stdout.fileno(), f"\n{self.requested} received: finishing this step and saving a checkpoint "
                                          f"(send again to exit now)\n".encode())

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class NonFiniteCounter:
    """Counts consecutive skipped (non-finite) updates; raises NonFiniteError at the limit."""

    def __init__(self, limit: int):
        self.limit, self.consecutive = limit, 0

    def check(self, flags: list[int], step: int):
        for f in flags:
            self.consecutive = self.consecutive + 1 if f else 0
            if self.consecutive >= self.limit:
                raise NonFiniteError(
                    f"{self.consecutive} consecutive non-finite updates (loss or gradient norm) at step {step}: "
                    f"lower learning_rate or check the data; the newest checkpoint is the last good state")


def estimate_loss(peval, model, dataloader, mesh, eval_iters: int) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split (one host sync at the end)."""
    losses = {split: [peval(model, *(parallel.shard_batch(a, mesh) for a in dataloader.eval_batch(split, i)))
                      for i in range(eval_iters)] for split in ("train", "val")}
    return {split: float(np.mean(jax.device_get(v))) for split, v in losses.items()}


def train(model: GPT, dataloader: DataLoader, tconf: TrainConfig, *, mesh: Mesh | None = None,
          opt_state: AdamState | None = None, start_step: int = 0):
    """Train `model` from update `start_step` to `tconf.max_iters`; returns (model, opt_state).

    Batch `step` of `dataloader` feeds update `step`, so a run resumed from a checkpoint at
    step s replays exactly what an uninterrupted run would have done after s. `mesh`
    defaults to `parallel.make_layout` of tconf's batch over tconf's devices.
    """
    if mesh is None:
        mesh = parallel.make_layout(tconf.batch_size, tconf.grad_accum, tconf.devices)
    dtype = jnp.dtype(tconf.dtype)
    pstep = parallel.pmap_step(mesh, hp=tconf.optim, seed=tconf.seed, grad_accum=tconf.grad_accum, dtype=dtype)
    peval = parallel.pmap_eval(mesh, dtype=dtype)
    model = parallel.replicate(model, mesh)
    opt_state = parallel.replicate(opt_state if opt_state is not None else adam_init(model), mesh)
    place = lambda s: tuple(parallel.shard_batch(a, mesh) for a in dataloader.batch(s))  # noqa: E731

    tokens_per_step = tconf.batch_size * model.config.block_size
    reporter = Reporter(Path(tconf.out_dir), start_step, tconf.max_iters, tokens_per_step, model.flops_per_token(),
                        perf.peak_flops(mesh.devices.flat, tconf.dtype))
    nonfinite = NonFiniteCounter(tconf.max_nonfinite)
    print0(f"{model.num_params() / 1e6:.2f}M parameters, {mesh.size} {mesh.devices.flat[0].platform} device(s), "
           f"{tokens_per_step:,} tokens per step, steps {start_step} -> {tconf.max_iters}")

    batch = place(start_step) if start_step < tconf.max_iters else None
    with StopSignals() as signals, contextlib.closing(reporter):
        for step in range(start_step + 1, tconf.max_iters + 1):
            model, opt_state, metrics = pstep(model, *batch, opt_state)
            fault_point(f"step_{step}")
            if step < tconf.max_iters:
                batch = place(step)  # the next batch is built and placed while this step runs
            reporter.add(metrics)
            # Read once: a signal that lands later in this step is acted on at the next,
            # so a step that stops has always saved.
            stop = signals.requested
            last = step == tconf.max_iters
            evaluate = step % tconf.eval_interval == 0 or last
            save = step % tconf.ckpt_interval == 0 or last or stop is not None

            # Metrics reach the host only here; also before evaluating or saving, so that a
            # run that only skips non-finite updates stops before it writes a checkpoint.
            if step % tconf.log_interval == 0 or evaluate or save:
                fault_point(f"fetch_{step}")
                nonfinite.check(reporter.report(step), step)
            with reporter.paused():
                if evaluate:
                    fault_point(f"eval_{step}")
                    reporter.evaluation(step, estimate_loss(peval, model, dataloader, mesh, tconf.eval_iters))
                if save:
                    reporter.flush()
                    runstate.save_checkpoint(tconf, step, model, opt_state, dataloader.corpus.tokenizer)
            if stop is not None:
                raise Interrupted(f"stopped by {stop} at step {step}; checkpoint saved: run the same command to resume")
    return model, opt_state


def main(argv=None) -> int:
    keep_freed_memory()  # before JAX starts its CPU threads
    argv = sys.argv[1:] if argv is None else argv
    try:
        preset, overrides = parse_overrides(argv)
        tconf = make_config(preset or default_preset(jax.default_backend()), overrides)
        corpus = load_corpus(tconf.dataset)
        dataloader = DataLoader(corpus, tconf.model.block_size, tconf.batch_size, tconf.seed,
                                jax.process_index(), jax.process_count())
        # The mesh, once: a bad device layout fails here, before out_dir is touched.
        mesh = parallel.make_layout(tconf.batch_size, tconf.grad_accum, tconf.devices)
        if is_main_process():
            runstate.check_writable(tconf.out_dir)
        model, opt_state, start = runstate.init_or_resume(tconf, corpus.tokenizer, mesh.devices.flat[0].platform)
        print0(f"config: {json.dumps(tconf.to_flat())}")
        print0(f"kernels: attention={model.config.attention}, layernorm_backward={model.config.layernorm_backward}")
        model, _ = train(model, dataloader, tconf, mesh=mesh, opt_state=opt_state, start_step=start)
    except (ConfigError, DataError, parallel.ParallelError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted as e:
        print0(str(e))
        return EXIT_INTERRUPTED
    if tconf.sample_tokens and is_main_process():
        host_model = jax.device_get(model)
        print("sample:\n" + generate(host_model, corpus.tokenizer, "\n", tconf.sample_tokens, seed=tconf.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
