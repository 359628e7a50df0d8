import dataclasses
import json
import resource
import signal

import jax
import numpy as np
import pytest

from parallel_gpt import checkpoint
from parallel_gpt.errors import OutputError
from parallel_gpt.model import GPT, GPTConfig
from parallel_gpt.optim import adam_init, adam_update, AdamHParams

CFG = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16).for_platform("cpu")


def _state():
    model = GPT.create(CFG, key=jax.random.key(0))
    grads = jax.tree.map(lambda p: p * 0.5 + 0.01, model)
    model, opt, _ = adam_update(model, grads, adam_init(model), AdamHParams())
    return model, opt


def _save(out, step, model, opt, keep=3):
    arrays = {**checkpoint.flatten(model, "model"), **checkpoint.flatten(opt, "opt")}
    return checkpoint.save(out, step, arrays, {"config": {"n": 1}}, keep=keep)


def test_round_trip_is_exact(tmp_path):
    model, opt = _state()
    _save(tmp_path, 5, model, opt)
    arrays, meta = checkpoint.load_latest(tmp_path)
    assert meta["step"] == 5 and meta["config"] == {"n": 1}
    model2 = checkpoint.unflatten(model, "model", arrays)
    opt2 = checkpoint.unflatten(opt, "opt", arrays)
    for a, b in zip(jax.tree.leaves((model, opt)), jax.tree.leaves((model2, opt2))):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert "model/h/0/attn/c_attn/weight" in arrays and "opt/count" in arrays


def test_keeps_the_newest_and_leaves_no_temporaries(tmp_path):
    model, opt = _state()
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, model, opt, keep=2)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"]


@pytest.mark.parametrize("damage", ["truncate", "garble", "no_meta", "bad_json"])
def test_a_damaged_newest_checkpoint_is_reported_and_skipped(tmp_path, damage):
    model, opt = _state()
    _save(tmp_path, 1, model, opt)
    newest = _save(tmp_path, 2, model, opt)
    arrays_file = newest / checkpoint.ARRAYS
    data = arrays_file.read_bytes()
    if damage == "truncate":
        arrays_file.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        arrays_file.write_bytes(data[:100] + bytes(b ^ 0xFF for b in data[100:200]) + data[200:])
    elif damage == "no_meta":
        (newest / checkpoint.META).unlink()
    else:
        (newest / checkpoint.META).write_text("{not json")
    reports = []
    arrays, meta = checkpoint.load_latest(tmp_path, report=reports.append)
    assert meta["step"] == 1
    assert len(reports) == 1 and "step_00000002" in reports[0] and "\n" not in reports[0]


def test_arrays_that_need_pickle_are_refused(tmp_path):
    model, opt = _state()
    path = _save(tmp_path, 1, model, opt)
    np.savez(path / checkpoint.ARRAYS, evil=np.array([object()], dtype=object))
    meta = json.loads((path / checkpoint.META).read_text())
    meta["sha256"][checkpoint.ARRAYS] = checkpoint._sha256(path / checkpoint.ARRAYS)
    (path / checkpoint.META).write_text(json.dumps(meta))
    with pytest.raises(checkpoint.CheckpointError, match="cannot read"):
        checkpoint.load(path)


def test_a_failed_write_leaves_earlier_checkpoints_and_no_temporaries(tmp_path):
    """A full disk, simulated with a file size limit (it binds root too)."""
    model, opt = _state()
    _save(tmp_path, 1, model, opt)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(OutputError, match="cannot write checkpoint .* File too large"):
            _save(tmp_path, 2, model, opt)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert [p.name for p in checkpoint.checkpoint_dirs(tmp_path)] == ["step_00000001"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    checkpoint.load_latest(tmp_path)


def test_shape_mismatch_is_named(tmp_path):
    model, opt = _state()
    _save(tmp_path, 1, model, opt)
    arrays, _ = checkpoint.load_latest(tmp_path)
    other = GPT.create(dataclasses.replace(CFG, n_embd=32), key=jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointError, match="model/wte/weight"):
        checkpoint.unflatten(other, "model", arrays)
