"""python -m parallel_gpt.prepare: streaming, parallel, atomic token files."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from parallel_gpt import prepare
from parallel_gpt.data import load_corpus
from parallel_gpt.tokenizers import CharTokenizer, DataError, GPT2Tokenizer

TEXT = "The quick brown fox jumps over the lazy dog.\nIt's 3:14, naïve café! 日本語\n\n  indented line\n"


def run(*args, fault=None, timeout=120):
    env = {k: v for k, v in os.environ.items() if k != "PARALLEL_GPT_FAULT"}
    if fault:
        env["PARALLEL_GPT_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "parallel_gpt.prepare", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A directory of text files, a JSON Lines file and a gzipped text file: 60 documents."""
    root = tmp_path_factory.mktemp("inputs")
    (root / "dir").mkdir()
    for i in range(40):
        (root / "dir" / f"{i:02d}.txt").write_text(f"Document {i}.\n" + TEXT * (1 + i % 7))
    with open(root / "rows.jsonl", "w") as f:
        for i in range(15):
            f.write(json.dumps({"text": f"Row {i}: " + TEXT * (i % 3 + 1), "id": i}) + "\n")
    with gzip.open(root / "more.txt.gz", "wt") as f:
        f.write("A gzipped document.\n" + TEXT * 20)
    return [root / "dir", root / "rows.jsonl", root / "more.txt.gz"]


def test_output_is_byte_identical_for_any_worker_count(inputs, tmp_path):
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = run(*inputs, "--out", out, "--workers", workers, "--val_fraction", "0.2", "--seed", "7")
        assert result.returncode == 0, result.stderr
        outs.append(out)
    for name in ("train.bin", "val.bin"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    meta = json.loads((outs[0] / "meta.json").read_text())
    assert meta["train_documents"] + meta["val_documents"] == 56  # 40 files, 15 rows, 1 gzipped file
    assert meta["val_documents"] > 0 and meta["dtype"] == "uint16"
    ids = np.fromfile(outs[0] / "train.bin", np.uint16)
    assert ids.size == meta["train_tokens"] and (ids == 50256).sum() == meta["train_documents"]


@pytest.mark.parametrize("text", [
    ("Line one has words.\nline two  has\tspaces \n\n\nX\n 'quoted' 123 456\n" * 400) + "end",
    "one line, no line breaks, 'quoted' words and  double  spaces; " * 500,
    "\n\n" + "   \n\t" * 300 + "x" * 500 + " y" * 3000,  # whitespace, then a run with no cut
])
def test_a_document_encodes_the_same_in_pieces(monkeypatch, text):
    monkeypatch.setattr(prepare, "PIECE_CHARS", 97)
    for tok in (GPT2Tokenizer(), CharTokenizer.from_text(text)):
        pieces = list(prepare.pieces((text[i:i + 50] for i in range(0, len(text), 50)), tok))
        assert len(pieces) > 20 and "".join(pieces) == text
        assert np.concatenate([tok.encode(p) for p in pieces]).tolist() == tok.encode(text).tolist()
        if isinstance(tok, CharTokenizer):
            assert {len(p) for p in pieces[:-1]} == {97}


def test_rerun_is_a_no_op_and_another_dataset_is_refused(inputs, tmp_path):
    out = tmp_path / "out"
    assert run(*inputs, "--out", out).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(*inputs, "--out", out)
    assert again.returncode == 0 and "already holds this dataset" in again.stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    other = run(inputs[1], "--out", out)
    assert other.returncode == 2 and "pass --overwrite" in other.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert run(inputs[1], "--out", out, "--overwrite").returncode == 0
    assert json.loads((out / "meta.json").read_text())["train_documents"] + \
        json.loads((out / "meta.json").read_text())["val_documents"] == 15


@pytest.mark.parametrize("point", ["prepare_piece_20", "prepare_written"])  # midway; all written, not renamed
def test_a_killed_prepare_leaves_nothing_that_loads_and_the_rerun_completes(inputs, tmp_path, point):
    out = tmp_path / "out"
    killed = run(*inputs, "--out", out, "--workers", "2", fault=f"{point}:SIGKILL")
    assert killed.returncode == -9
    assert not out.exists() and list(tmp_path.glob("out.tmp-*"))  # only a temporary directory is left
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(str(out))
    assert run(*inputs, "--out", out).returncode == 0
    assert load_corpus(str(out)).train.size > 0
    assert not list(tmp_path.glob("out.tmp-*"))


def test_char_tokenizer_and_training_data(inputs, tmp_path):
    out = tmp_path / "chars"
    assert run(*inputs, "--out", out, "--tokenizer", "char", "--val_fraction", "0.3").returncode == 0
    corpus = load_corpus(str(out))
    assert corpus.tokenizer.eot is None and "日" in corpus.tokenizer.chars
    text = corpus.tokenizer.decode(np.concatenate([corpus.train, corpus.val]))
    assert text.count("Document ") == 40 and text.count("Row ") == 15 and "A gzipped document." in text


def _bad_inputs(tmp_path):
    bad_utf8 = tmp_path / "bad.txt"
    bad_utf8.write_bytes(b"fine text\n" * 10 + b"\xff oops")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n')
    no_field = tmp_path / "nofield.jsonl"
    no_field.write_text('{"text": "ok"}\n{"body": "x"}\n')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "blank.txt").write_text("")
    cut_gz = tmp_path / "cut.txt.gz"
    cut_gz.write_bytes(gzip.compress(TEXT.encode() * 100)[:-8])  # no trailer
    return [
        ([tmp_path / "missing.txt"], "does not exist"),
        ([bad_utf8], f"{bad_utf8} is not UTF-8 text: bad byte at offset 100"),
        ([bad_json], f"{bad_json}, line 2: not a JSON object"),
        ([no_field], f"{no_field}, line 2: no string field 'text'"),
        ([empty], "no documents"),
        ([cut_gz], f"cannot read {cut_gz}: Compressed file ended before the end-of-stream marker was reached"),
    ]


def assert_refused(tmp_path, cases):
    """Each (args, message): prepare exits 2 with that one line and leaves no output."""
    for args, message in cases:
        out = tmp_path / "out"
        result = run(*args, "--out", out)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert not out.exists() and not list(tmp_path.glob("out.tmp-*"))


def test_bad_input_is_one_line_and_exit_code_2(tmp_path):
    assert_refused(tmp_path, _bad_inputs(tmp_path))


PEAK_RSS = """
import runpy, sys
sys.argv[0] = "prepare"
try:
    runpy.run_module("parallel_gpt.prepare", run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
print(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
"""


def test_peak_memory_does_not_grow_with_the_input(tmp_path):
    """A 40 MiB document, 2.5 times the stated working-set bound (16 MiB above the
    interpreter and tokenizer, for the process that encodes), against a 64 KiB one: the
    child's peak RSS grows by less than the bound. (VmHWM, this process's own peak: the
    rusage figures of a child also count the memory of the process that started it.)"""
    line = "A line of text that goes on for a while, with words, numbers (123) and punctuation.\n" * 25
    peaks = {}
    for size in (64 << 10, 40 << 20):
        path = tmp_path / f"{size}.txt"
        path.write_text(line * (size // len(line)))
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), "--out", str(tmp_path / f"o{size}"),
                                 "--workers", "1"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        peaks[size] = int(result.stdout.split()[-1]) / 1024  # MiB
        path.unlink()
    assert peaks[40 << 20] - peaks[64 << 10] < 16, peaks
