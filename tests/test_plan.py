"""plan: the training step compiled ahead of time, and the report on it.

cpu:8 tests run everywhere (conftest's 8 simulated CPU devices). The TPU tests need libtpu
(`pip install -e '.[tpu]'`, no TPU: the devices are compile-only) and are skipped without
it, as in CI.
"""

import dataclasses
import importlib.util
import json

import jax
import numpy as np
import pytest

from parallel_gpt import errors, parallel, plan, topologies
from parallel_gpt.config import make_config
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.optim import AdamHParams

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="TPU compile-only devices need libtpu: pip install -e '.[tpu]'")
# 256 wide, 64 tokens x 8 rows per device: matmuls are ~99% of the step's FLOPs, so the
# compiled count meets 6N + 12LTC within 2% (at 32 wide and 2 rows, LayerNorm, softmax and
# AdamW add 11%).
SETTINGS = ["--preset", "tiny", "--n_layer=2", "--n_head=4", "--n_embd=256", "--block_size=64", "--batch_size=64",
            "--vocab_size=256"]


def run_plan(capsys, *args):
    code = plan.main([*args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cpu8_report():
    """One compile of the step for cpu:8, shared by the tests that read its report."""
    tconf = make_config("tiny", dict(n_layer=2, n_head=4, n_embd=256, block_size=64, batch_size=64))
    return plan.plan(tconf, plan.target("cpu:8", 1.0), 256)


def test_shard_map_step_equals_pmap_step_bit_for_bit():
    """The step plan compiles is the step train runs: 5 steps with dropout on 8 devices."""
    config = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1).for_platform("cpu")
    hp = AdamHParams(learning_rate=3e-3, warmup_iters=2, lr_decay_iters=10)
    rng = np.random.default_rng(0)
    data = [rng.integers(0, 64, (2, 16, 16)).astype(np.int32) for _ in range(5)]  # (x, y) x (B, T) per step

    def run(wrapper):
        dp = parallel.DataParallel(parallel.make_mesh(8), hp=hp, seed=3)
        state, metrics = dp.place(GPT.create(config, key=jax.random.key(0))), []
        shard_mapped = parallel.shard_map_step(dp.mesh, dp.layout, hp=hp, seed=3)
        for x, y in data:
            if wrapper == "pmap":  # DataParallel's own
                state, m = dp.step(state, *dp.batch(x, y))
            else:
                model, opt, m = shard_mapped(state.model, *dp.batch(x, y), state.opt, dp.stop_input(0))
                state = parallel.TrainState(model, opt)
            metrics.append(m)
        return jax.device_get((state.model, state.opt, metrics))

    pmapped, shard_mapped = run("pmap"), run("shard_map")
    assert jax.tree.structure(pmapped) == jax.tree.structure(shard_mapped)
    for a, b in zip(jax.tree.leaves(pmapped), jax.tree.leaves(shard_mapped)):
        np.testing.assert_array_equal(a, b)
    assert pmapped[1].count == 5 and not any(m["nonfinite"] for m in pmapped[2])  # 5 updates applied


def test_cpu8_bytes_are_the_arithmetic_and_flops_the_formula(cpu8_report):
    r, step = cpu8_report, cpu8_report["step"]
    p = r["parameters"]
    assert r["devices"] == 8 and r["hosts"] == 1
    # Replicated float32 state: 4 bytes per parameter; AdamW's mu and nu 8, plus the int32 count.
    assert step["params"] == pytest.approx(4 * p, rel=0.01)
    assert step["optimizer"] == pytest.approx(8 * p + 4, rel=0.01)
    assert step["batch"] == 2 * 8 * 64 * 4 + 4  # this device's x and y rows, int32, and its stop flag
    assert step["arguments"] == pytest.approx(step["params"] + step["optimizer"] + step["batch"], rel=0.01)
    assert step["flops"] == pytest.approx(step["formula_flops"], rel=0.02)
    assert step["total"] >= step["arguments"] + step["temporaries"] and r["fits"]


def test_cli_cpu8_fits_exit_0_with_json(capsys):
    code, out, err = run_plan(capsys, *SETTINGS, "--topology", "cpu:8", "--memory_limit=1", "--json")
    assert code == plan.EXIT_FITS, err
    report = json.loads(out)
    assert report["fits"] and report["memory"] == 1 << 30 and report["memory_source"] == "--memory_limit"


def test_a_batch_that_cannot_fit_exits_1_and_says_by_how_much(capsys, cpu8_report):
    limit = cpu8_report["step"]["total"] / 2 / (1 << 30)
    code, out, _ = run_plan(capsys, *SETTINGS, "--topology=cpu:8", f"--memory_limit={limit}")
    assert code == plan.EXIT_DOES_NOT_FIT
    verdict = next(line for line in out.splitlines() if line.startswith("verdict"))
    assert "does not fit (by " in verdict and "MiB" in verdict


def test_largest_batch_is_the_bisection_boundary():
    """With the limit between the totals at batches 16 and 24, the search from 8 finds 16."""
    t = plan.target("cpu:8", 1.0)
    tconf = make_config("tiny", dict(n_layer=1, n_head=2, n_embd=32, block_size=16, batch_size=8))
    config = tconf.model_config(64).for_platform("cpu")
    totals = [plan.compile_step(dataclasses.replace(tconf, batch_size=b), config, t)["total"] for b in (16, 24)]
    assert totals[0] < totals[1]
    t = dataclasses.replace(t, memory=(totals[0] + totals[1]) // 2)
    found = plan.largest_batch(tconf, config, t, 64, plan.compile_step(tconf, config, t))
    assert (found["batch_size"], found["per_device_batch"], found["total"]) == (16, 2, totals[0])


@pytest.mark.parametrize("args, message", [
    (["--topology=v9-8"], "unknown --topology='v9-8': use cpu:N or one of v4-8, v4-16"),
    (["--topology=cpu:8", "--batch_size=12"], "batch_size=12 is not divisible by the 8 devices of cpu:8: use 8 or 16"),
    (["--topology=cpu:8", "--grad_accum=3"], "grad_accum=3 does not divide the per-device batch 8"),
    (["--n_layer=2"], "--topology is required"),
    (["--topology=cpu:8", "--max_batch=4"], "--max_batch=4 is below the smallest batch for cpu:8"),
    (["--topology=cpu:8", "--n_lyer=2"], "unknown config key 'n_lyer'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    code, out, err = run_plan(capsys, *SETTINGS, *args)
    assert code == errors.EXIT_BAD_INPUT and out == ""
    assert err.count("\n") == 1 and message in err


def test_without_libtpu_a_tpu_topology_says_what_to_install(capsys, monkeypatch):
    monkeypatch.setattr(plan.importlib.util, "find_spec", lambda name: None)
    code, out, err = run_plan(capsys, *SETTINGS, "--topology=v5litepod-4")
    assert code == errors.EXIT_BAD_INPUT and err.count("\n") == 1 and "pip install -e '.[tpu]'" in err


def test_slice_names_map_to_chips_and_topologies():
    v4 = topologies.parse_slice("v4-32")
    assert (v4.chips, v4.topology, v4.chips_per_host_bounds) == (16, "v4:2x2x4", (2, 2, 1))  # 4 hosts
    v5e = topologies.parse_slice("v5e-8")
    assert (v5e.chips, v5e.topology, v5e.chips_per_host_bounds) == (8, "v5e:2x4", (2, 4, 1))  # one host
    assert topologies.parse_slice("v5litepod-16").generation.hbm_gib == 16
    assert topologies.parse_slice("v4-6") is None and topologies.parse_slice("v5p-3") is None
    assert all(topologies.parse_slice(name) for name in topologies.known_names())


@needs_libtpu
@pytest.mark.parametrize("name, devices, hosts", [("v5litepod-4", 4, 1), ("v4-32", 16, 4)])
def test_tpu_slices_compile_gpt2_tiny_shapes(name, devices, hosts):
    """GPT-2's vocabulary and layout at 2 x 64 wide: the arguments libtpu allocates per chip
    are the replicated state and this chip's rows, within 1% (TPU layouts pad small arrays
    to whole tiles: measured +0.65% here)."""
    t = plan.target(name)
    tconf = make_config("tiny", dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=2 * devices,
                                     dtype="bfloat16", tokenizer="gpt2"))
    r = plan.plan(tconf, t, 50257)
    step = r["step"]
    assert (r["devices"], r["hosts"], r["fits"]) == (devices, hosts, True)
    assert step["params"] == 4 * r["parameters"] and step["optimizer"] == 8 * r["parameters"] + 4
    assert step["arguments"] == pytest.approx(step["params"] + step["optimizer"] + step["batch"], rel=0.01)
