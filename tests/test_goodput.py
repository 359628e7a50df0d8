"""Goodput: the compilation cache, checkpoints written in the background, the time report."""

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from parallel_gpt import checkpoint, goodput
from parallel_gpt.errors import OutputError

RUN = ["--preset", "tiny", "--max_iters=4", "--eval_interval=4", "--log_interval=1", "--ckpt_interval=2",
       "--sample_tokens=0"]


def train(out_dir, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT"))}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    return subprocess.run([sys.executable, "-m", "parallel_gpt.train", *RUN, f"--out_dir={out_dir}", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in rows if "goodput" not in r]


def entries(cache):
    return {p.name: p.stat().st_mtime_ns for p in cache.rglob("*") if p.is_file()}


def test_a_second_run_loads_every_program_from_the_cache_and_a_damaged_cache_costs_one_line(tmp_path):
    cache = tmp_path / "xla"
    first = train(tmp_path / "a", f"--compilation_cache={cache}")
    assert first.returncode == 0, first.stderr
    written = entries(cache)
    assert written  # the step, the evaluation and the initialiser at least

    second = train(tmp_path / "b", f"--compilation_cache={cache}")
    assert second.returncode == 0, second.stderr
    assert entries(cache) == written  # nothing compiled again: every program was a hit
    assert losses(tmp_path / "b") == losses(tmp_path / "a")

    for path in cache.rglob("*"):
        if path.is_file():
            path.write_bytes(b"damaged" * 10)
    third = train(tmp_path / "c", f"--compilation_cache={cache}")
    assert third.returncode == 0, third.stderr
    assert losses(tmp_path / "c") == losses(tmp_path / "a")
    warned = [line for line in third.stderr.splitlines() if "compilation cache" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: damaged entries in the compilation cache")


def test_the_cache_can_be_turned_off(tmp_path, monkeypatch):
    result = train(tmp_path / "a", "--compilation_cache=off", "--max_iters=2")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "home" / ".cache" / "parallel_gpt" / "xla").exists()
    row = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    phases = ("startup_s", "compile_s", "steps_s", "eval_s", "checkpoint_s", "other_s")
    assert sum(row[k] for k in phases) == pytest.approx(row["wall_s"])
    assert 0 < row["goodput"] == pytest.approx(row["steps_s"] / row["wall_s"]) and row["compile_s"] > 0
    assert "goodput" in result.stdout and "training blocked" in result.stdout


def test_the_report_takes_compilation_out_of_the_phase_it_happened_in(monkeypatch):
    clock = iter([103.0, 105.0, 105.0, 106.0, 110.0])
    monkeypatch.setattr(goodput.time, "time", lambda: next(clock))
    g = goodput.Goodput(start=100.0)
    with g.timing("steps"):  # 103 -> 105, 1.5 s of it compiling
        goodput._on_event(goodput._COMPILE_EVENT, 1.5)
    with g.timing("eval"):  # 105 -> 106
        pass
    report = g.report()  # at 110
    assert report["startup_s"] == 3.0 and report["compile_s"] == 1.5 and report["steps_s"] == 0.5
    assert report["eval_s"] == 1.0 and report["other_s"] == 4.0 and report["goodput"] == 0.5 / 10


def test_a_background_write_that_fails_raises_in_the_caller_and_one_write_at_a_time(tmp_path, monkeypatch):
    arrays = {"model/w": np.ones(3, np.float32)}
    release, order = threading.Event(), []

    def slow_save(out_dir, step, *args):
        order.append(f"start {step}")
        release.wait(10)
        order.append(f"end {step}")
        if step == 2:
            raise OutputError("cannot write checkpoint: disk full")

    monkeypatch.setattr(checkpoint, "save", slow_save)
    writer = checkpoint.Writer()
    writer.save(tmp_path, 1, arrays, {})
    writer.check()  # still in flight: nothing to raise, and no waiting
    threading.Timer(0.2, release.set).start()
    writer.save(tmp_path, 2, arrays, {})  # waits for step 1's write first
    with pytest.raises(OutputError, match="disk full"):
        writer.wait()
    assert order == ["start 1", "end 1", "start 2", "end 2"]
    writer.wait()  # the error was raised once
