"""Process setup: the malloc setting, checked in fresh processes (it is process-wide)."""

import os
import platform
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
