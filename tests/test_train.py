"""The train and evaluate command lines, end to end, and their answers to bad input."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_gpt import evaluate, train
from parallel_gpt.generate import generate

TINY = ["--preset", "tiny"]


def run_cli(module, *args, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", f"parallel_gpt.{module}", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


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
    # Uniform predictions over the padded vocabulary (128 ids) lose ln(128) = 4.85 per token.
    assert eval_rows[1]["val_loss"] < eval_rows[0]["val_loss"] < math.log(128)
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step_00000010", "step_00000020"]
    assert "ETA" in result.stdout and "sample:" in result.stdout
    assert "kernels: attention=cpu_blocks, layernorm_backward=explicit, scan_layers=false" in result.stdout


def test_checkpoint_describes_the_model(trained):
    meta = json.loads((Path(trained[0]) / "checkpoints" / "step_00000020" / "meta.json").read_text())
    assert meta["format"] == 2 and meta["rng"] == {"seed": 1337, "version": 1}
    assert meta["model"] == {"block_size": 32, "vocab_size": 128, "vocab_tokens": 77, "n_layer": 2, "n_head": 2,
                             "n_embd": 32, "dropout": 0.0, "bias": True, "layer_norm_eps": 1e-5, "remat": "none", "scan_layers": False,
                             "attention": "cpu_blocks", "layernorm_backward": "explicit"}
    assert meta["tokenizer"]["type"] == "char" and meta["train"]["max_iters"] == 20


def test_evaluate_continues_a_prompt(trained):
    out, _ = trained
    result = run_cli("evaluate", "--prompt", "ROMEO:", f"--out_dir={out}", "--max_new_tokens=40", "--seed=1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ROMEO:") and len(result.stdout.rstrip("\n")) >= len("ROMEO:") + 30
    again = run_cli("evaluate", "--prompt", "ROMEO:", f"--out_dir={out}", "--max_new_tokens=40", "--seed=1")
    assert again.stdout == result.stdout  # a fixed seed samples the same text


def test_evaluate_api_generates_exact_length(trained):
    model, tokenizer, meta = evaluate.load_model(str(trained[0]))
    text = generate(model, tokenizer, "KING", max_new_tokens=70, top_k=5)  # longer than block_size=32
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


def test_bad_input_gets_one_line_exit_code_2_and_changes_nothing(trained, tmp_path, capsys, snapshot):
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


def _rewrite_meta(out: Path, change):
    for path in (out / "checkpoints").glob("*/meta.json"):
        meta = json.loads(path.read_text())
        change(meta)
        path.write_text(json.dumps(meta))


def _format_1(meta):
    """The metadata layout of format 1: run settings under "config", the RNG as a formula."""
    config = dict(meta.pop("train"))
    for key in ("attention", "layernorm_backward", "eps"):
        del config[key]
    meta.pop("model")
    meta.update(format=1, config=config, rng={"seed": config["seed"], "dropout": "fold_in(...)"})


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format=3), "has metadata format 3, this version reads 1 and 2"),
    (lambda m: m["model"].update(n_expert=8), "has model settings this version does not know (n_expert)"),
    (lambda m: m["model"].update(n_head=3), "has an invalid model config (n_embd=32 is not divisible by n_head=3"),
    (lambda m: m.pop("tokenizer"), "meta.json lacks tokenizer"),
    (lambda m: m["tokenizer"].update(type="bpe"), "has a tokenizer this version does not know ('bpe')"),
    (lambda m: m["model"].update(n_layer=2.5), "has model settings of the wrong type (n_layer=2.5)"),
    (lambda m: (_format_1(m), m.update(tokenizer="chars")), "its format 1 meta.json lacks config or tokenizer"),
])
def test_evaluate_refuses_a_checkpoint_it_cannot_read_in_one_line(trained, tmp_path, capsys, change, message):
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    _rewrite_meta(tmp_path, change)
    code = evaluate.main(["--prompt", "ROMEO:", f"--out_dir={tmp_path}", "--max_new_tokens=5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: the checkpoint of step 20"), err
    assert message in err[0], err


def test_a_format_1_checkpoint_still_samples_and_resumes(trained, tmp_path, capsys):
    shutil.copytree(trained[0], tmp_path, dirs_exist_ok=True)
    _rewrite_meta(tmp_path, _format_1)
    model, tokenizer, meta = evaluate.load_model(str(tmp_path))
    assert meta["model"]["vocab_size"] == 128 and model.config.n_layer == 2
    assert generate(model, tokenizer, "KING", max_new_tokens=5).startswith("KING")
    assert train.main([*TINY, f"--out_dir={tmp_path}", "--max_iters=22", "--sample_tokens=0"]) == 0
    assert "resuming from step 20" in capsys.readouterr().out


@pytest.fixture(scope="module")
def bpe_dataset(tmp_path_factory):
    """A small prepared GPT-2 BPE dataset (20 documents)."""
    from parallel_gpt import prepare

    root = tmp_path_factory.mktemp("bpe")
    for i in range(20):
        (root / f"doc{i:02d}.txt").write_text(f"Chapter {i}.\n" + "It was the best of times, it was the worst. " * 40)
    prepare.prepare([str(root)], str(root / "prepared"), "gpt2", val_fraction=0.2, seed=0)
    return root / "prepared"


def test_training_on_prepared_bpe_tokens_is_the_same_on_1_and_8_devices(bpe_dataset, tmp_path):
    losses = {}
    for devices in (1, 8):
        out = tmp_path / f"d{devices}"
        result = run_cli("train", *TINY, f"--dataset={bpe_dataset}", "--max_iters=6", "--log_interval=1",
                         "--sample_tokens=0", f"--out_dir={out}",
                         env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
        assert result.returncode == 0, result.stderr
        losses[devices] = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                           if "loss" in r]
        meta = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("meta.json").read_text())
        assert meta["tokenizer"] == {"type": "gpt2"} and meta["model"]["vocab_size"] == 50304
    assert len(losses[1]) == 6 and math.isclose(losses[1][0], math.log(50257), rel_tol=0.05)
    for a, b in zip(losses[1], losses[8]):
        assert math.isclose(a, b, rel_tol=1e-5)
    sample = run_cli("evaluate", f"--out_dir={tmp_path / 'd1'}", "--prompt", "It was the 日本 best",
                     "--max_new_tokens=5")
    assert sample.returncode == 0 and sample.stdout.startswith("It was the 日本 best"), sample.stderr


def test_resuming_with_another_tokenizer_is_refused(bpe_dataset, tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run_cli("train", *TINY, "--max_iters=2", "--sample_tokens=0", f"--out_dir={out}")
    assert first.returncode == 0, first.stderr
    again = run_cli("train", *TINY, "--max_iters=4", "--sample_tokens=0", "--tokenizer=gpt2", f"--out_dir={out}")
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "cannot resume: the checkpoint differs in tokenizer ('char' -> 'gpt2')" in again.stderr
