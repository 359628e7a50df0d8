"""Every command against bad values and damaged files: exit code 2, one line on stderr,
no traceback, and the files that existed before byte-identical after (issue 22).

The messages are produced in-process; one real process per command checks the exit code
and that no traceback reaches stderr."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from parallel_gpt import evaluate, export, hf, prepare, train
from parallel_gpt.data import DataLoader, load_corpus
from parallel_gpt.errors import DataError
from test_runstate import TOK, saved_run

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gpt2_tiny"  # 101 ids
RUN = ["--preset", "tiny", "--max_iters=4", "--ckpt_interval=2", "--eval_interval=2", "--eval_iters=1",
       "--log_interval=1", "--sample_tokens=0"]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu_vm = _load("launch_tpu_vm_bad_input", ROOT / "launch" / "tpu_vm.py")


def refused(code, capsys, message):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], (code, err)


def in_real_process(*command, env=None):
    """(exit code, stderr) of a real process, with no traceback on stderr."""
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **(env or {})})
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, result.stderr.strip().splitlines()


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("the quick brown fox jumps over the lazy dog\n" * 120)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text):
    """A real run of 4 steps with checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("run")
    assert train.main([*RUN, f"--dataset={text}", f"--out_dir={out}"]) == 0
    return out


@pytest.fixture
def hf_dir(tmp_path):
    """A copy of the Hugging Face fixture, to damage."""
    shutil.copytree(FIXTURE, tmp_path / "hf")
    return tmp_path / "hf"


def _damage_hf(path: Path, how: str):
    config = json.loads((path / hf.CONFIG).read_text())
    if how == "truncated":
        data = (path / hf.WEIGHTS).read_bytes()
        (path / hf.WEIGHTS).write_bytes(data[:len(data) // 2])
    elif how == "list":
        (path / hf.CONFIG).write_text(json.dumps([config]))
    elif how == "eps":
        (path / hf.CONFIG).write_text(json.dumps({**config, "layer_norm_epsilon": "small"}))
    elif how == "heads":
        (path / hf.CONFIG).write_text(json.dumps({**config, "n_head": 3}))


HF_DAMAGE = [("truncated", "is truncated"), ("list", "holds a JSON list"), ("eps", "layer_norm_epsilon='small'"),
             ("heads", "n_embd=40 is not a multiple of n_head=3")]


# --- train -----------------------------------------------------------------------------------

TRAIN_CASES = [
    (["--seed=-1"], "seed=-1 must be in [0, 2**31)"),
    (["--seed=99999999999999999999"], "seed=99999999999999999999 must be in"),
    (["--learning_rate=1e999"], "learning_rate=inf must be a finite number"),
    (["--grad_clip=1e999"], "grad_clip=inf must be a finite number"),
    (["--max_iters=3000000000"], "max_iters=3000000000 is out of range"),
    (["--init_timeout=99999999999"], "init_timeout=99999999999 is out of range"),
    (["--coordinator_address=garbage"], "coordinator_address='garbage' must be HOST:PORT"),
    (["--coordinator_address=host:99999"], "must be HOST:PORT"),
    (["--init_from=scratch"], "already holds checkpoints: use --init_from=resume to continue them"),
]


@pytest.mark.parametrize("args, message", TRAIN_CASES)
def test_train_refuses_bad_settings_and_changes_nothing(run_dir, text, args, message, capsys, snapshot):
    before = snapshot(run_dir)
    refused(train.main([*RUN, f"--dataset={text}", f"--out_dir={run_dir}", *args]), capsys, message)
    assert snapshot(run_dir) == before


def test_train_refuses_before_creating_anything(tmp_path, text, capsys, monkeypatch):
    for args, message in [(["--seed=-1"], "seed=-1"), (["--init_from=resume"], "no checkpoint to resume"),
                          (["--out_dir="], "out_dir is empty")]:
        out = [] if "--out_dir=" in args else [f"--out_dir={tmp_path / 'new'}"]
        refused(train.main([*RUN, f"--dataset={text}", *out, *args]), capsys, message)
        assert not (tmp_path / "new").exists(), args
    monkeypatch.setenv("JAX_NUM_PROCESSES", "abc")
    refused(train.main([*RUN, f"--out_dir={tmp_path / 'new'}"]), capsys, "JAX_NUM_PROCESSES='abc' must be an integer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("entry, message", [("metrics.jsonl", "metrics.jsonl is a directory"),
                                            ("tb", "tb is a file"), ("checkpoints", "checkpoints is a file")])
def test_train_refuses_an_out_dir_entry_of_the_wrong_kind(tmp_path, text, entry, message, capsys, snapshot):
    out = tmp_path / "out"
    out.mkdir()
    (out / entry).mkdir() if entry == "metrics.jsonl" else (out / entry).write_text("mine")
    before = snapshot(out)
    refused(train.main([*RUN, f"--dataset={text}", f"--out_dir={out}"]), capsys, message)
    assert snapshot(out) == before and sorted(p.name for p in out.iterdir()) == [entry]


def test_a_damaged_metrics_log_does_not_stop_a_resume(tmp_path, run_dir, text):
    shutil.copytree(run_dir, tmp_path, dirs_exist_ok=True)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b"\xff")
    assert train.main([*RUN, f"--dataset={text}", f"--out_dir={tmp_path}", "--max_iters=5"]) == 0
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 5


@pytest.mark.parametrize("how, message", HF_DAMAGE[:3])
def test_train_refuses_a_damaged_hugging_face_directory(tmp_path, hf_dir, how, message, capsys, snapshot):
    chars = [chr(c) for c in range(33, 127)] + list("éèàçùâ\n")  # the fixture's 101 ids
    (tmp_path / "t.txt").write_text("".join(chars) * 50)
    _damage_hf(hf_dir, how)
    before = snapshot(tmp_path)
    refused(train.main([*RUN, f"--dataset={tmp_path / 't.txt'}", f"--init_from={hf_dir}",
                        f"--out_dir={tmp_path / 'out'}"]), capsys, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_fine_tuning_on_another_vocabulary_of_the_same_size_is_refused(tmp_path, capsys):
    saved_run(tmp_path / "run")
    export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    other = "\n !ABCDEFGHIJ"  # as many characters as TOK, other ones
    assert len(other) == TOK.vocab_size
    (tmp_path / "t.txt").write_text(other * 100)
    refused(train.main([*RUN, f"--dataset={tmp_path / 't.txt'}", f"--init_from={tmp_path / 'hf'}",
                        f"--out_dir={tmp_path / 'out'}"]), capsys, "vocabulary (char tokens, 13 characters")
    assert not (tmp_path / "out").exists()


def test_an_empty_prepared_validation_split_names_val_fraction(tmp_path, text):
    prepare.prepare([str(text)], str(tmp_path / "prep"), "char", val_fraction=0.0)
    with pytest.raises(DataError, match=r"prepare it again with a larger --val_fraction \(it was 0.0\)"):
        DataLoader(load_corpus(str(tmp_path / "prep")), 32, 4, 0)


def test_train_in_a_real_process():
    code, err = in_real_process("-m", "parallel_gpt.train", *RUN, "--seed=-1", "--out_dir=unused")
    assert code == 2 and err == ["error: seed=-1 must be in [0, 2**31)"]


def test_a_signal_in_jax_exit_cleanup_ends_quietly_with_the_runs_code(tmp_path):
    # Registered before main, so it runs after main's own exit hook, as JAX's cleanup does.
    code = ("import atexit, os, signal, sys; atexit.register(lambda: os.kill(os.getpid(), signal.SIGINT)); "
            "from parallel_gpt import train; sys.exit(train.main(['--seed=-1']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr


# --- evaluate and export ---------------------------------------------------------------------

def _edit_meta(out: Path, change):
    for path in (out / "checkpoints").glob("*/meta.json"):
        path.write_text(json.dumps(change(json.loads(path.read_text()))))


def _damage_all(out: Path):
    for path in (out / "checkpoints").glob("*/arrays.npz"):
        path.write_bytes(path.read_bytes()[:100])


RUN_DAMAGE = [
    (lambda out: _edit_meta(out, lambda m: {**m, "tokenizer": {"type": "char", "chars": TOK.chars[:-3]}}),
     "its tokenizer has 10 ids but its model 13: meta.json is damaged"),
    (lambda out: _edit_meta(out, lambda m: {"format": 1, "step": m["step"], "sha256": m["sha256"],
                                            "config": m["train"], "tokenizer": {"type": "char", "chars": 13}}),
     "a char tokenizer whose chars are int, not a string"),
    (_damage_all, "no valid checkpoint in"),
]


@pytest.mark.parametrize("damage, message", RUN_DAMAGE)
def test_evaluate_and_export_refuse_a_damaged_run(tmp_path, damage, message, capsys, snapshot):
    saved_run(tmp_path / "run", step=4)
    damage(tmp_path / "run")
    before = snapshot(tmp_path)
    refused(evaluate.main(["--prompt", "a", f"--out_dir={tmp_path / 'run'}"]), capsys, message)
    refused(export.main([f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'hf'}"]), capsys, message)
    assert snapshot(tmp_path) == before and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("args, message", [
    (["--temperature", "nan"], "--temperature and --top_p must be finite"),
    (["--top_p", "inf"], "--temperature and --top_p must be finite"),
    (["--max_new_tokens", "3000000000"], "sample less in one call"),
    (["--seed", "99999999999999999999"], "--seed=99999999999999999999 must be in"),
    (["--dtype", "float16"], "--dtype=float16: use one of float32, bfloat16"),
])
def test_evaluate_refuses_bad_values(tmp_path, args, message, capsys):
    saved_run(tmp_path / "run")
    refused(evaluate.main(["--prompt", "a", f"--out_dir={tmp_path / 'run'}", *args]), capsys, message)


@pytest.mark.parametrize("how, message", HF_DAMAGE)
def test_evaluate_refuses_a_damaged_hugging_face_directory(hf_dir, how, message, capsys, snapshot):
    _damage_hf(hf_dir, how)
    before = snapshot(hf_dir)
    refused(evaluate.main(["--prompt", "a", f"--init_from={hf_dir}"]), capsys, message)
    assert snapshot(hf_dir) == before


def test_evaluate_in_a_real_process(tmp_path):
    code, err = in_real_process("-m", "parallel_gpt.evaluate", "--prompt", "a", "--temperature", "nan")
    assert code == 2 and err == ["error: --temperature and --top_p must be finite numbers"]


def test_export_never_replaces_other_files(tmp_path, capsys, snapshot):
    saved_run(tmp_path / "run")
    to = tmp_path / "to"
    (to / hf.CONFIG).mkdir(parents=True)  # the case: a directory where a file goes, and a file to keep
    (to / hf.WEIGHTS).write_text("someone's weights")
    before = snapshot(tmp_path)
    refused(export.main([f"--out_dir={tmp_path / 'run'}", f"--to={to}"]), capsys, "already holds files")
    refused(export.main([f"--out_dir={tmp_path / 'run'}", "--to="]), capsys, "--to is empty")
    assert snapshot(tmp_path) == before


def test_export_again_replaces_its_own_export_and_overwrite_replaces_others(tmp_path, capsys):
    saved_run(tmp_path / "run")
    saved_run(tmp_path / "other")
    to = str(tmp_path / "to")
    assert export.main([f"--out_dir={tmp_path / 'run'}", f"--to={to}"]) == 0
    assert export.main([f"--out_dir={tmp_path / 'run'}", f"--to={to}"]) == 0  # the same run again
    refused(export.main([f"--out_dir={tmp_path / 'other'}", f"--to={to}"]), capsys, "already holds files")
    assert export.main([f"--out_dir={tmp_path / 'other'}", f"--to={to}", "--overwrite"]) == 0
    assert json.loads((tmp_path / "to" / hf.CONFIG).read_text())["parallel_gpt_source"] == str(tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "run", "to"]  # no temporary directory left


def test_export_in_a_real_process(tmp_path):
    (tmp_path / "to").mkdir()
    (tmp_path / "to" / "notes.txt").write_text("keep")
    saved_run(tmp_path / "run")
    code, err = in_real_process("-m", "parallel_gpt.export", f"--out_dir={tmp_path / 'run'}", f"--to={tmp_path / 'to'}")
    assert code == 2 and len(err) == 1 and "already holds files" in err[0]
    assert (tmp_path / "to" / "notes.txt").read_text() == "keep"


# --- prepare ---------------------------------------------------------------------------------

@pytest.mark.parametrize("out, message", [("c", "is or contains the input"), (".", "is or contains the input"),
                                          ("", "--out is empty")])
def test_prepare_never_replaces_its_input(tmp_path, text, out, message, capsys, snapshot, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c").mkdir()
    shutil.copy(text, tmp_path / "c" / "t.txt")
    before = snapshot(tmp_path)
    refused(prepare.main(["c", "--tokenizer", "char", "--out", out, "--overwrite"]), capsys, message)
    assert snapshot(tmp_path) == before


def test_prepare_never_reads_its_own_output(tmp_path, text):
    (tmp_path / "c").mkdir()
    shutil.copy(text, tmp_path / "c" / "t.txt")
    out = tmp_path / "c" / "prep"
    prepare.prepare([str(tmp_path / "c")], str(out), "char", workers=1)
    first = (out / "train.bin").read_bytes(), json.loads((out / "meta.json").read_text())["tokenizer"]
    (tmp_path / "c" / "prep.tmp-1").mkdir()  # left by an interrupted prepare
    (tmp_path / "c" / "prep.tmp-1" / "train.bin").write_bytes(b"\x01\x02")
    os.utime(tmp_path / "c" / "t.txt", ns=(1, 1))  # not the same inputs: prepared again
    prepare.prepare([str(tmp_path / "c")], str(out), "char", workers=1, overwrite=True)
    assert ((out / "train.bin").read_bytes(), json.loads((out / "meta.json").read_text())["tokenizer"]) == first


@pytest.mark.parametrize("args, message", [(["--seed", "99999999999999999999"], "seed=99999999999999999999"),
                                           (["--workers", "100000000"], "workers=100000000 must be between"),
                                           (["--val_fraction", "nan"], "val_fraction=nan")])
def test_prepare_refuses_out_of_range_values(tmp_path, text, args, message, capsys):
    refused(prepare.main([str(text), "--out", str(tmp_path / "p"), *args]), capsys, message)
    assert list(tmp_path.iterdir()) == []


def test_prepare_in_a_real_process(tmp_path, text):
    shutil.copy(text, tmp_path / "t.txt")
    code, err = in_real_process("-m", "parallel_gpt.prepare", str(tmp_path), "--tokenizer", "char", "--out",
                                str(tmp_path), "--overwrite")
    assert code == 2 and len(err) == 1 and "is or contains the input" in err[0]
    assert (tmp_path / "t.txt").read_bytes() == text.read_bytes()


# --- launch/ ---------------------------------------------------------------------------------

def test_local_launch_of_a_missing_command_is_one_line(tmp_path):
    code, err = in_real_process(str(ROOT / "launch" / "local.py"), "--", "/nonexistent/cmd")
    assert code == 2 and err == ["error: command '/nonexistent/cmd' not found or not executable: check the command "
                                 "after --"]


@pytest.mark.parametrize("name", ["a b;touch x", "$(touch x)", "../up", "-x"])
def test_tpu_vm_refuses_a_run_name_the_remote_shell_would_run(name, capsys):
    code = tpu_vm.main(["--dry_run", "logs", "--name", "vm", "--zone", "z", f"--run_name={name}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--run_name" in err[0], err
