"""Kills, preemption, corrupt checkpoints, non-finite updates and mismatched resumes.

Faults are injected at exact places through PARALLEL_GPT_FAULT (see faults.fault_point),
so no test sleeps and hopes."""

import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from parallel_gpt import checkpoint, errors, train

# 30 steps, dropout on (so RNG replay is checked too), a checkpoint every 10, a row per step.
RUN = ["--preset", "tiny", "--max_iters=30", "--ckpt_interval=10", "--eval_interval=10", "--log_interval=1",
       "--dropout=0.1", "--sample_tokens=0"]
LOSS_KEYS = ("loss", "lr", "grad_norm", "train_loss", "val_loss")


def run_train(out_dir, *extra, fault=None, devices=8):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("PARALLEL_GPT_FAULT", None)
    if fault:
        env["PARALLEL_GPT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "parallel_gpt.train", *RUN, f"--out_dir={out_dir}", *extra],
                          capture_output=True, text=True, env=env, timeout=300)


def loss_rows(out_dir):
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: r[k] for k in LOSS_KEYS if k in r}) for r in rows if "goodput" not in r]


def final_arrays(out_dir):
    newest = checkpoint.checkpoint_dirs(out_dir)[0]
    with np.load(newest / checkpoint.ARRAYS, allow_pickle=False) as z:
        return newest.name, {k: z[k] for k in z.files}


def tensorboard_steps(out_dir, tag="loss"):
    """Steps of `tag` as TensorBoard shows them: a SessionLog START at step s (purge_step)
    hides events at steps >= s that were written before it."""
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    steps = []
    for path in sorted((Path(out_dir) / "tb").glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            if pos + 12 + length + 4 > len(data):
                break  # a record cut short by a kill
            event = Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                steps = [s for s in steps if s < event.step]
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def uninterrupted(tmp_path_factory, devices):
    out = tmp_path_factory.mktemp(f"reference{devices}")
    result = run_train(out, devices=devices)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    return uninterrupted(tmp_path_factory, devices=8)


@pytest.fixture(scope="module")
def reference_one_device(tmp_path_factory, cache_dir):
    return uninterrupted(tmp_path_factory, devices=1)


def assert_same_as_reference(out, reference):
    assert loss_rows(out) == loss_rows(reference)
    steps = [s for s, r in loss_rows(out) if "loss" in r]
    assert steps == list(range(1, 31))  # no step twice
    name, arrays = final_arrays(out)
    ref_name, ref_arrays = final_arrays(reference)
    assert name == ref_name == "step_00000030" and arrays.keys() == ref_arrays.keys()
    for key in arrays:
        assert arrays[key].tobytes() == ref_arrays[key].tobytes(), key  # bit-identical
    assert tensorboard_steps(out) == list(range(1, 31))


@pytest.mark.parametrize("fault", [
    "step_4:SIGKILL",  # before the first checkpoint: restarts from scratch
    "step_14:SIGKILL",  # between checkpoints
    "save_00000020_arrays:SIGKILL",  # mid-write: arrays written, no sidecar, not renamed
    "save_00000020_meta:SIGKILL",  # complete but not yet renamed into place
    "save_00000010_renamed:SIGKILL",  # renamed, older checkpoints not yet pruned
    "step_30:SIGKILL",  # the last step, before the final checkpoint
])
def test_killed_run_resumes_exactly(tmp_path, reference, fault):
    killed = run_train(tmp_path, fault=fault)
    assert killed.returncode == -9, killed.stderr
    resumed = run_train(tmp_path)  # the same command again
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(tmp_path, reference)
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


@pytest.mark.parametrize("fault", ["step_14:SIGKILL", "save_00000020_arrays:SIGKILL"])
def test_killed_run_resumes_exactly_on_one_device(tmp_path, reference_one_device, fault):
    assert run_train(tmp_path, fault=fault, devices=1).returncode == -9
    resumed = run_train(tmp_path, devices=1)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_as_reference(tmp_path, reference_one_device)


@pytest.mark.parametrize("fault, devices, saved", [
    # The request goes into the next step dispatched, and the stop agreed in a step is
    # acted on after the next: a signal while step s runs saves step s + 2.
    ("step_17:SIGTERM", 1, 19),  # while step 17 runs
    ("step_17:SIGTERM", 8, 19),
    ("fetch_17:SIGTERM", 8, 19),  # while the host waits for step 17's metrics
    ("eval_20:SIGTERM", 8, 22),  # during an evaluation
    # While checkpoint 20 is written in the background: the steps go on meanwhile, so the
    # signal lands while step 21, 22 or 23 is dispatched; the run saves that step + 1 and exits 75.
    ("save_00000020_arrays:SIGTERM", 8, (22, 23, 24)),
])
def test_sigterm_anywhere_in_the_loop_saves_the_step_it_reports(tmp_path, reference, reference_one_device, fault,
                                                                 devices, saved):
    stopped = run_train(tmp_path, fault=fault, devices=devices)
    assert stopped.returncode == errors.EXIT_INTERRUPTED, stopped.stderr
    assert "SIGTERM received" in stopped.stdout
    reported = int(re.search(r"stopped by SIGTERM at step (\d+); checkpoint saved", stopped.stdout)[1])
    assert reported in (saved if isinstance(saved, tuple) else (saved,)), stopped.stdout
    assert checkpoint.checkpoint_dirs(tmp_path)[0].name == f"step_{reported:08d}"
    resumed = run_train(tmp_path, devices=devices)
    assert resumed.returncode == 0 and f"resuming from step {reported}" in resumed.stdout
    assert_same_as_reference(tmp_path, reference if devices == 8 else reference_one_device)


def test_second_signal_exits_at_once(tmp_path, cache_dir):
    result = run_train(tmp_path, fault="step_5:SIGTERM*2")
    assert result.returncode == 128 + 15
    assert not checkpoint.checkpoint_dirs(tmp_path)  # no time was spent saving


@pytest.mark.parametrize("damage", ["truncate", "garble", "half_written"])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, reference, damage):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    newest = checkpoint.checkpoint_dirs(tmp_path)[0]
    data = (newest / checkpoint.ARRAYS).read_bytes()
    if damage == "truncate":
        (newest / checkpoint.ARRAYS).write_bytes(data[: len(data) // 3])
    elif damage == "garble":
        (newest / checkpoint.ARRAYS).write_bytes(data[:500] + bytes(64) + data[564:])
    else:
        (newest / checkpoint.META).unlink()
    result = run_train(tmp_path, "--max_iters=30")
    assert result.returncode == 0, result.stderr
    reports = [line for line in result.stderr.splitlines() if line.startswith("skipping")]
    assert len(reports) == 1 and "step_00000030" in reports[0]
    assert "resuming from step 20" in result.stdout
    assert_same_as_reference(tmp_path, reference)


def test_nonfinite_updates_are_skipped_then_stop_the_run(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    before = final_arrays(tmp_path)
    # Resuming at a constant lr of 1e30 (a schedule change is allowed): the first update blows the weights
    # up, every later loss is non-finite, each such update is skipped and counted.
    result = run_train(tmp_path, "--max_iters=60", "--learning_rate=1e30", "--decay_lr=false",
                       "--max_nonfinite=5", "--ckpt_interval=100")
    assert result.returncode == errors.EXIT_NONFINITE, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 5 consecutive non-finite updates")
    skipped = [r.get("nonfinite_skipped") for s, r in
               ((json.loads(x)["step"], json.loads(x)) for x in (tmp_path / "metrics.jsonl").read_text().splitlines())
               if s > 30 and "nonfinite_skipped" in r]
    assert skipped and skipped == sorted(skipped) and skipped[-1] >= 1
    name, arrays = final_arrays(tmp_path)
    assert name == before[0] == "step_00000030"
    assert all(arrays[k].tobytes() == before[1][k].tobytes() for k in arrays)


@pytest.mark.parametrize("args, message", [
    (["--n_embd=64"], "cannot resume: the checkpoint differs in n_embd (32 -> 64)"),
    (["--n_layer=3", "--bias=false"], "differs in n_layer (2 -> 3), bias (True -> False)"),
    (["--init_from=scratch"], "already holds checkpoints"),
])
def test_mismatched_resume_is_refused_and_changes_nothing(tmp_path, reference, args, message, capsys, snapshot):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path)
    code = train.main([*RUN, f"--out_dir={tmp_path}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert snapshot(tmp_path) == before


def test_run_length_changes_are_allowed_and_logged(tmp_path, reference, capsys):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    code = train.main([*RUN, f"--out_dir={tmp_path}", "--max_iters=32", "--lr_decay_iters=40"])
    out = capsys.readouterr().out
    assert code == 0
    assert "resuming with changed settings: lr_decay_iters 20 -> 40, max_iters 30 -> 32" in out
    assert checkpoint.checkpoint_dirs(tmp_path)[0].name == "step_00000032"


def test_unwritable_out_dir_is_refused_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    code = train.main([*RUN, f"--out_dir={blocker / 'run'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "is not writable" in err[0] and "choose another out_dir" in err[0]
    assert blocker.read_text() == "not a directory"


def test_full_disk_fails_cleanly_and_keeps_earlier_checkpoints(tmp_path, reference, snapshot):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    before = {p.name: snapshot(p) for p in checkpoint.checkpoint_dirs(tmp_path)}

    # Files may not grow past 64 KiB, so the checkpoint write fails with "File too large"
    # (SIGXFSZ ignored: the write returns EFBIG instead of killing the process).
    small_files = ("import resource, runpy, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY)); "
                   "runpy.run_module('parallel_gpt.train', run_name='__main__')")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    # Checkpoint 40 fails in the background and stops the run at step 41; 50 is never reached.
    result = subprocess.run([sys.executable, "-c", small_files, *RUN, f"--out_dir={tmp_path}", "--max_iters=50"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write checkpoint") and "untouched" in err[0]
    assert {p.name: snapshot(p) for p in checkpoint.checkpoint_dirs(tmp_path)} == before
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


@pytest.mark.parametrize("fault, said", [
    ("start_join:SIGTERM", "SIGTERM received while joining the process group"),  # stderr, at once
    ("start_data:SIGINT", "stopped by SIGINT during start-up"),  # was a KeyboardInterrupt traceback
    ("start_resumed:SIGTERM", "stopped by SIGTERM during start-up"),  # "resuming from step 30" just printed
])
def test_a_signal_during_start_up_ends_with_75_and_keeps_the_checkpoints(tmp_path, reference, fault, said, snapshot):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    before = snapshot(tmp_path / "checkpoints")
    result = run_train(tmp_path, "--max_iters=40", fault=fault)
    assert result.returncode == errors.EXIT_INTERRUPTED, result.stderr
    assert said in result.stdout + result.stderr and "Traceback" not in result.stderr
    assert snapshot(tmp_path / "checkpoints") == before


def test_the_same_data_under_another_path_resumes_and_other_data_does_not(tmp_path, reference, cache_dir, capsys):
    # The reference trained on the Shakespeare default; a copy of its prepared tokens is the
    # same data under another name, and one token changed is other data under the same name.
    folder = cache_dir / "shakespeare"  # the char-level corpus the reference trained on (not shakespeare-gpt2)
    same = shutil.copytree(folder, tmp_path / "same")
    shutil.copytree(reference, tmp_path / "run")
    code = train.main([*RUN, f"--out_dir={tmp_path / 'run'}", f"--dataset={same}", "--max_iters=31"])
    out = capsys.readouterr().out
    assert code == 0 and f"dataset 'shakespeare' -> '{same}'" in out, out
    tokens = bytearray((same / "train.bin").read_bytes())
    tokens[0] ^= 1
    (same / "train.bin").write_bytes(bytes(tokens))
    meta = json.loads((same / "meta.json").read_text())
    meta["sha256"]["train.bin"] = hashlib.sha256(tokens).hexdigest()
    (same / "meta.json").write_text(json.dumps(meta))
    code = train.main([*RUN, f"--out_dir={tmp_path / 'run'}", f"--dataset={same}", "--max_iters=32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "differs in dataset content" in err[0], err


def test_a_device_count_change_is_listed(tmp_path, reference):
    shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
    result = run_train(tmp_path, "--max_iters=31", devices=4)
    assert result.returncode == 0, result.stderr
    assert "resuming with changed settings: max_iters 30 -> 31, devices 8 -> 4" in result.stdout


def assert_close_to(out, reference):
    """The same run as `reference` up to float32 rounding (another state layout)."""
    got, want = loss_rows(out), loss_rows(reference)
    assert [s for s, _ in got] == [s for s, _ in want]
    for (step, g), (_, w) in zip(got, want):
        for k in w:
            np.testing.assert_allclose(g[k], w[k], rtol=1e-5, err_msg=f"{k} at step {step}")
    (name, arrays), (ref_name, ref_arrays) = final_arrays(out), final_arrays(reference)
    assert name == ref_name and arrays.keys() == ref_arrays.keys()
    for key in arrays:
        np.testing.assert_allclose(arrays[key], ref_arrays[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def reference_without_dropout(tmp_path_factory, cache_dir):
    """1 device, replicated, unrolled, dropout 0: masks would differ with the device count."""
    out = tmp_path_factory.mktemp("reference-nodrop")
    assert run_train(out, "--dropout=0.0", devices=1).returncode == 0
    return out


@pytest.mark.parametrize("first, then", [
    ((8, "--state_sharding=full", "--scan_layers=true"), (1, "--state_sharding=replicated", "--scan_layers=false")),
    ((1, "--state_sharding=replicated", "--scan_layers=false"), (8, "--state_sharding=full", "--scan_layers=true")),
])
def test_a_checkpoint_resumes_at_any_level_on_any_device_count(tmp_path, reference_without_dropout, first, then):
    # Checkpoints are logical (whole arrays, a block per name), so the layout is free to change.
    stopped = run_train(tmp_path, "--dropout=0.0", "--max_iters=20", *first[1:], devices=first[0])
    assert stopped.returncode == 0, stopped.stderr
    resumed = run_train(tmp_path, "--dropout=0.0", *then[1:], devices=then[0])
    assert resumed.returncode == 0, resumed.stderr
    assert "state_sharding" in resumed.stdout.split("resuming with changed settings:")[1].splitlines()[0]
    assert_close_to(tmp_path, reference_without_dropout)


@pytest.mark.parametrize("fault, code, resumes_from", [
    ("save_00000020_arrays:SIGKILL", -9, 10),  # mid-write: the previous checkpoint stands, whole
    ("step_17:SIGTERM", errors.EXIT_INTERRUPTED, 19),  # the agreed stop saves the step it reports
])
def test_a_run_at_level_full_stopped_anywhere_resumes(tmp_path, reference, fault, code, resumes_from):
    full = ("--state_sharding=full", "--scan_layers=true")
    stopped = run_train(tmp_path, *full, fault=fault)
    assert stopped.returncode == code, stopped.stderr
    newest = checkpoint.checkpoint_dirs(tmp_path)[0]
    assert newest.name == f"step_{resumes_from:08d}"
    checkpoint.load(newest)  # whole: it verifies
    resumed = run_train(tmp_path, *full)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from step {resumes_from}" in resumed.stdout
    assert_close_to(tmp_path, reference)
