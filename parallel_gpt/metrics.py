"""What a run reports: metrics.jsonl, TensorBoard events, W&B (wandb_log.py), the console line and progress.

Process 0 writes and prints; on every other process these do nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import jax

from parallel_gpt import perf
from parallel_gpt.runtime import is_main_process, print0


class MetricsLog:
    """metrics.jsonl, tensorboardX events in out_dir, and W&B when `wandb` is given.

    On resume from `start_step`, rows after it (written before a crash) are dropped,
    tensorboard purges its events after it and the W&B run is rewound to it, so no step
    appears twice."""

    def __init__(self, out_dir: Path, start_step: int, wandb=None):
        self.active = is_main_process()
        self.resumed_tokens = None
        if not self.active:
            return
        from tensorboardX import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        kept = []
        if self.path.exists():  # a damaged row (bytes that are not UTF-8, cut JSON) is dropped like a later step's
            rows = [r for r in self.path.read_bytes().decode("utf-8", "replace").splitlines() if r.strip()]
            kept = [r for r in rows if _row_step(r) is not None and _row_step(r) <= start_step]
            if len(kept) != len(rows):
                tmp = self.path.with_suffix(".tmp")
                tmp.write_text("".join(r + "\n" for r in kept))
                os.replace(tmp, self.path)
        # Tokens trained on through start_step: the newest row's count (the batch size may
        # have changed on an earlier resume), or None for rows written without one.
        self.resumed_tokens = next((t for r in reversed(kept) if (t := json.loads(r).get("tokens")) is not None), None)
        self.file = open(self.path, "a")
        # A crashed run may have logged steps after its last checkpoint: TensorBoard hides
        # events at steps >= purge_step written before this point. The pid keeps two runs
        # started within one second from sharing an events file name.
        self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1, filename_suffix=f".{os.getpid()}")
        self.wandb = None
        if wandb is not None:
            from parallel_gpt.wandb_log import WandbRun

            self.wandb = WandbRun(wandb, out_dir, start_step, kept)

    def write(self, step: int, **figures):
        if not self.active:
            return
        figures = {k: v for k, v in figures.items() if v is not None}
        self.file.write(json.dumps({"step": step, **figures}) + "\n")
        self.file.flush()
        for k, v in figures.items():
            self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(step, figures)

    def flush(self):
        """Make every row so far durable (before a checkpoint, so a resume never lacks them)."""
        if self.active:
            self.tb.flush()
            os.fsync(self.file.fileno())

    def close(self):
        if self.active:
            self.file.close()
            self.tb.close()
            if self.wandb is not None:
                self.wandb.close()


def _row_step(row: str):
    try:
        return int(json.loads(row)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Reporter:
    """The host side of the training loop's logging.

    Step metrics stay on the devices until `report` fetches, in one host sync per log
    interval, every step's non-finite flag and the newest step's metrics; tokens/s and MFU count the time since the previous report, less the
    time spent in `paused()` blocks (evaluation, checkpoints)."""

    def __init__(self, out_dir: Path, start_step: int, max_iters: int, tokens_per_step: int,
                 flops_per_token: int, peak_flops: float | None, wandb=None):
        self.log = MetricsLog(out_dir, start_step, wandb)
        self.start_step, self.max_iters, self.tokens_per_step = start_step, max_iters, tokens_per_step
        resumed = self.log.resumed_tokens
        self.start_tokens = start_step * tokens_per_step if resumed is None else resumed
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.flags, self.newest, self.skipped = [], None, 0
        self.t_start = self.t_last = time.perf_counter()
        self.last_step, self.paused_s = start_step, 0.0

    def add(self, metrics: dict):
        """A step's metrics, still on the devices."""
        self.flags.append(metrics["nonfinite"])
        self.newest = metrics

    def report(self, step: int) -> list[int]:
        """Fetch the steps' metrics since the last report, log the newest, print the console
        line; returns those steps' non-finite flags, oldest first."""
        flags, newest = jax.device_get((self.flags, self.newest))
        self.flags = []
        flags = [int(f) for f in flags]
        self.skipped += sum(flags)
        m = {k: float(v) for k, v in newest.items()}
        now = time.perf_counter()
        tok_s = (step - self.last_step) * self.tokens_per_step / (now - self.t_last - self.paused_s)
        util = perf.mfu(self.flops_per_token, tok_s, self.peak_flops)
        self.log.write(step, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"], tokens_per_sec=tok_s, mfu=util,
                       nonfinite_skipped=self.skipped, tokens=self.tokens(step))
        print0(f"step {step:>6} | loss {m['loss']:.4f} | lr {m['lr']:.2e} | {tok_s:,.0f} tok/s"
               + (f" | MFU {100 * util:.1f}%" if util else "") + (f" | skipped {self.skipped}" if self.skipped else "")
               + " | " + progress(step, self.max_iters, now - self.t_start, step - self.start_step))
        self.t_last, self.last_step, self.paused_s = now, step, 0.0
        return flags

    def tokens(self, step: int) -> int:
        """Tokens trained on through `step` (the x axis `plot` draws losses against)."""
        return self.start_tokens + (step - self.start_step) * self.tokens_per_step

    def evaluation(self, step: int, losses: dict[str, float]):
        self.log.write(step, train_loss=losses["train"], val_loss=losses["val"], tokens=self.tokens(step))
        print0(f"step {step:>6} | eval: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside is not training throughput."""
        t = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - t

    def flush(self):
        self.log.flush()

    def close(self):
        self.log.close()


def progress(step: int, max_iters: int, elapsed: float, done_since_start: int, width: int = 20) -> str:
    """A bar, the percentage done and the time left at the pace since the run (re)started."""
    frac = step / max_iters
    bar = "#" * int(frac * width) + "." * (width - int(frac * width))
    eta = elapsed / max(done_since_start, 1) * (max_iters - step)
    return f"[{bar}] {100 * frac:3.0f}% ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
