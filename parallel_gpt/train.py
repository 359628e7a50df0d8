"""`train(model, dataloader, tconf)` and the `python -m parallel_gpt.train` command.

    python -m parallel_gpt.train [--preset NAME] [--key=value ...]

Without --preset the defaults are sized for the backend found: `cpu` on a CPU (a few
minutes), `shakespeare_char` (nanoGPT's) on GPUs and TPUs. The same command runs on many
processes (`launch/`): each joins the group first (`runtime.start_processes`).

Exit codes are `errors.EXIT_*`: 0 done; 2 bad input (one line on stderr says what to
change); 3 stopped after `max_nonfinite` consecutive non-finite updates; 75 interrupted by
SIGTERM/SIGINT after saving a checkpoint; 76 a process of the group died, was stuck or
never joined. After 75 and 76 the same command resumes from the newest checkpoint.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from parallel_gpt import checkpoint, hf, parallel, perf, runstate, runtime, wandb_log
from parallel_gpt.config import TrainConfig, default_preset, make_config, parse_overrides, process_config
from parallel_gpt.data import DataLoader, load_corpus
from parallel_gpt.errors import EXIT_INTERRUPTED, NonFiniteError, run_cli
from parallel_gpt.faults import fault_point
from parallel_gpt.generate import generate
from parallel_gpt.goodput import Goodput
from parallel_gpt.metrics import Reporter
from parallel_gpt.model import GPT
from parallel_gpt.optim import AdamState
from parallel_gpt.profile import StepTrace
from parallel_gpt.runtime import Phase, Watchdog, is_main_process, keep_freed_memory, print0


class Interrupted(Exception):
    pass


class StopSignals:
    """SIGTERM/SIGINT set `signum`, which the loop hands to each step (`parallel.step`'s
    `stop`); a second signal exits at once.

    The command enters it on its first line, so that a signal during start-up is kept:
    `_main` ends every process with EXIT_INTERRUPTED at the end of start-up, and a later
    one is carried into the loop. Inside `at_once(what)` (joining the process group, which
    may wait minutes in JAX's C++ code, where no Python handler runs) a signal ends the
    process at once with EXIT_INTERRUPTED: there is nothing to save and no group to tell."""

    def __init__(self):
        self.signum, self._at_once = 0, None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        # The C-level handler writes each signal's number to this pipe at once, even while
        # the main thread is blocked; a thread reads it (see `at_once`).
        read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._old_fd = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(read,), daemon=True, name="stop-signals").start()
        return self

    def _watch(self, read: int):
        while data := os.read(read, 1):
            if self._at_once is not None:
                self._leave(data[0])
        os.close(read)

    def _leave(self, signum: int):
        os.write(sys.stderr.fileno(), f"{signal.Signals(signum).name} received while {self._at_once}: stopping; "
                                      f"nothing new to save: run the same command to resume\n".encode())
        os._exit(EXIT_INTERRUPTED)

    @contextlib.contextmanager
    def at_once(self, what: str):
        self._at_once = what
        try:
            yield
        finally:
            self._at_once = None

    def _handle(self, signum, frame):
        if self._at_once is not None:
            self._leave(signum)
        if self.signum:
            os._exit(128 + signum)
        self.signum = signum
        if is_main_process():  # os.write, not print: the signal may land inside a print
            os.write(sys.stdout.fileno(), f"\n{signal.Signals(signum).name} received: finishing a step and saving a "
                                          f"checkpoint (send again to exit now)\n".encode())

    def __exit__(self, *exc):
        signal.set_wakeup_fd(self._old_fd)
        os.close(self._write)  # ends the reading thread
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


def estimate_loss(dp: parallel.DataParallel, model, dataloader, eval_iters: int) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split (one host sync at the end)."""
    losses = {split: [dp.eval(model, *dp.batch(*dataloader.eval_batch(split, i))) for i in range(eval_iters)]
              for split in ("train", "val")}
    return {split: float(np.mean(jax.device_get(v))) for split, v in losses.items()}


def train(model: GPT, dataloader: DataLoader, tconf: TrainConfig, *, opt_state: AdamState | None = None,
          start_step: int = 0, goodput: Goodput | None = None, signals: StopSignals | None = None) -> GPT | None:
    """Train `model` from update `start_step` to `tconf.max_iters`; returns the trained model,
    whole, in host memory, its blocks as a tuple (on process 0; None on the others).

    Batch `step` of `dataloader` feeds update `step`, so a run resumed from a checkpoint at
    step s replays exactly what an uninterrupted run would have done after s. `goodput`
    (default: one that counts from this process's start) splits the wall time by phase;
    `signals`: the command's own, entered before start-up (default: entered here).
    """
    mesh = parallel.make_layout(tconf.batch_size, tconf.grad_accum, tconf.devices)
    dp = parallel.DataParallel(mesh, hp=tconf.optim, seed=tconf.seed, grad_accum=tconf.grad_accum,
                               dtype=jnp.dtype(tconf.dtype), state_sharding=tconf.state_sharding)
    state = dp.place(model, opt_state)
    loop = _Loop(tconf, dp, dataloader, _reporter(tconf, model, mesh, start_step), goodput or Goodput(),
                 runstate.run_facts(dataloader.corpus.fingerprint, mesh))
    agreed_stop = None  # the previous step's metrics["stop"]: the stop agreed by every process
    batch = dp.batch(*dataloader.batch(start_step)) if start_step < tconf.max_iters else None
    # The state in host memory as the last checkpoint saved it (the last step always saves).
    host = dp.to_host(state, keep=is_main_process()) if batch is None else None
    with (contextlib.nullcontext(signals) if signals else StopSignals()) as signals, loop:
        for step in range(start_step + 1, tconf.max_iters + 1):
            with loop.goodput.timing("steps"):
                loop.watchdog.phase(Phase.STEP, f"step {step}")
                loop.trace.before(step)
                state, metrics = dp.step(state, *batch, signals.signum)
                loop.trace.after(step, metrics)
                fault_point(f"step_{step}")
                loop.writer.check()  # a checkpoint that failed in the background stops the run here
                if step < tconf.max_iters:
                    batch = dp.batch(*dataloader.batch(step))  # built and placed while this step runs
                loop.reporter.add(metrics)
                # Act on the stop agreed in the previous step: reading it waits for that step
                # only, not this one, and every process reads the same value here, so all of
                # them save this step and stop together. A signal that lands after this step's
                # `stop` input was placed is agreed in the next step.
                loop.watchdog.phase(Phase.STEP_WAIT, f"waiting for step {step - 1}")
                stop, agreed_stop = (int(agreed_stop) if agreed_stop is not None else 0), metrics["stop"]
                last = step == tconf.max_iters
                evaluate = step % tconf.eval_interval == 0 or last
                save = step % tconf.ckpt_interval == 0 or last or stop
                # Metrics reach the host only here; also before evaluating or saving, so that a
                # run that only skips non-finite updates stops before it writes a checkpoint.
                if step % tconf.log_interval == 0 or evaluate or save:
                    loop.report(step)
            if evaluate:
                loop.evaluate(step, state.model)
            if save:
                host = loop.save(step, state, final=last or bool(stop))
            if stop:
                loop.finish(step)
                raise Interrupted(f"stopped by {signal.Signals(stop).name} at step {step}; checkpoint saved: "
                                  f"run the same command to resume")
        loop.finish(tconf.max_iters)
    return host.model if host is not None else None


def _reporter(tconf: TrainConfig, model: GPT, mesh, start_step: int) -> Reporter:
    """The run's Reporter, after the line that says what is about to train."""
    tokens_per_step = tconf.batch_size * model.config.block_size
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    print0(f"{model.num_params() / 1e6:.2f}M parameters, {mesh.size} {mesh.devices.flat[0].platform} device(s)"
           f"{processes}, {tokens_per_step:,} tokens per step, steps {start_step} -> {tconf.max_iters}")
    return Reporter(Path(tconf.out_dir), start_step, tconf.max_iters, tokens_per_step, model.flops_per_token(),
                    perf.peak_flops(mesh.devices.flat, tconf.dtype), wandb_log.settings(tconf, model.config))


class _Loop:
    """What the training loop does besides stepping: report, evaluate, save, account for
    the time; each names its phase to the watchdog and has its fault point."""

    def __init__(self, tconf: TrainConfig, dp: parallel.DataParallel, dataloader: DataLoader, reporter: Reporter,
                 goodput: Goodput, facts: dict):
        self.tconf, self.dp, self.dataloader, self.reporter = tconf, dp, dataloader, reporter
        self.goodput, self.facts = goodput, facts
        self.nonfinite = NonFiniteCounter(tconf.max_nonfinite)
        self.watchdog = Watchdog(tconf.process.step_timeout)
        self.writer = checkpoint.Writer()
        self.trace = StepTrace(Path(tconf.out_dir), tconf.profile_from, tconf.profile_steps, tconf.profile_all_processes)

    def __enter__(self):
        self.watchdog.__enter__()
        return self

    def __exit__(self, *exc):
        self.watchdog.__exit__(*exc)
        self.trace.close()
        self.reporter.close()

    def report(self, step: int):
        self.watchdog.phase(Phase.STEP_WAIT, f"waiting for the metrics of step {step}")
        fault_point(f"fetch_{step}")
        self.nonfinite.check(self.reporter.report(step), step)

    def evaluate(self, step: int, model):
        with self.reporter.paused(), self.goodput.timing("eval"):
            self.watchdog.phase(Phase.WAIT, f"waiting for the evaluation at step {step}")
            fault_point(f"eval_{step}")
            self.reporter.evaluation(step, estimate_loss(self.dp, model, self.dataloader, self.tconf.eval_iters))

    def save(self, step: int, state: parallel.TrainState, final: bool) -> parallel.TrainState | None:
        """Checkpoint `step`: training waits while the state is copied to host memory (and
        for the previous write, if it is still in flight: one at a time); process 0 writes
        it in the background. A `final` checkpoint (the run ends after it) is waited for,
        and no process leaves before process 0 has written it. Returns the copy (process 0;
        None on the others)."""
        t = time.perf_counter()
        with self.reporter.paused(), self.goodput.timing("checkpoint"):
            self.watchdog.phase(Phase.WORK, f"writing checkpoint {step}")
            self.reporter.flush()
            host = self.dp.to_host(state, keep=is_main_process())  # every process joins a sharded state's gathers
            runstate.save_checkpoint(self.tconf, step, host, self.dataloader.corpus.tokenizer, self.writer, self.facts)
            if final:
                self.writer.wait()
                self.watchdog.phase(Phase.WAIT, f"waiting at the barrier after checkpoint {step}")
                runtime.barrier(f"checkpoint {step}")
        print0(f"checkpoint {step}: training blocked {time.perf_counter() - t:.2f} s"
               + ("" if final else ", written in the background"))
        return host

    def finish(self, step: int):
        """The run's goodput, on the console and in metrics.jsonl."""
        figures = self.goodput.report()
        self.reporter.log.write(step, **figures)
        print0(self.goodput.line(figures))


def main(argv=None) -> int:
    with StopSignals() as signals:  # first: a stop request during start-up is kept (see StopSignals)
        keep_freed_memory()  # before JAX starts its CPU threads
        code = run_cli(functools.partial(_main, signals=signals), argv, leave=_leave)
    # Registered last, this runs before JAX's exit cleanup: a signal during that cleanup
    # ends the process with the code already decided, not with a traceback.
    atexit.register(_exit_quietly_on_signals, code)
    return code


def _exit_quietly_on_signals(code: int):
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: os._exit(code))


def _main(argv: list[str], signals: StopSignals) -> int:
    goodput = Goodput()  # counts from the process's start
    preset, overrides = parse_overrides(argv)
    process = process_config(overrides)
    with signals.at_once("joining the process group"):
        fault_point("start_join")
        group = runtime.start_processes(process)  # before any other JAX call
    if group:
        print0(f"{jax.process_count()} processes ({group})")
    tconf = make_config(preset or default_preset(jax.default_backend()), overrides)
    runtime.use_compilation_cache(tconf.compilation_cache)
    if tconf.hf_dir is not None:
        hf.check_dir(tconf.hf_dir)
    fault_point("start_data")
    corpus = load_corpus(tconf.dataset, tconf.tokenizer)
    if tconf.hf_dir is not None:  # the model's shape is the checkpoint's
        tconf = TrainConfig.from_flat(hf.adopt(tconf.to_flat(), tconf.hf_dir, corpus.tokenizer))
    # The mesh, once here: a bad device layout fails before out_dir is touched.
    mesh = parallel.make_layout(tconf.batch_size, tconf.grad_accum, tconf.devices)
    # What must agree: not the spelling of paths (process 0's out_dir is the one used; the
    # data is compared by content), nor the process's own id.
    settings = {k: v for k, v in tconf.to_flat().items() if k not in ("process_id", "out_dir", "dataset")}
    runtime.check_agreement({**settings, "dataset fingerprint": corpus.fingerprint,
                             "devices per process": len(mesh.local_devices)})
    dataloader = DataLoader(corpus, tconf.model.block_size, tconf.batch_size, tconf.seed,
                            jax.process_index(), jax.process_count())
    runtime.on_process_0(runstate.check_writable, tconf.out_dir)
    model, opt_state, start = runstate.init_or_resume(tconf, corpus.tokenizer, mesh.devices.flat[0].platform,
                                                      runstate.run_facts(corpus.fingerprint, mesh))
    fault_point("start_resumed")
    runtime.check_agreement({"start step": start})
    stop = runtime.max_over_processes(signals.signum)  # a signal during start-up, on any process
    if stop:
        print0(f"stopped by {signal.Signals(stop).name} during start-up; nothing new to save (the newest checkpoint "
               f"stands): run the same command to resume")
        runtime.stop_processes()
        return EXIT_INTERRUPTED
    print0(f"config: {json.dumps(tconf.to_flat())}")
    print0(f"kernels: attention={model.config.attention}, layernorm_backward={model.config.layernorm_backward}, "
           f"scan_layers={str(model.config.scan_layers).lower()}")
    try:
        model = train(model, dataloader, tconf, opt_state=opt_state, start_step=start, goodput=goodput,
                      signals=signals)
    except Interrupted as e:
        print0(str(e))
        runtime.stop_processes()
        return EXIT_INTERRUPTED
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        runtime.lost_peer(e)
    if tconf.sample_tokens and is_main_process():
        print("sample:\n" + generate(model, corpus.tokenizer, "\n", tconf.sample_tokens, seed=tconf.seed))
    runtime.stop_processes()
    return 0


def _leave(line: str, code: int):
    """With several processes, a failing one leaves at once: the others may not have failed
    alike, and a normal exit would wait for them in JAX's shutdown."""
    if jax.process_count() > 1:
        runtime.exit_now(f"process {jax.process_index()}: {line}", code)


if __name__ == "__main__":
    sys.exit(main())
