"""Turns the fatal log with which JAX ends a process of a failed group into one line.

When a process of a `jax.distributed` group dies (SIGKILL, out of memory, a lost host),
JAX's coordination service notices at once and ends every other process (SIGABRT, exit
code `errors.EXIT_ABORTED`) with a multi-line fatal log and a C++ stack trace. JAX offers no hook that runs
our code first: the client's failure callback cannot be set from Python. So
`runtime.start_processes` routes the process's stderr through this filter, a small
separate process that outlives it. Every line passes through unchanged, except that such
a fatal log becomes one line naming the failed process:

    error: process 0: process 1 stopped sending heartbeats (killed, out of memory, or its host is gone); ...

Run as `python -m parallel_gpt.fatal_filter` with the trainer's stderr as its stdin; it
writes to its own stderr. It imports nothing of JAX. The trainer names its process id
with a MARKER line once the group has formed.
"""

from __future__ import annotations

import re
import signal
import sys

from parallel_gpt.errors import EXIT_ABORTED

FATAL = "Terminating process because the JAX distributed service detected fatal errors"
MARKER = "parallel_gpt.fatal_filter process_id="
_DEAD = re.compile(r"stopped sending heartbeats\):\s*([\d\s,]+?)\s*The tasks", re.S)


def summary(log: str, process_id: str) -> str:
    """The one line for JAX's fatal `log` in process `process_id`."""
    dead = _DEAD.search(log)
    if dead:
        what = f"process {', '.join(dead.group(1).split())} stopped sending heartbeats"
    elif "leader task" in log or "Socket closed" in log:
        what = "lost the coordinator, process 0"
    else:
        what = "the process group failed (" + log.split("absl::Status:", 1)[-1].strip().splitlines()[0][:200] + ")"
    return (f"error: process {process_id}: {what} (killed, out of memory, or its host is gone); JAX ended "
            f"this process (exit code {EXIT_ABORTED}): rerun to resume from the newest checkpoint\n")


def main():
    # The trainer handles SIGINT and SIGTERM; this filter ends when the trainer's stderr closes.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    process_id, fatal, out = "?", None, sys.stderr.buffer
    for line in sys.stdin.buffer:
        text = line.decode(errors="replace")
        if text.startswith(MARKER):
            process_id = text[len(MARKER):].strip()
        elif fatal is not None or FATAL in text:
            fatal = (fatal or "") + text  # the rest is the fatal log and its stack trace
        else:
            out.write(line)
            out.flush()
    if fatal is not None:
        out.write(summary(fatal, process_id).encode())
        out.flush()


if __name__ == "__main__":
    main()
