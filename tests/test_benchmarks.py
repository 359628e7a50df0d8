"""Smoke tests of benchmarks/ (figures present and sane, never how fast) and the MFU arithmetic."""

import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import types
from pathlib import Path

import pytest

from parallel_gpt import perf

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--block_size", "16"]
# Structure, not speed: XLA's lowest optimisation level about halves the compile times.
SMOKE_ENV = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture
def bench_modules(monkeypatch):
    """benchmarks/ importable as top-level modules, as when its scripts run."""
    monkeypatch.syspath_prepend(str(BENCH))


def test_throughput_weak_sweep_reports_every_figure(tmp_path):
    out = tmp_path / "tiny.json"
    cmd = [sys.executable, str(BENCH / "throughput.py"), *TINY, "--batch_size", "8", "--steps", "2",
           "--rounds", "1", "--warmup", "1", "--devices", "1,2", "--sweep", "weak", "--json", str(out)]
    proc = subprocess.run(cmd, env=SMOKE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| devices | global batch |" in proc.stdout and "weak scaling" in proc.stdout

    report = json.loads(out.read_text())
    points = report["points"]
    assert [(p["devices"], p["global_batch"], p["per_device_batch"]) for p in points] == [(1, 8, 8), (2, 16, 8)]
    for p in points:
        for key in ("compile_s", "step_s", "tokens_per_s", "peak_flops", "mfu", "host_batch_s",
                    "host_batch_fraction", "params", "flops_per_token"):
            assert positive_finite(p[key]), (key, p[key])
        assert p["tokens_per_step"] == p["global_batch"] * 16
        assert p["peak_memory_bytes"] is None  # the CPU backend keeps no allocator statistics
        assert p["platform"] == "cpu"
    jit = points[0]["jit"]  # plain jit runs beside the 1-device pmap step only
    assert all(positive_finite(jit[k]) for k in ("compile_s", "step_s", "tokens_per_s", "pmap_over_jit"))
    assert "jit" not in points[1]
    assert [r["devices"] for r in report["weak"]] == [1, 2]
    assert report["weak"][0]["efficiency"] == 1.0
    assert all(positive_finite(r["efficiency"]) for r in report["weak"])
    assert "strong" not in report


def test_scaling_efficiency_is_throughput_per_device_relative_to_the_base(bench_modules):
    import throughput

    rows = throughput.scaling([{"devices": 1, "global_batch": 8, "tokens_per_s": 100.0},
                               {"devices": 4, "global_batch": 32, "tokens_per_s": 300.0}])
    assert [r["speedup"] for r in rows] == [1.0, 3.0]
    assert [r["efficiency"] for r in rows] == [1.0, 0.75]


def test_strong_sweep_rejects_a_global_batch_the_devices_do_not_divide(bench_modules):
    import throughput

    args = throughput.parse_args([*TINY, "--batch_size", "6", "--devices", "1,4", "--sweep", "strong"])
    with pytest.raises(SystemExit, match="global batch 6"):
        throughput.plan(args)


def test_mfu_is_model_flops_over_peak():
    # 6 MFLOP/token x 100k tokens/s = 0.6 TFLOP/s of a 1.2 TFLOP/s peak.
    assert perf.mfu(6e6, 1e5, 1.2e12) == pytest.approx(0.5)
    assert perf.mfu(6e6, 1e5, None) is None


KEEP_FREED_PROBE = """
import ctypes, os, sys
from parallel_gpt import perf
applied = perf.keep_freed_memory() if sys.argv[1] == "keep" else False
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
        out = subprocess.run([sys.executable, "-c", KEEP_FREED_PROBE, mode], env={**SMOKE_ENV, "JAX_PLATFORMS": platforms},
                             capture_output=True, text=True, check=True).stdout.split()
        return out[0] == "True", int(out[1])

    (kept_applied, kept_mib), (_, default_mib) = probe("keep"), probe("default")
    assert kept_applied
    # By default a 64 MiB block is mmapped and unmapped on free; with the setting it stays.
    assert kept_mib - default_mib > 48, (kept_mib, default_mib)
    assert probe("keep", platforms="cuda,cpu")[0] is False  # accelerator runs keep glibc's defaults


def test_peak_flops_looks_up_the_device_kind_and_counts_devices():
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    assert perf.peak_flops([h100], "bfloat16") == 989e12
    assert perf.peak_flops([h100] * 8, "bfloat16") == 8 * 989e12
    assert perf.peak_flops([h100], "float32") == 494e12
    unknown = types.SimpleNamespace(platform="gpu", device_kind="Some Future GPU")
    assert perf.peak_flops([unknown], "bfloat16") is None


# find_spec, not importorskip: importing torch here would cost seconds and the script imports it anyway.
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="PyTorch is a benchmark extra: pip install torch")
def test_compare_pytorch_runs_the_same_model_in_both(tmp_path):
    out = tmp_path / "cmp.json"
    # torch.compile is left out: its first compile alone takes about a minute on 2 cores.
    cmd = [sys.executable, str(BENCH / "compare_pytorch.py"), "--shapes", "1,2,32,16,4", "--steps", "1",
           "--rounds", "1", "--warmup", "0", "--no_compile", "--json", str(out)]
    proc = subprocess.run(cmd, env=SMOKE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| shape (L, H, C, T, B) |" in proc.stdout
    (shape,) = json.loads(out.read_text())["shapes"]
    # Same weights, same batch: the PyTorch model is our model.
    assert shape["first_batch_loss"]["torch"] == pytest.approx(shape["first_batch_loss"]["jax"], rel=1e-5)
    assert set(shape["results"]) == {"ours (JAX pmap, 1 device)", "PyTorch eager"}
    for r in shape["results"].values():
        assert all(positive_finite(r[k]) for k in ("first_step_s", "step_s", "tokens_per_s", "ours_over_this"))
