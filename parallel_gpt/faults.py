"""Test hook: faults injected at exact places of a run, driven by PARALLEL_GPT_FAULT."""

from __future__ import annotations

import os
import signal
import threading


def fault_point(name: str):
    """Test hook: with PARALLEL_GPT_FAULT="[p<process>/]<name>:<ACTION>[*count]" the process
    acts at this point, so tests can kill, interrupt or stall a run at an exact place
    (e.g. "save_00000010_arrays:SIGKILL", "step_7:SIGTERM*2", "p1/step_5:HANG"). ACTION
    is a signal sent to itself, or HANG: the main thread sleeps for good (a stuck process).
    With a p<process>/ prefix only that process of the group acts. Unset, it does nothing."""
    spec = os.environ.get("PARALLEL_GPT_FAULT")
    if not spec:
        return
    where, _, action = spec.partition(":")
    process, _, point = where.rpartition("/")
    if point != name:
        return
    if process:
        import jax  # only here: prepare workers never import JAX

        if process != f"p{jax.process_index()}":
            return
    action, _, count = action.partition("*")
    if action == "HANG":
        threading.Event().wait()
    for _ in range(int(count or 1)):
        os.kill(os.getpid(), getattr(signal, action))
