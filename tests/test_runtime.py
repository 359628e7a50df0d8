"""Process setup: the malloc setting, checked in fresh processes (it is process-wide)."""

import os
import platform
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

KEEP_FREED_PROBE = """
import ctypes, os, sys
from parallel_gpt import runtime
applied = runtime.keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
block = libc.malloc(64 << 20)
ctypes.memset(block, 1, 64 << 20)  # touch every page
libc.free(block)
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
print(applied, rss >> 20)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a glibc malloc setting")
def test_keep_freed_memory_keeps_a_freed_block_in_the_process():
    def probe(mode, platforms="cpu"):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": platforms}
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    (kept_applied, kept_mib), (_, default_mib) = probe("keep"), probe("default")
    assert kept_applied
    # By default a 64 MiB block is mmapped and unmapped on free; with the setting it stays.
    assert kept_mib - default_mib > 48, (kept_mib, default_mib)
    assert probe("keep", platforms="cuda,cpu")[0] is False  # accelerator runs keep glibc's defaults


def test_process_settings_come_from_flags_then_jax_environment_variables():
    from parallel_gpt.runtime import ProcessConfig

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert ProcessConfig().resolved(env) == ProcessConfig("10.0.0.1:1234", 4, 3)
    assert ProcessConfig(num_processes=2, process_id=1).resolved(env) == ProcessConfig("10.0.0.1:1234", 2, 1)
    assert ProcessConfig().resolved({}) == ProcessConfig()
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='x' must be an integer"):
        ProcessConfig().resolved({"JAX_PROCESS_ID": "x"})


@pytest.mark.parametrize("flags, message", [
    (["--process_id=2", "--num_processes=2"], "process_id=2 must be in [0, num_processes)"),
    (["--step_timeout=0"], "step_timeout=0 must be a positive number of seconds"),
    (["--num_processes=0"], "num_processes=0 must be at least 1"),
])
def test_bad_process_settings_are_config_errors(flags, message):
    from parallel_gpt.config import ConfigError, parse_overrides, process_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        process_config(parse_overrides(flags)[1])


def test_no_cluster_here_means_one_process():
    from parallel_gpt.runtime import ProcessConfig, detected_cluster, start_processes

    assert detected_cluster() is None
    assert start_processes(ProcessConfig()) is None  # no group joined: jax.distributed stays uninitialised


def test_a_process_prefixed_fault_acts_only_in_that_process(monkeypatch):
    from parallel_gpt import faults

    monkeypatch.setenv("PARALLEL_GPT_FAULT", "p1/step_3:SIGKILL")
    faults.fault_point("step_3")  # this is process 0: nothing happens
    monkeypatch.setenv("PARALLEL_GPT_FAULT", "p0/step_3:SIGUSR1")
    received = []
    old = signal.signal(signal.SIGUSR1, lambda *_: received.append(1))
    try:
        faults.fault_point("step_4")
        assert not received
        faults.fault_point("step_3")
        assert received == [1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_watchdog_reports_the_slowest_step_without_evaluations(monkeypatch):
    from parallel_gpt import runtime

    dog = runtime.Watchdog(timeout=60)
    times = iter([0.0, 1.0, 1.5, 3.0, 13.0, 14.0, 14.2])
    monkeypatch.setattr(runtime.time, "monotonic", lambda: next(times))
    Phase = runtime.Phase
    dog.phase(Phase.STEP, "step 1")  # 0.0
    dog.phase(Phase.STEP_WAIT, "the metrics")  # 1.0
    dog.phase(Phase.STEP, "step 2")  # 1.5: step 1 took 1.5 s
    dog.phase(Phase.WAIT, "the evaluation at step 2")  # 3.0
    dog.phase(Phase.WORK, "writing checkpoint 2")  # 13.0: evaluations and saves are not a step's time
    dog.phase(Phase.STEP, "step 3")  # 14.0
    dog.phase(Phase.STEP, "step 4")  # 14.2
    assert dog.slowest == 1.5 and dog.label == "step 4"
