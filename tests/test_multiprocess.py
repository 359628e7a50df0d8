"""Training on several real processes: `jax.distributed` on 127.0.0.1 with gloo CPU
collectives, 2 processes x 2 simulated devices against 1 process x 4 devices.

Faults land at exact places through PARALLEL_GPT_FAULT with a process prefix
("p1/step_12:SIGTERM", see faults.fault_point); no test sleeps and hopes. Every
process has a timeout, so a hang fails the test instead of the suite.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from parallel_gpt import checkpoint, errors
from parallel_gpt.fatal_filter import summary

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "launch" / "local.py"
_spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

RUN = ["--preset", "tiny", "--max_iters=16", "--ckpt_interval=8", "--eval_interval=8", "--log_interval=1",
       "--sample_tokens=0"]
LOSS_KEYS = ("loss", "grad_norm", "train_loss", "val_loss")
BOUND_S = 30  # every failure below must end every process within this many seconds


def cli(*args, devices=4):
    """One process with `devices` CPU devices."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    env.pop("PARALLEL_GPT_FAULT", None)
    return subprocess.run([sys.executable, "-m", "parallel_gpt.train", *RUN, *args], capture_output=True, text=True,
                          env=env, timeout=300)


def launched(*args, fault=None):
    """2 processes x 2 devices through launch/local.py."""
    env = {k: v for k, v in os.environ.items() if k != "PARALLEL_GPT_FAULT"}
    if fault:
        env["PARALLEL_GPT_FAULT"] = fault
    return subprocess.run([sys.executable, str(LOCAL), "--num_processes", "2", "--devices_per_process", "2", "--",
                           sys.executable, "-m", "parallel_gpt.train", *RUN, *args],
                          capture_output=True, text=True, env=env, timeout=300)


def start_group(logs: Path, args_of, fault=None, n=2):
    """n processes started directly (no launcher that would stop the survivors for them),
    their output in files under `logs`; `args_of(i)`: process i's extra arguments."""
    logs.mkdir()
    port = local.free_port()
    procs = []
    for i in range(n):
        env = local.process_env(os.environ, i, n, port, 2)
        env.pop("PARALLEL_GPT_FAULT", None)
        if fault:
            env["PARALLEL_GPT_FAULT"] = fault
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-m", "parallel_gpt.train", *RUN, *args_of(i)], env=env,
                                          stdout=out, stderr=err))
    return procs


def finish(procs, logs: Path, timeout=BOUND_S + 120):
    """[(exit code, exit time, stdout, stderr)] of each process, killing all at `timeout`."""
    start, ends = time.monotonic(), [None] * len(procs)
    while None in ends and time.monotonic() - start < timeout:
        for i, p in enumerate(procs):
            if ends[i] is None and p.poll() is not None:
                ends[i] = time.monotonic()
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
    time.sleep(0.5)  # the stderr filter writes its line once its process has ended
    return [(p.wait(), end, (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text())
            for i, (p, end) in enumerate(zip(procs, ends))]


def rows(out_dir):
    """The step rows of metrics.jsonl (not the goodput row each process's run ends with)."""
    rows = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "goodput" not in r]


def newest_arrays(out_dir):
    newest = checkpoint.checkpoint_dirs(out_dir)[0]
    with np.load(newest / checkpoint.ARRAYS, allow_pickle=False) as z:
        return newest.name, {k: z[k] for k in z.files}


def assert_same_run(out, reference):
    got, want = rows(out), rows(reference)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in LOSS_KEYS:
            if k in w:
                np.testing.assert_allclose(g[k], w[k], rtol=1e-5, err_msg=f"{k} at step {w['step']}")
    (name_g, a), (name_w, b) = newest_arrays(out), newest_arrays(reference)
    assert name_g == name_w and a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)


def assert_checkpoints_whole(out_dir):
    """No temporary directory left, and every checkpoint verifies."""
    root = Path(out_dir) / "checkpoints"
    assert not list(root.glob(".tmp*"))
    for path in checkpoint.checkpoint_dirs(out_dir):
        checkpoint.load(path)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, cache_dir):
    """1 process x 4 devices, dropout 0 and 0.1: the references."""
    outs = {}
    for dropout in ("0.0", "0.1"):
        out = tmp_path_factory.mktemp(f"one-{dropout}")
        result = cli(f"--out_dir={out}", f"--dropout={dropout}")
        assert result.returncode == 0, result.stderr
        outs[dropout] = out
    return outs


@pytest.mark.parametrize("dropout, layout", [("0.0", ()), ("0.1", ()),
                                             ("0.1", ("--state_sharding=full", "--scan_layers=true"))])
def test_two_processes_train_as_one(tmp_path, one_process, dropout, layout):
    # At level full every process holds a quarter of the state and the checkpoint is gathered.
    result = launched(f"--out_dir={tmp_path}", f"--dropout={dropout}", *layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "4 cpu device(s) in 2 processes" in result.stdout
    assert not [line for line in result.stdout.splitlines() if line.startswith("[p1] step")]  # only process 0 logs
    assert_same_run(tmp_path, one_process[dropout])


def test_sigterm_on_one_process_stops_both_at_one_step_and_resumes_exactly(tmp_path, one_process):
    stopped = launched(f"--out_dir={tmp_path}", "--dropout=0.1", fault="p1/step_11:SIGTERM")
    assert stopped.returncode == errors.EXIT_INTERRUPTED, stopped.stdout + stopped.stderr
    exits = [line for line in stopped.stderr.splitlines() if "exited with code" in line]
    assert "[p0] stopped by SIGTERM at step 13; checkpoint saved" in stopped.stdout, stopped.stdout
    # Both processes saved step 13 together: 8 (the interval) and 13, nothing else.
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000013", "step_00000008"], exits
    resumed = launched(f"--out_dir={tmp_path}", "--dropout=0.1")
    assert resumed.returncode == 0 and "resuming from step 13" in resumed.stdout, resumed.stdout + resumed.stderr
    assert_same_run(tmp_path, one_process["0.1"])


@pytest.mark.parametrize("killed", [1, 0])
def test_a_killed_process_ends_the_other_quickly_with_one_line(tmp_path, cache_dir, killed):
    # A dead process is noticed when its heartbeats stop: within heartbeat_timeout.
    procs = start_group(tmp_path / "logs", lambda i: [f"--out_dir={tmp_path}", "--max_iters=400", "--ckpt_interval=5",
                                                      "--heartbeat_timeout=10"], fault=f"p{killed}/step_7:SIGKILL")
    (code0, end0, _, err0), (code1, end1, _, err1) = finish(procs, tmp_path / "logs")
    codes, ends, errs = [code0, code1], [end0, end1], [err0, err1]
    survivor = 1 - killed
    assert codes[killed] == -9
    assert codes[survivor] != 0 and ends[survivor] - ends[killed] < BOUND_S, (codes, errs[survivor])
    print(f"survivor exited {ends[survivor] - ends[killed]:.2f} s after process {killed} was killed")
    lines = [line for line in errs[survivor].splitlines() if line.startswith("error:")]
    who = "process 1 stopped sending heartbeats" if killed == 1 else "lost the coordinator, process 0"
    assert len(lines) == 1 and f"error: process {survivor}: {who}" in lines[0], errs[survivor]
    assert "Check failure stack trace" not in errs[survivor]
    assert_checkpoints_whole(tmp_path)


def test_a_stuck_process_ends_every_process_and_is_named(tmp_path, cache_dir):
    # The timeout bounds the first step, compilation included: 20 s leaves room for that on a
    # loaded 2-core machine (6 s did not), and the hang at step 9 still ends the group.
    procs = start_group(tmp_path / "logs", lambda i: [f"--out_dir={tmp_path}", "--max_iters=400", "--step_timeout=20"],
                        fault="p1/step_9:HANG")
    results = finish(procs, tmp_path / "logs")
    assert all(code != 0 for code, *_ in results)
    errors = "".join(err for *_, err in results)
    # Whichever watchdog fires first names process 1, stuck in its own step 9.
    assert "stuck: process 1 (step 9)" in errors, errors
    assert_checkpoints_whole(tmp_path)


def test_a_process_started_alone_times_out_with_one_line(tmp_path, cache_dir):
    port = local.free_port()
    env = local.process_env(os.environ, 0, 2, port, 2)
    t = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "parallel_gpt.train", *RUN, f"--out_dir={tmp_path}",
                             "--init_timeout=3"], env=env, capture_output=True, text=True, timeout=BOUND_S)
    assert result.returncode == errors.EXIT_PEER and time.monotonic() - t < 3 + 30
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: process 0: the process group did not form within init_timeout=3 s"), result.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_processes_started_differently_name_the_keys(tmp_path, cache_dir):
    procs = start_group(tmp_path / "logs", lambda i: [f"--out_dir={tmp_path}", f"--learning_rate={1e-3 * (i + 1)}",
                                                      f"--seed={i}"])
    results = finish(procs, tmp_path / "logs")
    for i, (code, _, _, err) in enumerate(results):
        assert code == errors.EXIT_BAD_INPUT, err
        assert f"error: process {i}: processes differ from process 0 in learning_rate (process 1), seed (process 1)" \
            in err, err
    assert not (tmp_path / "checkpoints").exists()


FAKE_SRUN = """#!{python}
# srun -n N COMMAND...: start N local tasks with the variables SLURM gives each task.
import os, subprocess, sys
n, command = int(sys.argv[2]), sys.argv[3:]
base = {{k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}}
base.update(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=str(n),
            JAX_COORDINATOR_PORT="{port}", JAX_NUM_CPU_DEVICES="2")
tasks = [subprocess.Popen(command, env={{**base, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)}})
         for i in range(n)]
sys.exit(max(t.wait() for t in tasks))
"""


def test_slurm_is_detected_inside_srun(tmp_path, cache_dir):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(FAKE_SRUN.format(python=sys.executable, port=local.free_port()))
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PARALLEL_GPT_FAULT", "XLA_FLAGS")}
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    out = tmp_path / "out"
    result = subprocess.run(["srun", "-n", "2", sys.executable, "-m", "parallel_gpt.train", *RUN,
                             f"--out_dir={out}", "--max_iters=4"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 processes (slurm)" in result.stdout and "4 cpu device(s) in 2 processes" in result.stdout, result.stdout
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4]


def test_fatal_log_summaries_name_the_failed_process():
    dead = ("F1201 client.h:80] Terminating process because the JAX distributed service detected fatal errors. "
            "absl::Status: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):\n3\n"
            "The tasks have crashed.\n*** Check failure stack trace: ***\n")
    assert summary(dead, "0").startswith("error: process 0: process 3 stopped sending heartbeats")
    leader = dead.split("absl::Status:")[0] + "absl::Status: UNAVAILABLE: the leader task was preempted/died\n"
    assert summary(leader, "2").startswith("error: process 2: lost the coordinator, process 0")


def test_two_processes_fine_tune_a_hugging_face_model_as_one(tmp_path, cache_dir):
    """Process 0 reads the Hugging Face directory and broadcasts the weights."""
    fixture = ROOT / "tests" / "fixtures" / "gpt2_tiny"
    chars = [chr(c) for c in range(33, 127)] + list("éèàçùâ\n")  # the fixture's 101 ids
    text = tmp_path / "t.txt"
    text.write_text("".join(chars) + "".join(np.random.default_rng(0).choice(chars, 20_000)))
    args = (f"--dataset={text}", f"--init_from={fixture}", "--max_iters=4", "--block_size=32")
    one = cli(f"--out_dir={tmp_path / 'one'}", *args)
    assert one.returncode == 0, one.stderr
    two = launched(f"--out_dir={tmp_path / 'two'}", *args)
    assert two.returncode == 0 and "[p0] starting from the Hugging Face checkpoint" in two.stdout, two.stderr
    assert_same_run(tmp_path / "two", tmp_path / "one")


def test_a_signal_on_one_process_during_start_up_ends_every_process_with_75(tmp_path):
    # Process 1's own out_dir is not a mismatch: process 0's is the run's.
    procs = start_group(tmp_path / "logs", lambda i: [f"--out_dir={tmp_path / ('out' if i == 0 else 'elsewhere')}"],
                        fault="p1/start_resumed:SIGTERM")
    results = finish(procs, tmp_path / "logs")
    assert [code for code, *_ in results] == [errors.EXIT_INTERRUPTED] * 2, results
    assert "stopped by SIGTERM during start-up" in results[0][2]
    assert not any("Traceback" in err for *_, err in results) and not (tmp_path / "elsewhere").exists()
