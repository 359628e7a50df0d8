"""--wandb_log, offline: W&B gets metrics.jsonl's rows and the config, and a resumed run
continues the same W&B run without a step twice. Nothing touches the network or $HOME:
W&B runs offline and every directory it may write is under tmp_path. What W&B wrote is
read back from its .wandb files (LevelDB-log records of W&B's protobufs)."""

import json
import struct
from pathlib import Path

import pytest

from parallel_gpt import train
from test_resume import run_train

pytest.importorskip("wandb")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    for name in ("HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_DATA_HOME", "WANDB_DIR"):
        (tmp_path / name).mkdir()
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv("WANDB_MODE", "offline")
    return tmp_path / "WANDB_DIR"


def records(path: Path):
    """The protobuf records of a .wandb file: a 7-byte header, then LevelDB log chunks
    (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)
            pending = b""


def read_back(wandb_dir: Path):
    """(run ids, config, {step: row}) as the W&B server builds them from the offline runs
    in order: a run started with `resume_from` keeps the history up to its branch step."""
    ids, config, history = set(), {}, {}
    for run_dir in sorted(wandb_dir.glob("wandb/offline-run-*")):
        for record in records(next(run_dir.glob("run-*.wandb"))):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
                items = {i.key: json.loads(i.value_json) for i in record.run.config.update}
                branch = items.get("_wandb", {}).get("branch_point")
                if branch:
                    history = {s: r for s, r in history.items() if s <= branch["step"]}
                config.update(items)
            elif kind == "history":
                row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                history[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return ids, config, history


def jsonl_by_step(out_dir: Path):
    rows = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows.setdefault(row.pop("step"), {}).update(row)
    return rows


@pytest.mark.parametrize("fault, code, replayed_from", [
    ("step_14:SIGKILL", -9, 1),  # killed: its W&B buffers may be lost, so the rows from step 1 are sent again
    ("step_17:SIGTERM", train.EXIT_INTERRUPTED, 20),  # stopped cleanly at 19: W&B holds 1-19, nothing is resent
])
def test_a_resumed_run_continues_one_wandb_run_without_a_step_twice(tmp_path, offline, cache_dir, fault, code,
                                                                    replayed_from):
    out = tmp_path / "out"
    first = run_train(out, "--wandb_log", "--wandb_project=test", "--wandb_run_name=tiny", fault=fault)
    assert first.returncode == code, first.stderr
    run_id = json.loads((out / "wandb.json").read_text())["id"]
    resumed = run_train(out, "--wandb_log", "--wandb_project=test", "--wandb_run_name=tiny")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "wandb.json").read_text()) == {"id": run_id, "complete_through": 30}

    ids, config, history = read_back(offline)
    assert ids == {run_id}
    assert history == jsonl_by_step(out) and sorted(history) == list(range(1, 31))
    assert config["max_iters"] == 30 and config["dropout"] == 0.1 and config["attention"] == "cpu_blocks"
    last_run = sorted(offline.glob("wandb/offline-run-*"))[-1]
    sent = [r.history.step.num for r in records(next(last_run.glob("run-*.wandb"))) if r.HasField("history")]
    assert sent == list(range(replayed_from, 31))
    assert not (Path(offline.parent / "HOME") / ".netrc").exists()


def test_wandb_log_without_wandb_is_one_line(tmp_path, cache_dir):
    import subprocess
    import sys

    code = "import sys; sys.modules['wandb'] = None; from parallel_gpt import train; sys.exit(train.main())"
    result = subprocess.run([sys.executable, "-c", code, "--preset", "tiny", f"--out_dir={tmp_path}", "--wandb_log"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "wandb_log=True needs wandb: pip install 'parallel_gpt[wandb]'" in result.stderr
