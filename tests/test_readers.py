"""prepare's Parquet and zstd inputs: the same documents as JSON Lines, bounded memory, bad files."""

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from parallel_gpt.data import load_corpus
from test_prepare import PEAK_RSS, TEXT, assert_refused, run

DOCS = [f"Row {i}: " + TEXT * (i % 5 + 1) for i in range(60)]


def write_jsonl(path, docs, **extra):
    path.write_text("".join(json.dumps({"text": d, "id": i, **extra}) + "\n" for i, d in enumerate(docs)))
    return path


def write_zst(path, data: bytes, frames=1):
    """`data` as zstd, in `frames` frames (The Pile's files are one; concatenated files are several)."""
    cut = len(data) // frames
    parts = [data[i * cut:(i + 1) * cut if i < frames - 1 else None] for i in range(frames)]
    path.write_bytes(b"".join(zstandard.ZstdCompressor(level=3).compress(p) for p in parts))
    return path


def write_parquet(path, docs, row_group_size=16, **columns):
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs, **columns}), path,
                   row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """The same 60 documents as .jsonl, .jsonl.zst (two frames) and .parquet (four row groups)."""
    root = tmp_path_factory.mktemp("copies")
    jsonl = write_jsonl(root / "docs.jsonl", DOCS)
    return {"jsonl": jsonl, "zst": write_zst(root / "docs.jsonl.zst", jsonl.read_bytes(), frames=2),
            "parquet": write_parquet(root / "docs.parquet", DOCS)}


def test_parquet_and_zstd_give_the_bytes_of_json_lines_at_any_worker_count(copies, tmp_path):
    outputs = {}
    for kind, path in copies.items():
        for workers in (1, 2):
            out = tmp_path / f"{kind}{workers}"
            result = run(path, "--out", out, "--workers", workers, "--val_fraction", "0.2")
            assert result.returncode == 0, result.stderr
            outputs[kind, workers] = [(out / name).read_bytes() for name in ("train.bin", "val.bin")]
    reference = outputs["jsonl", 1]
    assert all(reference[0] and reference[1] for _ in [0])  # both splits hold documents
    assert all(v == reference for v in outputs.values()), [k for k, v in outputs.items() if v != reference]


def test_a_directory_mixing_every_kind(tmp_path):
    import gzip

    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.txt").write_text("A text document.\n" + TEXT)
    write_jsonl(root / "b.jsonl", DOCS[:3])
    (root / "c.txt.gz").write_bytes(gzip.compress(b"A gzipped document.\n"))
    write_zst(root / "d.jsonl.zst", write_jsonl(tmp_path / "d.jsonl", DOCS[3:7]).read_bytes())
    write_zst(root / "e.txt.zst", b"A zstd text document.\n")
    # A null is an empty document, skipped; the row after it is read.
    write_parquet(root / "f.parquet", ["A Parquet row.", None, "Another Parquet row."])
    result = run(root, "--out", tmp_path / "out", "--tokenizer", "char", "--val_fraction", "0")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["train_documents"] == 1 + 3 + 1 + 4 + 1 + 2
    corpus = load_corpus(str(tmp_path / "out"))
    text = corpus.tokenizer.decode(corpus.train)
    for piece in ("A text document.", "A gzipped document.", DOCS[6], "A zstd text document.", "Another Parquet row."):
        assert piece in text


def _bad_inputs(tmp_path, copies):
    parquet = copies["parquet"].read_bytes()
    cut_parquet = tmp_path / "cut.parquet"
    cut_parquet.write_bytes(parquet[:len(parquet) // 2])
    # The page header of the text column's first data page in the third row group (rows 32-47) overwritten.
    damaged_parquet = tmp_path / "damaged.parquet"
    page = pq.ParquetFile(copies["parquet"]).metadata.row_group(2).column(1).data_page_offset
    damaged_parquet.write_bytes(parquet[:page] + b"\xff" * 16 + parquet[page + 16:])
    no_column = write_parquet(tmp_path / "nocolumn.parquet", DOCS[:3], body=DOCS[:3])
    numbers = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), numbers)
    zst = copies["zst"].read_bytes()
    cut_zst = tmp_path / "cut.jsonl.zst"
    cut_zst.write_bytes(zst[:-40])
    damaged_zst = tmp_path / "damaged.jsonl.zst"
    damaged_zst.write_bytes(zst[:40] + bytes(60) + zst[100:])
    bad_row_zst = write_zst(tmp_path / "badrow.jsonl.zst", b'{"text": "ok"}\n{"text": 3}\n')
    return [
        ([cut_parquet], f"cannot read {cut_parquet}: "),
        ([damaged_parquet], f"cannot read {damaged_parquet} at row 32: "),
        ([no_column, "--jsonl_field", "body2"], f"{no_column}: no column 'body2' (its columns: id, text, body)"),
        ([numbers], f"{numbers}: column 'text' holds int64, not text"),
        ([cut_zst], f"{cut_zst} ends inside a zstd frame (at byte {len(zst) - 40})"),
        ([damaged_zst], f"cannot read {damaged_zst}: "),
        ([bad_row_zst], f"{bad_row_zst}, line 2: no string field 'text'"),
    ]


def test_bad_input_is_one_line_and_exit_code_2(tmp_path, copies):
    assert_refused(tmp_path, _bad_inputs(tmp_path, copies))


WITHOUT = """
import sys
sys.modules[{module!r}] = None  # an install without it: importing it raises ImportError
from parallel_gpt import prepare
sys.exit(prepare.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("kind, module", [("parquet", "pyarrow"), ("zst", "zstandard")])
def test_an_install_without_the_extra_is_told_which(copies, tmp_path, kind, module):
    result = subprocess.run([sys.executable, "-c", WITHOUT.format(module=module), str(copies[kind]), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"needs {module}: pip install 'parallel_gpt[data]'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_peak_memory_does_not_grow_with_a_parquet_file(tmp_path):
    """As test_prepare's text test, on Parquet files of 40 MiB and 64 KiB of text, each
    one row group (a row group's column chunk must not be held whole), of documents
    that snappy compresses ~2x (FineWeb's ratio is similar)."""
    import random

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    peaks = {}
    for size in (64 << 10, 40 << 20):
        docs, total = [], 0
        while total < size:
            docs.append(" ".join(rng.choices(words, k=400)) + "\n")
            total += len(docs[-1])
        path = write_parquet(tmp_path / f"{size}.parquet", docs, row_group_size=len(docs))
        del docs
        result = subprocess.run([sys.executable, "-c", PEAK_RSS, str(path), "--out", str(tmp_path / f"o{size}"),
                                 "--workers", "1"], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        peaks[size] = int(result.stdout.split()[-1]) / 1024  # MiB
        path.unlink()
    assert peaks[40 << 20] - peaks[64 << 10] < 16, peaks
