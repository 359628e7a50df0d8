"""A jax.profiler trace of chosen training steps (`--profile_from`, `--profile_steps`).

The trace goes to out_dir/profile/process_<i>/plugins/profile/<time>/: `<host>.xplane.pb`
for TensorBoard's profile plugin and XProf, and `perfetto_trace.json.gz` for
ui.perfetto.dev. Off (profile_from=0, the default), `before` and `after` compare two
integers and jax.profiler is never called.
"""

from __future__ import annotations

from pathlib import Path

import jax

from parallel_gpt.runtime import is_main_process, print0


class StepTrace:
    """Traces steps first .. first + count - 1: started before the first is dispatched,
    stopped once the last has finished on the devices (the one host sync it adds). Each
    traced step's dispatch is marked as step "train" N, which XProf's step views read."""

    def __init__(self, out_dir: Path, first: int, count: int, all_processes: bool):
        on = first > 0 and (all_processes or is_main_process())
        self.first, self.last = (first, first + count - 1) if on else (0, 0)
        self.folder = out_dir / "profile" / f"process_{jax.process_index()}"
        self.tracing, self.marker = False, None

    def before(self, step: int):
        if step == self.first:
            jax.profiler.start_trace(str(self.folder), create_perfetto_trace=True)
            self.tracing = True
        if self.tracing:
            self.marker = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self.marker.__enter__()

    def after(self, step: int, outputs):
        """After dispatching `step`, whose results are `outputs`."""
        if self.marker is not None:
            self.marker.__exit__(None, None, None)
            self.marker = None
        if step == self.last and self.tracing:
            jax.block_until_ready(outputs)
            self.close()
            print0(f"profile of steps {self.first}-{self.last} in {self.folder}: "
                   f"open it with `xprof --logdir {self.folder.parent}` or ui.perfetto.dev")

    def close(self):
        """Stop a trace still running (the run ended or failed inside the traced steps)."""
        if self.tracing:
            self.tracing = False
            jax.profiler.stop_trace()
