"""`train(model, dataloader, tconf)` and the `python -m parallel_gpt.train` command.

    python -m parallel_gpt.train [--preset NAME] [--key=value ...]

Without --preset the defaults are sized for the backend found: `cpu` on a CPU (a few
minutes), `shakespeare_char` (nanoGPT's) on GPUs and TPUs. The same command runs on many
processes (`launch/`): each joins the group first (`runtime.start_processes`).

Exit codes: 0 done; 2 bad input (one line on stderr says what to change); 3 stopped after
`max_nonfinite` consecutive non-finite updates; 75 interrupted by SIGTERM/SIGINT after
saving a checkpoint; 76 a process of the group died, was stuck or never joined. After 75
and 76 the same command resumes from the newest checkpoint.
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

from parallel_gpt import checkpoint, hf, parallel, perf, runstate, runtime, wandb_log
from parallel_gpt.faults import fault_point
from parallel_gpt.config import (ConfigError, TrainConfig, default_preset, make_config, parse_overrides,
                                 process_config)
from parallel_gpt.data import DataError, DataLoader, load_corpus
from parallel_gpt.generate import generate
from parallel_gpt.metrics import Reporter
from parallel_gpt.model import GPT
from parallel_gpt.profile import StepTrace
from parallel_gpt.optim import AdamState, adam_init
from parallel_gpt.runtime import Watchdog, is_main_process, keep_freed_memory, print0

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 75
EXIT_PEER = runtime.EXIT_PEER  # a process of the group never joined or was stuck (runtime.exit_now)


class NonFiniteError(RuntimeError):
    pass


class Interrupted(Exception):
    pass


class StopSignals:
    """SIGTERM/SIGINT set `signum`, which the loop hands to each step (`parallel.step`'s
    `stop`); a second signal exits at once."""

    def __init__(self):
        self.signum = 0

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        if is_main_process():  # os.write, not print: the signal may land inside a print
            os.write(sys.stdout.fileno(), f"\n{signal.Signals(signum).name} received: finishing a step and saving a "
                                          f"checkpoint (send again to exit now)\n".encode())

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
                        perf.peak_flops(mesh.devices.flat, tconf.dtype), wandb_log.settings(tconf, model.config))
    nonfinite = NonFiniteCounter(tconf.max_nonfinite)
    trace = StepTrace(Path(tconf.out_dir), tconf.profile_from, tconf.profile_steps, tconf.profile_all_processes)
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    print0(f"{model.num_params() / 1e6:.2f}M parameters, {mesh.size} {mesh.devices.flat[0].platform} device(s)"
           f"{processes}, "
           f"{tokens_per_step:,} tokens per step, steps {start_step} -> {tconf.max_iters}")

    stop_requests = {}  # signal number -> its `stop` input, placed once
    agreed_stop = None  # the previous step's metrics["stop"]: the stop agreed by every process
    batch = place(start_step) if start_step < tconf.max_iters else None
    with StopSignals() as signals, Watchdog(tconf.process.step_timeout) as watchdog, contextlib.closing(reporter), \
            contextlib.closing(trace):
        for step in range(start_step + 1, tconf.max_iters + 1):
            watchdog.phase(f"step {step}", step=True)
            if signals.signum not in stop_requests:
                stop_requests[signals.signum] = parallel.stop_requests(signals.signum, mesh)
            trace.before(step)
            model, opt_state, metrics = pstep(model, *batch, opt_state, stop_requests[signals.signum])
            trace.after(step, metrics)
            fault_point(f"step_{step}")
            if step < tconf.max_iters:
                batch = place(step)  # the next batch is built and placed while this step runs
            reporter.add(metrics)
            # Act on the stop agreed in the previous step: reading it waits for that step
            # only, not this one, and every process reads the same value here, so all of
            # them save this step and stop together. A signal that lands after this step's
            # `stop` input was placed is agreed in the next step.
            watchdog.phase(f"waiting for step {step - 1}")
            stop = int(agreed_stop) if agreed_stop is not None else 0
            agreed_stop = metrics["stop"]
            last = step == tconf.max_iters
            evaluate = step % tconf.eval_interval == 0 or last
            save = step % tconf.ckpt_interval == 0 or last or stop

            # Metrics reach the host only here; also before evaluating or saving, so that a
            # run that only skips non-finite updates stops before it writes a checkpoint.
            if step % tconf.log_interval == 0 or evaluate or save:
                watchdog.phase(f"waiting for the metrics of step {step}")
                fault_point(f"fetch_{step}")
                nonfinite.check(reporter.report(step), step)
            with reporter.paused():
                if evaluate:
                    watchdog.phase(f"waiting for the evaluation at step {step}")
                    fault_point(f"eval_{step}")
                    reporter.evaluation(step, estimate_loss(peval, model, dataloader, mesh, tconf.eval_iters))
                if save:
                    watchdog.phase(f"writing checkpoint {step}")
                    reporter.flush()
                    runstate.save_checkpoint(tconf, step, model, opt_state, dataloader.corpus.tokenizer)
                    # No process runs ahead of a checkpoint that process 0 is still writing.
                    watchdog.phase(f"waiting at the barrier after checkpoint {step}")
                    runtime.barrier(f"checkpoint {step}")
            if stop:
                raise Interrupted(f"stopped by {signal.Signals(stop).name} at step {step}; checkpoint saved: "
                                  f"run the same command to resume")
    return model, opt_state


def main(argv=None) -> int:
    keep_freed_memory()  # before JAX starts its CPU threads
    argv = sys.argv[1:] if argv is None else argv
    try:
        preset, overrides = parse_overrides(argv)
        group = runtime.start_processes(process_config(overrides))  # before any other JAX call
        if group:
            print0(f"{jax.process_count()} processes ({group})")
        tconf = make_config(preset or default_preset(jax.default_backend()), overrides)
        corpus = load_corpus(tconf.dataset, tconf.tokenizer)
        if hf.is_hf_dir(tconf.init_from):  # the model's shape is the checkpoint's
            tconf = TrainConfig.from_flat(hf.adopt(tconf.to_flat(), tconf.init_from, corpus.tokenizer.vocab_size))
        # The mesh, once: a bad device layout fails here, before out_dir is touched.
        mesh = parallel.make_layout(tconf.batch_size, tconf.grad_accum, tconf.devices)
        settings = {k: v for k, v in tconf.to_flat().items() if k != "process_id"}
        runtime.check_agreement({**settings, "dataset fingerprint": corpus.fingerprint,
                                 "devices per process": len(mesh.local_devices)})
        dataloader = DataLoader(corpus, tconf.model.block_size, tconf.batch_size, tconf.seed,
                                jax.process_index(), jax.process_count())
        runtime.on_process_0(runstate.check_writable, tconf.out_dir)
        model, opt_state, start = runstate.init_or_resume(tconf, corpus.tokenizer, mesh.devices.flat[0].platform)
        runtime.check_agreement({"start step": start})
        print0(f"config: {json.dumps(tconf.to_flat())}")
        print0(f"kernels: attention={model.config.attention}, layernorm_backward={model.config.layernorm_backward}")
        model, _ = train(model, dataloader, tconf, mesh=mesh, opt_state=opt_state, start_step=start)
    except (ConfigError, DataError, parallel.ParallelError, checkpoint.CheckpointError, runtime.ProcessSetupError,
            hf.HFError) as e:
        return _fail(EXIT_BAD_INPUT, e)
    except NonFiniteError as e:
        return _fail(EXIT_NONFINITE, e)
    except Interrupted as e:
        print0(str(e))
        runtime.stop_processes()
        return EXIT_INTERRUPTED
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        runtime.lost_peer(e)
    if tconf.sample_tokens and is_main_process():
        host_model = jax.device_get(model)
        print("sample:\n" + generate(host_model, corpus.tokenizer, "\n", tconf.sample_tokens, seed=tconf.seed))
    runtime.stop_processes()
    return 0


def _fail(code: int, error: Exception) -> int:
    """One line on stderr. With several processes, this one leaves at once: the others may
    not have failed alike, and a normal exit would wait for them in JAX's shutdown."""
    if jax.process_count() == 1:
        print(f"error: {error}", file=sys.stderr)
        return code
    runtime.exit_now(f"process {jax.process_index()}: {error}", code)


if __name__ == "__main__":
    sys.exit(main())
