"""python -m parallel_gpt.plot: a PNG of loss curves from runs' metrics.jsonl; bad paths are one line."""

import json
import math
import struct
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def plot(*args):
    return subprocess.run([sys.executable, "-m", "parallel_gpt.plot", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def fake_run(folder, scale, tokens_per_step):
    """metrics.jsonl as training writes it: a row every 10 steps, an evaluation every 50."""
    folder.mkdir()
    rows = []
    for step in range(10, 201, 10):
        loss = scale * (1 + 3 * math.exp(-step / 60))
        rows.append({"step": step, "loss": loss, "lr": 1e-3 * (1 - step / 250), "grad_norm": 1.0,
                     "tokens_per_sec": 5e4, "mfu": None, "nonfinite_skipped": 0, "tokens": step * tokens_per_step})
        if step % 50 == 0:
            rows.append({"step": step, "train_loss": loss, "val_loss": loss * 1.05, "tokens": step * tokens_per_step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n"
                                                  for r in rows))
    return folder


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_two_runs_make_one_png_of_the_stated_size(tmp_path):
    small, large = fake_run(tmp_path / "small", 1.0, 1024), fake_run(tmp_path / "large", 0.8, 4096)
    out = tmp_path / "curves.png"
    result = plot(small, large, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{out}: small, large"
    assert png_size(out) == (1200, 800)


def test_bad_paths_are_one_line_and_exit_code_2(tmp_path):
    good = fake_run(tmp_path / "good", 1.0, 1024)
    (tmp_path / "empty").mkdir()
    garbled = tmp_path / "garbled"
    garbled.mkdir()
    (garbled / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    cases = [
        ([tmp_path / "missing"], f"{tmp_path / 'missing' / 'metrics.jsonl'} does not exist"),
        ([tmp_path / "empty"], f"{tmp_path / 'empty' / 'metrics.jsonl'} does not exist"),
        ([good, garbled], f"{garbled / 'metrics.jsonl'}, line 2: not a metrics row"),
    ]
    for args, message in cases:
        result = plot(*args, "--out", tmp_path / "curves.png")
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    unwritable = plot(good, "--out", tmp_path / "no" / "such" / "dir.png")
    assert unwritable.returncode == 2 and unwritable.stderr.count("\n") == 1, unwritable.stderr
    assert "cannot write" in unwritable.stderr
    assert not list(tmp_path.rglob("*.png*"))  # nothing written, not even a temporary file
