"""`train(model, dataloader, tconf)` and the `python -m parallel_gpt.train` command.

    python -m parallel_gpt.train [--preset NAME] [--key=value ...]

Without --preset the defaults are sized for the backend found: `cpu` on a CPU (a few
minutes), `shakespeare_char` (nanoGPT's) on GPUs and TPUs. Exit codes: 0 done, 2 bad input
(one line on stderr says what to change), 3 stopped after `max_nonfinite` consecutive
non-finite updates, 75 interrupted by SIGTERM/SIGINT after saving a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from parallel_gpt import checkpoint, parallel, perf
from parallel_gpt.config import MODEL_KEYS, ConfigError, TrainConfig, default_preset, make_config, parse_overrides
from parallel_gpt.data import DataError, DataLoader, load_corpus
from parallel_gpt.evaluate import generate
from parallel_gpt.model import GPT
from parallel_gpt.optim import AdamState, adam_init

EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_INTERRUPTED = 2, 3, 75


class NonFiniteError(RuntimeError):
    pass


class Interrupted(Exception):
    pass


def print0(*args, **kwargs):
    if jax.process_index() == 0:
        print(*args, **kwargs, flush=True)


class StopSignals:
    """SIGTERM/SIGINT set a flag that the loop checks after each step; a second one exits at once."""

    def __init__(self):
        self.requested = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.requested is not None:
            os._exit(128 + signum)
        self.requested = signal.Signals(signum).name
        print0(f"\n{self.requested} received: finishing this step and saving a checkpoint (send again to exit now)")

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class MetricsLog:
    """metrics.jsonl and tensorboardX events in out_dir, written by process 0 only.

    On resume from `start_step`, rows after it (written before a crash) are dropped and
    tensorboard purges its events after it, so no step appears twice."""

    def __init__(self, out_dir: Path, start_step: int):
        self.active = jax.process_index() == 0
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        self.path = out_dir / "metrics.jsonl"
        if self.path.exists():
            rows = [r for r in self.path.read_text().splitlines() if r.strip()]
            kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= start_step]
            if len(kept) != len(rows):
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(r + "\n" for r in kept))
                os.replace(tmp, self.path)
        self.file = open(self.path, "a")
        # A crashed run may have logged steps after its last checkpoint: TensorBoard hides
        # events at steps >= purge_step written before this point. The pid keeps two runs
        # started within one second from sharing an events file name.
        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1, filename_suffix=f".{os.getpid()}")

    def write(self, step: int, **figures):
        if not self.active:
            return
        figures = {k: v for k, v in figures.items() if v is not None}
        self.file.write(json.dumps({"step": step, **figures}) + "\n")
        self.file.flush()
        for k, v in figures.items():
            self.tb.add_scalar(k, v, step)

    def flush(self):
        """Make every row so far durable (before a checkpoint, so a resume never lacks them)."""
        if self.active:
            self.tb.flush()
            os.fsync(self.file.fileno())

    def close(self):
        if self.active:
            self.file.close()
            self.tb.close()


def _row_step(row: str):
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _progress(step, max_iters, elapsed, done_since_start, width=20):
    frac = step / max_iters
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    eta = elapsed / max(done_since_start, 1) * (max_iters - step)
    return f"[{bar}] {100 * frac:3.0f}% ETA {int(eta) // 60}m{int(eta) % 60:02d}s"


def estimate_loss(peval, model, dataloader, mesh, eval_iters: int) -> dict[str, float]:
    """Mean loss over `eval_iters` fixed batches of each split (one host sync at the end)."""
    losses = {split: [peval(model, *(parallel.shard_batch(a, mesh) for a in dataloader.eval_batch(split, i)))
                      for i in range(eval_iters)] for split in ("train", "val")}
    return {split: float(np.mean(jax.device_get(v))) for split, v in losses.items()}


def save_checkpoint(tconf: TrainConfig, step: int, model, opt_state, tokenizer):
    if jax.process_index() != 0:
        return
    arrays = {**checkpoint.flatten(model, "model"), **checkpoint.flatten(opt_state, "opt")}
    meta = {"format": 1, "config": dataclasses.asdict(tconf), "tokenizer": tokenizer.to_json(),
            "rng": {"seed": tconf.seed, "dropout": "fold_in(fold_in(key(seed), update count), device)"},
            "data": {"next_step": step}}
    checkpoint.save(tconf.out_dir, step, arrays, meta, keep=tconf.keep_checkpoints)


def make_layout(tconf: TrainConfig):
    """The device mesh for `tconf`, after checking that the batch divides over it."""
    mesh = parallel.make_mesh(tconf.devices)
    parallel.check_batch_size(tconf.batch_size, mesh.size)
    if (tconf.batch_size // mesh.size) % tconf.grad_accum:
        raise ConfigError(f"grad_accum={tconf.grad_accum} does not divide the per-device batch "
                          f"{tconf.batch_size // mesh.size} (batch_size={tconf.batch_size} over {mesh.size} devices)")
    return mesh


def train(model: GPT, dataloader: DataLoader, tconf: TrainConfig, *, opt_state: AdamState | None = None,
          start_step: int = 0):
    """Train `model` from update `start_step` to `tconf.max_iters`; returns (model, opt_state).

    Batch `step` of `dataloader` feeds update `step`, so a run resumed from a checkpoint at
    step s replays exactly what an uninterrupted run would have done after s.
    """
    mesh = make_layout(tconf)
    out_dir = Path(tconf.out_dir)
    dtype = jnp.dtype(tconf.dtype)
    pstep = parallel.pmap_step(mesh, hp=tconf.adam(), seed=tconf.seed, grad_accum=tconf.grad_accum, dtype=dtype)
    peval = parallel.pmap_eval(mesh, dtype=dtype)
    model = parallel.replicate(model, mesh)
    opt_state = parallel.replicate(opt_state if opt_state is not None else adam_init(model), mesh)

    tokens_per_step = tconf.batch_size * tconf.block_size
    peak = perf.peak_flops(mesh.devices.flat, tconf.dtype)
    flops_per_token = model.flops_per_token()
    tokenizer = dataloader.corpus.tokenizer
    log = MetricsLog(out_dir, start_step)
    print0(f"{model.num_params() / 1e6:.2f}M parameters, {mesh.size} {mesh.devices.flat[0].platform} device(s), "
           f"{tokens_per_step:,} tokens per step, steps {start_step} -> {tconf.max_iters}")

    place = lambda s: tuple(parallel.shard_batch(a, mesh) for a in dataloader.batch(s))  # noqa: E731
    nonfinite_flags, consecutive, skipped = [], 0, 0
    t_start = t_log = time.perf_counter()
    last_log_step, paused = start_step, 0.0
    batch = place(start_step) if start_step < tconf.max_iters else None
    try:
        with StopSignals() as signals:
            for step in range(start_step + 1, tconf.max_iters + 1):
                model, opt_state, metrics = pstep(model, *batch, opt_state)
                checkpoint.fault_point(f"step_{step}")
                if step < tconf.max_iters:
                    batch = place(step)  # the next batch is built and placed while this step runs
                nonfinite_flags.append(metrics["nonfinite"])
                do_eval = step % tconf.eval_interval == 0 or step == tconf.max_iters
                do_save = step % tconf.ckpt_interval == 0 or step == tconf.max_iters or signals.requested

                # Metrics reach the host only here; also before evaluating or saving, so that a
                # run that only skips non-finite updates stops before it writes a checkpoint.
                if step % tconf.log_interval == 0 or do_eval or do_save:
                    m, flags = jax.device_get((metrics, nonfinite_flags))
                    for f in flags:
                        consecutive = consecutive + 1 if f else 0
                        skipped += int(f)
                        if consecutive >= tconf.max_nonfinite:
                            raise NonFiniteError(
                                f"{consecutive} consecutive non-finite updates (loss or gradient norm) at step {step}: "
                                f"lower learning_rate or check the data; the newest checkpoint is the last good state")
                    nonfinite_flags = []
                    now = time.perf_counter()
                    tok_s = (step - last_log_step) * tokens_per_step / (now - t_log - paused)
                    util = perf.mfu(flops_per_token, tok_s, peak)
                    log.write(step, loss=float(m["loss"]), lr=float(m["lr"]), grad_norm=float(m["grad_norm"]),
                              tokens_per_sec=tok_s, mfu=util, nonfinite_skipped=skipped)
                    print0(f"step {step:>6} | loss {float(m['loss']):.4f} | lr {float(m['lr']):.2e} | "
                           f"{tok_s:,.0f} tok/s" + (f" | MFU {100 * util:.1f}%" if util else "") +
                           (f" | skipped {skipped}" if skipped else "") + " | " +
                           _progress(step, tconf.max_iters, now - t_start, step - start_step))
                    t_log, last_log_step, paused = now, step, 0.0

                if do_eval or do_save:
                    t_pause = time.perf_counter()  # time spent below is not training throughput
                    if do_eval:
                        losses = estimate_loss(peval, model, dataloader, mesh, tconf.eval_iters)
                        log.write(step, train_loss=losses["train"], val_loss=losses["val"])
                        print0(f"step {step:>6} | eval: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
                    if do_save:
                        log.flush()
                        save_checkpoint(tconf, step, model, opt_state, tokenizer)
                    paused += time.perf_counter() - t_pause
                if signals.requested:
                    raise Interrupted(f"stopped by {signals.requested} at step {step}; checkpoint saved: "
                                      f"run the same command to resume")
    finally:
        log.close()
    return model, opt_state


def _config_changes(old: dict, new: TrainConfig) -> tuple[list[str], list[str]]:
    """(keys that forbid resuming, other changed keys) between a checkpoint's config and `new`."""
    changed = [k for k, v in dataclasses.asdict(new).items() if k in old and old[k] != v]
    return [k for k in changed if k in MODEL_KEYS], [k for k in changed if k not in MODEL_KEYS]


def init_or_resume(tconf: TrainConfig, tokenizer):
    """(model, opt_state or None, start_step): a new model, or the newest valid checkpoint."""
    has_ckpt = bool(checkpoint.checkpoint_dirs(tconf.out_dir))
    config = tconf.model_config(tokenizer.vocab_size)
    # One compiled initialiser instead of a dispatch (and a compile) per weight matrix.
    template = jax.jit(GPT.create, static_argnums=0)(config, key=jax.random.key(tconf.seed))
    if tconf.init_from == "scratch" or (tconf.init_from == "auto" and not has_ckpt):
        if has_ckpt:
            raise ConfigError(f"out_dir {tconf.out_dir!r} already holds checkpoints: use --init_from=resume "
                              f"to continue them or choose another out_dir")
        return template, None, 0
    found = checkpoint.load_latest(tconf.out_dir, report=lambda msg: print0(msg, file=sys.stderr))
    if found is None:
        raise checkpoint.CheckpointError(f"no valid checkpoint to resume in {tconf.out_dir!r}: "
                                         f"use --init_from=scratch (in a new out_dir) to start a new run")
    arrays, meta = found
    forbidden, allowed = _config_changes(meta["config"], tconf)
    if meta["tokenizer"] != tokenizer.to_json():
        forbidden.append("vocabulary")
    if forbidden:
        raise ConfigError("cannot resume: the checkpoint differs in " + ", ".join(
            f"{k} ({meta['config'].get(k)!r} -> {getattr(tconf, k, '...')!r})" for k in forbidden)
            + ": use the checkpoint's settings or another out_dir")
    if allowed:
        print0("resuming with changed settings: " + ", ".join(f"{k} {meta['config'][k]!r} -> {getattr(tconf, k)!r}"
                                                             for k in allowed))
    model = checkpoint.unflatten(template, "model", arrays)
    opt_state = checkpoint.unflatten(adam_init(template), "opt", arrays)
    print0(f"resuming from step {meta['step']} in {tconf.out_dir}")
    return model, opt_state, int(meta["step"])


def _check_writable(out_dir: str):
    try:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        probe = Path(out_dir) / f".write_test_{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise checkpoint.CheckpointError(f"out_dir {out_dir!r} is not writable ({e.strerror}): choose another out_dir")


def main(argv=None) -> int:
    perf.keep_freed_memory()  # before JAX starts its CPU threads
    argv = sys.argv[1:] if argv is None else argv
    try:
        preset, overrides = parse_overrides(argv)
        tconf = make_config(preset or default_preset(jax.default_backend()), overrides)
        corpus = load_corpus(tconf.dataset)
        dataloader = DataLoader(corpus, tconf.block_size, tconf.batch_size, tconf.seed,
                                jax.process_index(), jax.process_count())
        make_layout(tconf)  # fail on a bad device layout before touching out_dir
        if jax.process_index() == 0:
            _check_writable(tconf.out_dir)
        model, opt_state, start = init_or_resume(tconf, corpus.tokenizer)
        print0(f"config: {json.dumps(dataclasses.asdict(tconf))}")
        model, _ = train(model, dataloader, tconf, opt_state=opt_state, start_step=start)
    except (ConfigError, DataError, parallel.ParallelError, checkpoint.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NONFINITE
    except Interrupted as e:
        print0(str(e))
        return EXIT_INTERRUPTED
    if tconf.sample_tokens and jax.process_index() == 0:
        host_model = jax.device_get(model)
        print("sample:\n" + generate(host_model, corpus.tokenizer, "\n", tconf.sample_tokens, seed=tconf.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
