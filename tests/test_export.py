"""export.py: a run's newest checkpoint as a Hugging Face GPT-2 directory."""

import numpy as np
import pytest

from parallel_gpt import checkpoint, export, hf
from parallel_gpt.errors import CheckpointError
from parallel_gpt.model import GPT
from test_runstate import TOK, saved_run


def test_export_writes_the_newest_checkpoint_as_gpt2_and_it_imports_back(tmp_path):
    _, model = saved_run(tmp_path / "run", step=7)
    line = export.export_run(str(tmp_path / "run"), str(tmp_path / "hf"))
    assert line == f"wrote step 7 of {tmp_path / 'run'} to {tmp_path / 'hf'}"
    config = hf.model_config(str(tmp_path / "hf")).for_platform("cpu")
    assert config == model.config and hf.tokenizer(str(tmp_path / "hf")) == TOK
    back = checkpoint.flatten(hf.load_model(str(tmp_path / "hf"), config, GPT.shapes(config)), "model")
    for name, a in checkpoint.flatten(model, "model").items():
        if name == "model/wte/weight":  # the padding rows are not exported and come back as zeros
            a = np.concatenate([a[:TOK.vocab_size], np.zeros_like(a[TOK.vocab_size:])])
        np.testing.assert_array_equal(back[name], a, err_msg=name)


def test_export_without_a_checkpoint_is_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint in"):
        export.export_run(str(tmp_path), str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
