import pytest

from parallel_gpt.config import PRESETS, ConfigError, TrainConfig, default_preset, make_config, parse_overrides


def test_overrides_are_typed():
    preset, kv = parse_overrides(["--preset", "tiny", "--batch_size=32", "--learning_rate", "3e-4",
                                  "--dropout=0", "--bias=false", "--devices=None", "--out_dir=runs/a"])
    assert preset == "tiny"
    assert kv == {"batch_size": 32, "learning_rate": 3e-4, "dropout": 0.0, "bias": False, "devices": None,
                  "out_dir": "runs/a"}
    assert isinstance(kv["dropout"], float)
    cfg = make_config(preset, kv)
    assert cfg.n_layer == PRESETS["tiny"]["n_layer"] and cfg.batch_size == 32


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
    ({"init_from": "gpt2"}, "init_from='gpt2'"),
])
def test_invalid_values_are_rejected(kv, message):
    with pytest.raises(ConfigError, match=message):
        make_config("tiny", kv)


def test_presets_and_backend_defaults():
    assert default_preset("cpu") == "cpu" and default_preset("gpu") == "shakespeare_char"
    nano = TrainConfig()  # nanoGPT's shakespeare_char
    assert (nano.n_layer, nano.n_head, nano.n_embd, nano.block_size, nano.batch_size) == (6, 6, 384, 256, 64)
    assert (nano.dropout, nano.learning_rate, nano.max_iters, nano.warmup_iters, nano.beta2) == (0.2, 1e-3, 5000, 100, 0.99)
    for name in PRESETS:
        make_config(name, {})
    adam = make_config("cpu", {}).adam()
    assert adam.learning_rate == PRESETS["cpu"]["learning_rate"] and adam.beta2 == 0.99
