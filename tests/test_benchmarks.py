"""Smoke tests of benchmarks/: figures present and sane, never how fast."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


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


def test_model_config_pads_the_vocabulary_and_resolves_the_backends_for_the_devices(bench_modules):
    from common import model_config

    cpu = model_config(1, 2, 32, 16, 77, "cpu", "float32")
    assert (cpu.n_layer, cpu.n_head, cpu.n_embd, cpu.block_size) == (1, 2, 32, 16)
    assert (cpu.vocab_size, cpu.dropout, cpu.remat) == (128, 0.0, "none")
    assert (cpu.attention, cpu.layernorm_backward) == ("cpu_blocks", "explicit")
    gpu = model_config(1, 2, 32, 16, 77, "gpu", "bfloat16", remat="full")
    assert (gpu.attention, gpu.layernorm_backward, gpu.remat) == ("cudnn", "autodiff", "full")
    unresolved = model_config(1, 2, 32, 16, 77, None, "float32")  # a shape check, before any device is chosen
    assert (unresolved.attention, unresolved.layernorm_backward) == ("auto", "auto")
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        model_config(1, 4, 30, 16, 77, None, "float32")


def test_time_alternating_rotates_the_first_runner_and_refuses_a_compile_while_timing(bench_modules):
    import jax
    from common import time_alternating

    order = []

    class Fake:
        def __init__(self, name, compiles=False):
            self.name, self.compiles = name, compiles

        def run(self, n):
            order.append(self.name)
            if self.compiles:
                jax.jit(lambda x: x + 1)(1.0)  # a new function: traced and compiled anew
            return 2.0 * n

    per_step = time_alternating({"a": Fake("a"), "b": Fake("b"), "c": Fake("c")}, rounds=3, steps=4)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert per_step == {"a": [2.0] * 3, "b": [2.0] * 3, "c": [2.0] * 3}
    with pytest.raises(RuntimeError, match="1 JAX compilation"):
        time_alternating({"a": Fake("a", compiles=True)}, rounds=1, steps=1)


def test_median_ratio_is_the_median_of_the_rounds_ratios(bench_modules):
    from common import median_ratio

    # Ratios 1, 0.5 and 3: median 1, where the ratio of the medians would be 2 / 1.
    assert median_ratio([1.0, 2.0, 3.0], [1.0, 4.0, 1.0]) == 1.0
    with pytest.raises(ValueError):
        median_ratio([1.0], [1.0, 2.0])


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


def test_attention_benchmark_times_each_kernel_that_runs_here():
    cmd = [sys.executable, str(BENCH / "attention.py"), "--heads", "2", "--head_size", "8", "--batch", "2",
           "--seq", "16", "70", "--calls", "1", "--rounds", "2"]
    proc = subprocess.run(cmd, env=SMOKE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("cpu, 2 x 2 heads x 8, float32")
    for T, line in zip((16, 70), lines[1:]):
        name_ms = dict(part.rsplit(" ", 2)[:2] for part in line.split(": ", 1)[1].split(", "))
        assert line.startswith(f"T = {T}: ") and set(name_ms) == {"cpu_blocks", "xla"}
        assert all(positive_finite(float(ms)) for ms in name_ms.values())


def test_prepare_benchmark_reports_throughput_memory_and_batch_time():
    cmd = [sys.executable, str(BENCH / "prepare.py"), "--mb", "2", "--rounds", "1"]
    proc = subprocess.run(cmd, env=SMOKE_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {line[:24].strip(): line[24:].split() for line in proc.stdout.splitlines()[2:5]}
    assert set(rows) == {"prepare, 1 worker", f"prepare, {os.cpu_count()} workers", "plain tiktoken loop"}
    for name, figures in rows.items():  # MB/s, Mtokens/s, peak RSS (MiB) and, with workers, a worker's
        assert len(figures) == (4 if "workers" in name else 3) and all(positive_finite(float(f)) for f in figures)
    assert "host time to build a batch of 8 x 1024 from the memory map" in proc.stdout.splitlines()[5]


def test_goodput_benchmark_times_both_kinds_of_checkpoint(bench_modules, tmp_path):
    import goodput

    figures = goodput.blocked("cpu", 2, tmp_path)
    assert figures["state_bytes"] == 12 * figures["params"]
    assert all(positive_finite(figures[k]) for k in ("foreground_s", "background_s", "background_over_foreground"))
    assert [p.name for p in (tmp_path / "ckpt_cpu" / "checkpoints").iterdir()] == ["step_00000004"]  # keep=1


def test_generate_floor_is_every_weight_once_and_each_rows_cache_up_to_its_position(bench_modules):
    import jax
    import jax.numpy as jnp
    from generate import step_bytes
    from parallel_gpt.model import GPT, GPTConfig

    config = GPTConfig(n_layer=2, n_head=2, n_embd=8, block_size=16, vocab_size=32, vocab_tokens=30,
                       dropout=0.0).for_platform("cpu")
    model = GPT.create(config, key=jax.random.key(0))
    weights = sum(x.size for x in jax.tree.leaves(model)) - 16 * 8 + 8  # of the position table, one row
    # 3 new tokens after a 5-token prompt: the steps read the cache up to positions 5, 6, 7 (6, 7, 8 entries).
    assert step_bytes(model, 2, 5, 3) == 4 * weights + 4 * 2 * 2 * 2 * 7 * 8  # keys and values, layers, rows
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model)
    assert step_bytes(half, 2, 5, 3) == step_bytes(model, 2, 5, 3) / 2


def test_generate_profile_sums_the_decode_programs_ops_by_kind(bench_modules, capsys):
    from generate import profile

    profile("char1", steps=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("char1: decode step ") and "ops by kind" in lines[0]
    kinds = {line.split()[3]: float(line.split()[0]) for line in lines[1:-1]}  # "  2.04 ms     48  dot"
    assert kinds and "while" not in kinds and all(ms >= 0 for ms in kinds.values())
    assert {"dot", "ynn_fusion"} & set(kinds)  # the products are traced
