"""runstate.py: a run's state on disk: what a checkpoint's metadata says, and what may change on resume."""

import jax
import numpy as np
import pytest

from parallel_gpt import checkpoint, runstate
from parallel_gpt.config import make_config
from parallel_gpt.errors import CheckpointError, ConfigError, OutputError
from parallel_gpt.model import GPT
from parallel_gpt.optim import adam_init
from parallel_gpt.parallel import TrainState
from parallel_gpt.tokenizers import CharTokenizer

TOK = CharTokenizer("\n !abcdefghij")
TCONF = make_config("tiny", {"n_layer": 1, "n_embd": 16, "block_size": 8})


def saved_run(out_dir, step=4):
    tconf = make_config("tiny", {**{k: getattr(TCONF.model, k) for k in ("n_layer", "n_embd", "block_size")},
                                 "out_dir": str(out_dir)})
    model = GPT.create(tconf.model_config(TOK.vocab_size).for_platform("cpu"), key=jax.random.key(0))
    writer = checkpoint.Writer()
    runstate.save_checkpoint(tconf, step, TrainState(model, adam_init(model)), TOK, writer)
    writer.wait()
    return tconf, model


def test_a_saved_checkpoint_reads_back_as_the_model_and_tokenizer_it_holds(tmp_path):
    tconf, model = saved_run(tmp_path)
    arrays, meta, config, tokenizer = runstate.read_newest(str(tmp_path))
    assert meta["step"] == 4 and meta["train"] == tconf.to_flat() and tokenizer == TOK
    assert config.attention == "auto" and config.for_platform("cpu") == model.config  # kernels: the reader's choice
    loaded = checkpoint.unflatten(GPT.shapes(model.config), "model", arrays)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(model)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_read_newest_without_a_checkpoint_says_how_to_make_one(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*: train one first"):
        runstate.read_newest(str(tmp_path))


@pytest.mark.parametrize("meta, message", [
    ({"format": 3}, "has metadata format 3, this version reads 1 and 2"),
    ({"format": 2, "model": {}, "tokenizer": {}, "train": {}}, "meta.json lacks rng, step"),
    ({"format": 1, "config": {}}, "its format 1 meta.json lacks config or tokenizer"),
])
def test_metadata_this_version_cannot_read_is_one_line(meta, message):
    with pytest.raises(CheckpointError, match=message):
        runstate.read_meta(meta, "the checkpoint")


def test_resume_refuses_another_model_shape_or_vocabulary_and_lists_other_changes(tmp_path, capsys):
    saved_run(tmp_path)
    _, meta = checkpoint.load_latest(tmp_path)
    meta = runstate.read_meta(meta, "here")
    wider = make_config("tiny", {**meta["train"], "n_embd": 32})
    with pytest.raises(ConfigError, match=r"differs in n_embd \(16 -> 32\)"):
        runstate.check_resume(meta, wider, TOK)
    with pytest.raises(ConfigError, match="differs in vocabulary"):
        runstate.check_resume(meta, make_config("tiny", meta["train"]), CharTokenizer("\n !abcdefghik"))
    runstate.check_resume(meta, make_config("tiny", {**meta["train"], "max_iters": 40}), TOK)
    assert "resuming with changed settings: max_iters 20 -> 40" in capsys.readouterr().out


def test_an_unwritable_out_dir_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputError, match="is not writable"):
        runstate.check_writable(str(tmp_path / "file" / "run"))


def test_resume_compares_data_by_content_and_lists_layout_changes_but_not_process_addresses(tmp_path, capsys):
    tconf, _ = saved_run(tmp_path)
    meta = {**checkpoint.load_latest(tmp_path)[1],
            "run": {"dataset_fingerprint": "abc", "devices": 4, "processes": 1}}
    meta["train"] = {**meta["train"], "coordinator_address": "10.0.0.1:1234", "process_id": 0}
    moved = make_config("tiny", {**meta["train"], "dataset": "/elsewhere/same.txt", "coordinator_address": "h:2",
                                 "process_id": None})
    runstate.check_resume(meta, moved, TOK, {"dataset_fingerprint": "abc", "devices": 8, "processes": 2})
    assert capsys.readouterr().out.strip() == ("resuming with changed settings: dataset 'shakespeare' -> "
                                               "'/elsewhere/same.txt', devices 4 -> 8, processes 1 -> 2")
    with pytest.raises(ConfigError, match="differs in dataset content"):
        runstate.check_resume(meta, tconf, TOK, {"dataset_fingerprint": "def", "devices": 4, "processes": 1})
