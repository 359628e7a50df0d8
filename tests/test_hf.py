"""Hugging Face GPT-2 in and out, against a fixture made by transformers
(tests/fixtures/make_gpt2_fixture.py; no torch needed here)."""

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from parallel_gpt import checkpoint, hf
from parallel_gpt.config import TrainConfig
from parallel_gpt.errors import HFError
from parallel_gpt.model import GPT, cross_entropy
from parallel_gpt.tokenizers import CharTokenizer

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "gpt2_tiny"


def write_safetensors(path: Path, tensors: dict):
    """The safetensors layout by hand (bfloat16 included): length, JSON header, data."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16"}
    header, offset, blobs = {}, 0, []
    for name, a in tensors.items():
        data = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def fixture_variant(tmp_path, change=None, config_change=None):
    out = tmp_path / "variant"
    shutil.copytree(FIXTURE, out)
    if change:
        tensors = change(dict(hf.read_safetensors(FIXTURE / hf.WEIGHTS)))
        write_safetensors(out / hf.WEIGHTS, tensors)
    if config_change:
        config = json.loads((out / hf.CONFIG).read_text())
        config.update(config_change)
        (out / hf.CONFIG).write_text(json.dumps(config))
    return out


def imported(path):
    config = hf.model_config(str(path)).for_platform("cpu")
    return hf.load_model(str(path), config, GPT.shapes(config))


def test_imported_model_gives_transformers_logits_and_loss():
    expected = np.load(FIXTURE / "expected.npz")
    model = imported(FIXTURE)
    assert model.config.vocab_size == 128 and model.config.vocab_tokens == 101 and model.config.layer_norm_eps == 1e-6
    logits = model(jnp.asarray(expected["ids"]))
    np.testing.assert_allclose(logits[..., :101], expected["logits"], atol=1e-4, rtol=1e-4)
    assert bool(jnp.all(jnp.isneginf(logits[..., 101:])))  # padding: the softmax is the original's
    loss = float(cross_entropy(logits[:, :-1], jnp.asarray(expected["ids"][:, 1:])))
    assert abs(loss - float(expected["loss"])) <= 1e-5 * float(expected["loss"])


@pytest.mark.parametrize("variant", ["no_prefix", "buffers", "float16", "bfloat16", "tied_head"])
def test_what_real_files_hold_loads_to_the_same_model(tmp_path, variant):
    def change(t):
        if variant == "no_prefix":
            return {k.removeprefix("transformer."): v for k, v in t.items()}
        if variant == "buffers":
            mask = np.tril(np.ones((48, 48), np.float32))[None, None]
            return {**t, **{f"transformer.h.{i}.attn.bias": mask for i in range(3)},
                    "transformer.h.0.attn.masked_bias": np.array(-1e4, np.float32)}
        if variant == "tied_head":
            return {**t, "lm_head.weight": t["transformer.wte.weight"]}
        dtype = np.float16 if variant == "float16" else ml_dtypes.bfloat16
        return {k: np.asarray(v).astype(dtype) for k, v in t.items()}

    reference = checkpoint.flatten(imported(FIXTURE), "model")
    got = checkpoint.flatten(imported(fixture_variant(tmp_path, change)), "model")
    for name, a in reference.items():
        if variant in ("float16", "bfloat16"):  # cast to float32 exactly: the half-precision values
            dtype = np.float16 if variant == "float16" else ml_dtypes.bfloat16
            a = a.astype(dtype).astype(np.float32)
        np.testing.assert_array_equal(got[name], a, err_msg=name)


def test_an_untied_head_is_refused(tmp_path):
    untied = fixture_variant(tmp_path, lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] * 2})
    with pytest.raises(HFError, match="lm_head.weight differs from wte.weight"):
        imported(untied)


def run_cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"parallel_gpt.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})


@pytest.fixture(scope="module")
def text_of_101_characters(tmp_path_factory):
    """A dataset whose character vocabulary has exactly the fixture's 101 ids."""
    chars = [chr(c) for c in range(33, 127)] + list("éèàçùâ\n")
    assert len(set(chars)) == 101
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text("".join(chars) + "".join(rng.choice(chars, 20_000)))
    return path


@pytest.mark.parametrize("field, value, message", [
    ("activation_function", "relu", "activation_function='relu' cannot be represented (only the tanh GELU"),
    ("n_inner", 100, "n_inner=100 cannot be represented (only 4 x n_embd)"),
    ("scale_attn_by_inverse_layer_idx", True, "scale_attn_by_inverse_layer_idx=True cannot be represented"),
    ("reorder_and_upcast_attn", True, "reorder_and_upcast_attn=True cannot be represented"),
    ("add_cross_attention", True, "add_cross_attention=True cannot be represented (no cross-attention)"),
    ("vocab_size", 200, "vocab_size=200 but the dataset's tokenizer has 101 ids"),
])
def test_what_the_model_cannot_represent_is_refused_naming_the_field(tmp_path, field, value, message):
    model = fixture_variant(tmp_path, config_change={field: value})
    with pytest.raises(HFError) as refused:
        hf.adopt(TrainConfig().to_flat(), str(model), CharTokenizer("".join(map(chr, range(33, 134)))))
    assert message in str(refused.value)


def test_a_refused_hugging_face_directory_is_one_line_exit_2_and_writes_nothing(tmp_path, text_of_101_characters):
    model = fixture_variant(tmp_path, config_change={"n_inner": 100})
    result = run_cli("train", "--preset", "tiny", f"--dataset={text_of_101_characters}", f"--init_from={model}",
                     f"--out_dir={tmp_path / 'out'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "n_inner=100 cannot be represented" in result.stderr
    assert not (tmp_path / "out").exists()


def test_fine_tune_export_and_import_round_trip(tmp_path, text_of_101_characters):
    out = tmp_path / "run"
    result = run_cli("train", "--preset", "tiny", f"--dataset={text_of_101_characters}", f"--init_from={FIXTURE}",
                     "--max_iters=4", "--block_size=32", "--sample_tokens=0", f"--out_dir={out}")
    assert result.returncode == 0, result.stderr
    assert "starting from the Hugging Face checkpoint" in result.stdout
    config = json.loads(sorted((out / "checkpoints").iterdir())[-1].joinpath("meta.json").read_text())["model"]
    assert (config["n_layer"], config["n_embd"], config["block_size"], config["layer_norm_eps"]) == (3, 40, 32, 1e-6)
    exported = tmp_path / "exported"
    assert run_cli("export", f"--out_dir={out}", f"--to={exported}").returncode == 0
    hf_config = json.loads((exported / hf.CONFIG).read_text())
    assert hf_config["vocab_size"] == 101 and hf_config["n_ctx"] == hf_config["n_positions"] == 32
    saved = checkpoint.load(checkpoint.checkpoint_dirs(out)[0])[0]
    back = checkpoint.flatten(imported(exported), "model")
    assert back.keys() <= saved.keys()
    for name, a in back.items():
        np.testing.assert_array_equal(a, saved[name], err_msg=name)  # bit-identical
    sample = run_cli("evaluate", f"--init_from={exported}", "--prompt", "abc", "--max_new_tokens=5")
    assert sample.returncode == 0 and sample.stdout.startswith("abc"), sample.stderr


def test_transformers_loads_an_export_without_warnings(tmp_path, text_of_101_characters):
    transformers = pytest.importorskip("transformers", reason="transformers is a benchmark extra")
    torch = pytest.importorskip("torch")
    out = tmp_path / "run"
    assert run_cli("train", "--preset", "tiny", f"--dataset={text_of_101_characters}", "--max_iters=2",
                   "--sample_tokens=0", "--bias=false", f"--out_dir={out}").returncode == 0
    assert run_cli("export", f"--out_dir={out}", f"--to={tmp_path / 'hf'}").returncode == 0
    model, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = imported(tmp_path / "hf")
    ids = np.random.default_rng(0).integers(0, 101, (2, 32))
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours(jnp.asarray(ids, jnp.int32))[..., :101], theirs, atol=1e-4, rtol=1e-4)


def test_gpt2_tokenizer_files_match_the_ranks(tmp_path):
    hf.write_gpt2_tokenizer(tmp_path, 1024)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    merges = (tmp_path / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256 and vocab["Ġthe"] == 262
    assert len(merges) == 1 + 50000 and merges[:4] == ["#version: 0.2", "Ġ t", "Ġ a", "h e"]
    transformers = pytest.importorskip("transformers", reason="transformers is a benchmark extra")
    from parallel_gpt.tokenizers import GPT2Tokenizer

    theirs, ours = transformers.AutoTokenizer.from_pretrained(str(tmp_path)), GPT2Tokenizer()
    for text in ("Hello, world!", "naïve café 日本語 🎉\n\n  spaces\tand tabs", "a<|endoftext|>b"):
        assert theirs.encode(text) == ours.encode(text, allow_eot=True).tolist()


def test_init_from_names_a_directory_checked_where_it_is_read(tmp_path):
    assert TrainConfig.from_flat({"init_from": "gpt2"}).hf_dir == "gpt2"  # parsing touches no file
    assert TrainConfig.from_flat({"init_from": "resume"}).hf_dir is None
    with pytest.raises(HFError, match=r"init_from='gpt2' is not a Hugging Face GPT-2 directory .*: use auto, scratch"):
        hf.check_dir("gpt2")
    (tmp_path / hf.CONFIG).write_text("{}")
    with pytest.raises(HFError, match=r"--init_from=.* is not a Hugging Face GPT-2 directory \(config.json \+ model"):
        hf.check_dir(str(tmp_path), "--init_from")
