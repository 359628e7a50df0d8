import pytest

import dataclasses

from parallel_gpt.config import (FLAT_KEYS, PRESETS, ConfigError, TrainConfig, default_preset, make_config,
                                 parse_overrides)
from parallel_gpt.model import GPTConfig
from parallel_gpt.optim import AdamHParams


def test_overrides_are_typed():
    preset, kv = parse_overrides(["--preset", "tiny", "--batch_size=32", "--learning_rate", "3e-4",
                                  "--dropout=0", "--bias=false", "--devices=None", "--out_dir=runs/a"])
    assert preset == "tiny"
    assert kv == {"batch_size": 32, "learning_rate": 3e-4, "dropout": 0.0, "bias": False, "devices": None,
                  "out_dir": "runs/a"}
    assert isinstance(kv["dropout"], float)
    cfg = make_config(preset, kv)
    assert cfg.model.n_layer == PRESETS["tiny"]["n_layer"] and cfg.batch_size == 32
    assert cfg.optim.learning_rate == 3e-4 and cfg.model.bias is False


def test_a_bare_boolean_flag_means_true():
    assert parse_overrides(["--decay_lr"]) == (None, {"decay_lr": True})
    assert parse_overrides(["--decay_lr", "--bias", "--max_iters=3"]) == (None, {"decay_lr": True, "bias": True,
                                                                                 "max_iters": 3})
    assert parse_overrides(["--decay_lr", "false"]) == (None, {"decay_lr": False})


@pytest.mark.parametrize("args, remat, scan", [
    (["--remat"], "full", "auto"), (["--remat", "false"], "none", "auto"), (["--remat=dots"], "dots", "auto"),
    (["--scan_layers", "--max_iters=3"], "none", True), (["--scan_layers=false"], "none", False),
    (["--remat=true", "--scan_layers", "auto"], "full", "auto")])
def test_remat_and_scan_layers_keep_their_boolean_spelling(args, remat, scan):
    # --remat was a boolean: alone or true it means "full", false "none".
    model = make_config("tiny", parse_overrides(args)[1]).model
    assert (model.remat, model.scan_layers) == (remat, scan)


def test_bad_remat_and_scan_layers_name_the_choices():
    with pytest.raises(ConfigError, match="remat='some': use one of none, full, dots"):
        make_config("tiny", {"remat": "some"})
    with pytest.raises(ConfigError, match="scan_layers='maybe': use true, false or auto"):
        make_config("tiny", {"scan_layers": "maybe"})
    with pytest.raises(ConfigError, match="state_sharding='zero3': use one of replicated, optimizer, full"):
        make_config("tiny", {"state_sharding": "zero3"})


def test_every_setting_is_declared_once_and_reachable_by_its_flat_name():
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "vocab_tokens"}
    optim_fields = {f.name for f in dataclasses.fields(AdamHParams)}
    assert {k for k, g in FLAT_KEYS.items() if g == "model"} == model_fields
    assert {k for k, g in FLAT_KEYS.items() if g == "optim"} == optim_fields
    cfg = make_config("tiny", {"eps": 1e-6, "attention": "xla", "layernorm_backward": "autodiff", "beta1": 0.8})
    assert cfg.optim.eps == 1e-6 and cfg.optim.beta1 == 0.8
    assert (cfg.model.attention, cfg.model.layernorm_backward) == ("xla", "autodiff")
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.model_config(65).vocab_size == 128


@pytest.mark.parametrize("args, message", [
    (["--n_layers=4"], "unknown config key 'n_layers'"),
    (["--batch_size=1.5"], "--batch_size='1.5': expected int"),
    (["--learning_rate=fast"], "--learning_rate='fast': expected float"),
    (["--bias=maybe"], "--bias='maybe': expected true or false"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--max_iters"], "--max_iters needs a value"),
    (["max_iters=3"], "unexpected argument 'max_iters=3'"),
])
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        parse_overrides(args)


@pytest.mark.parametrize("kv, message", [
    ({"n_embd": 130, "n_head": 4}, "n_embd=130 is not divisible by n_head=4"),
    ({"max_iters": 0}, "max_iters=0 must be a positive integer"),
    ({"dropout": 1.0}, "dropout=1.0 must be in"),
    ({"dtype": "float16"}, "dtype='float16'"),
    ({"init_from": " "}, "init_from is empty"),
    ({"attention": "flash"}, "attention='flash': use one of auto, xla, cudnn, cpu_blocks"),
    ({"eps": 0.0}, "eps=0.0 must be > 0"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0 must be > 0"),
])
def test_invalid_values_are_rejected(kv, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", kv)


def test_presets_and_backend_defaults():
    assert default_preset("cpu") == "cpu" and default_preset("gpu") == "shakespeare_char"
    nano = TrainConfig().to_flat()  # nanoGPT's shakespeare_char
    assert [nano[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size")] == [6, 6, 384, 256, 64]
    assert [nano[k] for k in ("dropout", "learning_rate", "max_iters", "warmup_iters", "beta2")] == [
        0.2, 1e-3, 5000, 100, 0.99]
    for name in PRESETS:
        make_config(name, {})
    adam = make_config("cpu", {}).optim
    assert adam.learning_rate == PRESETS["cpu"]["learning_rate"] and adam.beta2 == 0.99
