"""Weights & Biases: metrics.jsonl's rows and the resolved config, from process 0, to one
W&B run per out_dir (the [wandb] extra; `--wandb_log` and nanoGPT's other names).

out_dir/wandb.json keeps {"id": the run's id, "complete_through": a step}: W&B is known to
hold every row up to that step, because the process that logged them finished its W&B
run (training ended, or stopped on a signal after its checkpoint). A run resumed from the
checkpoint of step s rewinds the W&B run (W&B's `resume_from`) to
r = min(s, complete_through) and logs metrics.jsonl's rows after r again. So W&B ends with
exactly metrics.jsonl's rows: a step logged after the checkpoint by a run that then died
is dropped from both, and rows that a killed process still held in W&B's buffers (its
service writes them out every ~15 s) are sent again. After a clean stop nothing is
logged twice; after a kill, at most the rows since the last clean stop.

W&B writes its own files under $WANDB_DIR when that is set, else in out_dir/wandb.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import string
from pathlib import Path

from parallel_gpt.config import ConfigError
from parallel_gpt.files import write_atomic

STATE = "wandb.json"


@dataclasses.dataclass(frozen=True)
class WandbSettings:
    project: str
    name: str | None
    config: dict  # the resolved settings, as the run prints them


def settings(tconf, model_config) -> WandbSettings | None:
    """What W&B needs from a run, or None when `wandb_log` is off. The kernels are the ones
    chosen for these devices (model_config's), not "auto"."""
    if not tconf.wandb_log:
        return None
    config = {**tconf.to_flat(), "attention": model_config.attention,
              "layernorm_backward": model_config.layernorm_backward}
    return WandbSettings(tconf.wandb_project, tconf.wandb_run_name, config)


class WandbRun:
    """The W&B run of out_dir, rewound to agree with metrics.jsonl's `kept_rows` (JSON
    lines, steps <= start_step) and continued; ConfigError when W&B is missing or fails."""

    def __init__(self, wb: WandbSettings, out_dir: Path, start_step: int, kept_rows: list[str]):
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb_log=True needs wandb: pip install 'parallel_gpt[wandb]'") from None
        self.state = out_dir / STATE
        previous = _read_state(self.state)
        if previous is None:  # a new W&B run; a run that starts logging on resume gets all its rows
            run_id, self.last = new_id(), 0
            resume = {"id": run_id}
        else:
            run_id, self.last = previous["id"], min(start_step, previous["complete_through"])
            resume = {"resume_from": f"{run_id}?_step={self.last}"}  # W&B keeps steps <= last
        self._save(run_id)  # before init, so that a run killed during it is continued, not duplicated
        try:
            self.run = wandb.init(project=wb.project, name=wb.name, config=wb.config,
                                  dir=os.environ.get("WANDB_DIR") or str(out_dir), **resume)
        except wandb.errors.Error as e:
            raise ConfigError(f"wandb_log: W&B did not start ({e}): run `wandb login`, or set "
                              f"WANDB_MODE=offline and `wandb sync` later") from None
        self.id, rewound_to = run_id, self.last
        for line in kept_rows:
            row = json.loads(line)
            if row["step"] > rewound_to:
                self.log(row.pop("step"), row)

    def log(self, step: int, figures: dict):
        self.run.log(figures, step=step)  # rows of one step (a report and an evaluation) merge into one
        self.last = max(self.last, step)

    def close(self):
        self.run.finish()  # every row is with W&B once this returns
        self._save(self.id)

    def _save(self, run_id: str):
        write_atomic(self.state, json.dumps({"id": run_id, "complete_through": self.last}).encode())


def new_id() -> str:
    """A run id in W&B's own form: 8 lowercase letters and digits."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _read_state(path: Path) -> dict | None:
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        raise ConfigError(f"{path} is damaged: delete it to log to a new W&B run") from None
    if not (isinstance(state, dict) and isinstance(state.get("id"), str)
            and isinstance(state.get("complete_through"), int)):
        raise ConfigError(f"{path} is damaged: delete it to log to a new W&B run")
    return state
