"""Where a run's wall time went: start-up, compilation, training steps, evaluation, time
blocked by checkpoints, and the rest; goodput = training steps / wall time.

Compilation is counted wherever it happens (JAX reports each XLA compilation's duration)
and taken out of the phase it happened in: the first step's compile is not a step's time.
"""

from __future__ import annotations

import contextlib
import os
import time

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # JAX's own, one per XLA compilation
PHASES = ("startup", "compile", "steps", "eval", "checkpoint")
_compiled_s = 0.0  # seconds of XLA compilation in this process so far


def _on_event(event: str, duration: float, **kwargs):
    global _compiled_s
    if event == _COMPILE_EVENT:
        _compiled_s += duration


jax.monitoring.register_event_duration_secs_listener(_on_event)


def process_start() -> float:
    """When this process started, on the `time.time()` clock: the kernel's record where there
    is one (Linux), so that interpreter start and imports count; else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in ticks since boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()


class Goodput:
    """Seconds per phase since the process started. `timing(phase)` attributes a block's
    wall time to `phase`, less the compilations inside it, which count as "compile"."""

    def __init__(self, start: float | None = None):
        self.start = process_start() if start is None else start
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._compiled_before = _compiled_s  # compilations of earlier runs in this process are not ours
        self._started = False

    @contextlib.contextmanager
    def timing(self, phase: str):
        t, compiled = time.time(), _compiled_s
        if not self._started:  # everything before the first timed block is start-up
            self.seconds["compile"] += compiled - self._compiled_before
            self.seconds["startup"] += t - self.start - (compiled - self._compiled_before)
            self._started = True
        try:
            yield
        finally:
            inside = _compiled_s - compiled
            self.seconds[phase] += time.time() - t - inside
            self.seconds["compile"] += inside

    def report(self) -> dict[str, float]:
        """{phase}_s for each phase, other_s (wall time in none of them), wall_s and goodput."""
        wall = time.time() - self.start
        figures = {f"{phase}_s": s for phase, s in self.seconds.items()}
        figures["other_s"] = wall - sum(self.seconds.values())
        figures["wall_s"] = wall
        figures["goodput"] = self.seconds["steps"] / wall
        return figures

    @staticmethod
    def line(figures: dict[str, float]) -> str:
        """`report()`'s figures as one console line."""
        parts = ", ".join(f"{phase} {figures[f'{phase}_s']:.1f} s" for phase in (*PHASES, "other"))
        return f"goodput {100 * figures['goodput']:.1f}% of {figures['wall_s']:.1f} s: {parts}"
