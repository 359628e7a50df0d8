"""launch/local.py: N processes of one command, their output prefixed, signals forwarded,
the rest stopped when one fails. Plain Python commands stand in for the trainer here
(tests/test_multiprocess.py runs the trainer through it)."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCAL = ROOT / "launch" / "local.py"
_spec = importlib.util.spec_from_file_location("launch_local", LOCAL)
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)


def launch(*args, code, timeout=60):
    return subprocess.run([sys.executable, str(LOCAL), *args, "--", sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=timeout)


def test_each_process_gets_its_identity_and_its_lines_are_prefixed():
    code = ("import os; print(os.environ['JAX_PROCESS_ID'], os.environ['JAX_NUM_PROCESSES'], "
            "os.environ['JAX_COORDINATOR_ADDRESS'], os.environ['JAX_NUM_CPU_DEVICES'], "
            "os.environ['JAX_LOCAL_DEVICE_IDS'])")
    result = launch("--num_processes", "3", "--devices_per_process", "2", "--port", "4321", code=code)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"[p{i}] {i} 3 127.0.0.1:4321 2 {2 * i},{2 * i + 1}" for i in range(3)]


def test_proxy_settings_do_not_reach_the_processes():
    env = local.process_env({"https_proxy": "http://proxy:3128", "NO_PROXY": "x", "HOME": "/h"}, 1, 2, 1234, None)
    assert not [k for k in env if "proxy" in k.lower()] and env["HOME"] == "/h"
    assert "JAX_NUM_CPU_DEVICES" not in env


def test_a_failure_stops_the_others_and_gives_its_exit_code():
    code = "import os, sys, time; sys.exit(3) if os.environ['JAX_PROCESS_ID'] == '1' else time.sleep(60)"
    t = time.monotonic()
    result = launch("--num_processes", "2", "--grace", "5", code=code)
    assert result.returncode == 3 and time.monotonic() - t < 30
    assert "[launch] process 1 exited with code 3: stopping the others" in result.stderr


def test_sigterm_reaches_every_process():
    code = ("import os, signal, sys, time\n"
            "signal.signal(signal.SIGTERM, lambda *_: (print('term', flush=True), sys.exit(75)))\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, str(LOCAL), "--num_processes", "2", "--", sys.executable, "-c", code],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = [proc.stdout.readline() for _ in range(2)]  # both have installed their handler
    assert sorted(ready) == ["[p0] ready\n", "[p1] ready\n"]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 75 and sorted(out.splitlines()) == ["[p0] term", "[p1] term"]


def test_no_command_is_one_line_and_exit_code_2():
    result = subprocess.run([sys.executable, str(LOCAL), "--num_processes", "2"], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0 and "give it after --" in result.stderr


def test_runs_from_any_directory(tmp_path):
    result = subprocess.run([sys.executable, str(LOCAL), "--num_processes", "1", "--", sys.executable, "-c",
                             "print('ok')"], capture_output=True, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0 and result.stdout == "[p0] ok\n"
