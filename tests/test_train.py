"""The train and evaluate command lines, end to end, and their answers to bad input."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_gpt import evaluate, train

TINY = ["--preset", "tiny"]


def run_cli(module, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", f"parallel_gpt.{module}", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
    """One tiny run of the real command on the Shakespeare default."""
    out = tmp_path_factory.mktemp("run")
    result = run_cli("train", *TINY, f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    return out, result


def test_cli_writes_metrics_events_and_checkpoints(trained):
    out, result = trained
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in train_rows] == [5, 10, 15, 20]
    assert [r["step"] for r in eval_rows] == [10, 20]
    assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= train_rows[0].keys()
    assert eval_rows[-1]["val_loss"] < 4.6  # below log(vocab) after 20 steps
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000010", "step_00000020"]
    assert "ETA" in result.stdout and "sample:" in result.stdout


def test_evaluate_continues_a_prompt(trained):
    out, _ = trained
    result = run_cli("evaluate", "--prompt", "ROMEO:", f"--out_dir={out}", "--max_new_tokens=40", "--seed=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.rstrip("\n")) >= len("ROMEO:") + 30
    again = run_cli("evaluate", "--prompt", "ROMEO:", f"--out_dir={out}", "--max_new_tokens=40", "--seed=1")
    assert again.stdout == result.stdout  # a fixed seed samples the same text


def test_evaluate_api_generates_exact_length(trained):
    model, tokenizer, meta = evaluate.load_model(str(trained[0]))
    text = evaluate.generate(model, tokenizer, "KING", max_new_tokens=70, top_k=5)  # longer than block_size=32
    assert text.startswith("KING") and len(text) == 4 + 70 and meta["step"] == 20


def _tiny_text(tmp_path, n):
    path = tmp_path / f"t{n}.txt"
    path.write_text(("to be or not to be, that is the question\n" * 100)[:n])
    return path


def _bad_inputs(tmp_path):
    missing = tmp_path / "missing.txt"
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1") * 50)
    short = _tiny_text(tmp_path, 300)  # val split of 30 tokens < block_size + 1
    return [
        ("train", ["--batch_size=12"], "batch_size=12 is not divisible by the 8 devices: use 8 or 16"),
        ("train", ["--devices=9"], "devices=9 but this process has 8 cpu device(s)"),
        ("train", ["--n_embd=30", "--n_head=4"], "n_embd=30 is not divisible by n_head=4"),
        ("train", ["--n_layers=2"], "unknown config key 'n_layers'"),
        ("train", ["--max_iters=ten"], "--max_iters='ten': expected int"),
        ("train", [f"--dataset={missing}"], "does not exist"),
        ("train", [f"--dataset={empty}"], "is empty"),
        ("train", [f"--dataset={latin1}"], "is not UTF-8"),
        ("train", [f"--dataset={short}"], "val split"),
        ("evaluate", ["--prompt", "ROMEO:@~"], "characters not in the vocabulary: '@~'"),
    ]


def test_bad_input_gets_one_line_exit_code_2_and_changes_nothing(trained, tmp_path, capsys):
    out, _ = trained
    before = snapshot(out)
    for module, args, message in _bad_inputs(tmp_path):
        main = train.main if module == "train" else evaluate.main
        code = main([*TINY, *args, f"--out_dir={out}"] if module == "train" else [*args, f"--out_dir={out}"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2, (args, err)
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
        assert snapshot(out) == before, args


def test_evaluate_without_checkpoint_says_how_to_make_one(tmp_path):
    result = run_cli("evaluate", "--prompt", "ROMEO:", f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: no checkpoint in '{tmp_path}': train one first with "
                                     f"`python -m parallel_gpt.train --out_dir={tmp_path}`")
    assert "Traceback" not in result.stderr and list(tmp_path.iterdir()) == []


def test_bad_input_in_a_real_process_has_no_traceback(tmp_path):
    result = run_cli("train", *TINY, "--batch_size=3", f"--out_dir={tmp_path / 'new'}",
                     env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: batch_size=3 is not divisible by the 2 devices: use 2 or 4"]
