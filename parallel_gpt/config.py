"""Typed run configuration: one flat set of nanoGPT-named keys, presets, `--key=value` parsing.

`TrainConfig` holds every key a run accepts, model shape included; `model_config()` picks
the GPTConfig part once the vocabulary is known. Unknown keys and values of the wrong type
are rejected with a one-line `ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import typing

from parallel_gpt.model import GPTConfig, pad_vocab
from parallel_gpt.optim import AdamHParams


class ConfigError(ValueError):
    """Bad configuration; the message names the key and says what to do."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    block_size: int = 256
    dropout: float = 0.2
    bias: bool = True
    # data
    dataset: str = "shakespeare"
    batch_size: int = 64  # global batch, split over all devices of all processes
    seed: int = 1337
    # optimizer (AdamW) and schedule
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 5000
    decay_lr: bool = True
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # run length, evaluation, logging, checkpoints
    max_iters: int = 5000
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    ckpt_interval: int = 1000
    out_dir: str = "out"
    init_from: str = "auto"  # auto: resume if out_dir holds a checkpoint, else scratch; or scratch / resume
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # consecutive skipped (non-finite) updates before the run stops
    sample_tokens: int = 300  # length of the sample printed at the end; 0 for none
    # parallelism and numerics
    devices: typing.Optional[int] = None  # first N local devices; None = all
    grad_accum: int = 1
    dtype: str = "float32"
    remat: bool = False  # jax.checkpoint each block: less activation memory, ~1/3 more compute

    def __post_init__(self):
        try:
            self.model_config(vocab_size=1)  # the model's own checks: n_embd % n_head, dropout, sizes
        except ValueError as e:
            raise ConfigError(str(e)) from None
        positive = ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                    "grad_accum", "lr_decay_iters", "keep_checkpoints", "max_nonfinite")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.warmup_iters < 0 or self.sample_tokens < 0:
            raise ConfigError("warmup_iters and sample_tokens must be >= 0")
        if self.init_from not in ("auto", "scratch", "resume"):
            raise ConfigError(f"init_from={self.init_from!r}: use auto, scratch or resume")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: use float32 or bfloat16")
        if self.learning_rate <= 0 or self.min_lr < 0:
            raise ConfigError("learning_rate must be > 0 and min_lr >= 0")

    def model_config(self, vocab_size: int) -> GPTConfig:
        return GPTConfig(block_size=self.block_size, vocab_size=pad_vocab(vocab_size), n_layer=self.n_layer,
                         n_head=self.n_head, n_embd=self.n_embd, dropout=self.dropout, bias=self.bias,
                         remat=self.remat)

    def adam(self) -> AdamHParams:
        return AdamHParams(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AdamHParams)
                              if hasattr(self, f.name)})


# Keys a resumed run must share with its checkpoint (with the tokenizer's vocabulary).
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "dataset")

PRESETS: dict[str, dict] = {
    # nanoGPT's config/train_shakespeare_char.py, for accelerators.
    "shakespeare_char": {},
    # Sized for a 2-core CPU: 2m57s wall, held-out val loss 1.713 (measured; 4m05s at ~9k
    # tokens/s when it was chosen, ~12k now). At this size (0.8M parameters) small batches
    # learn more per token; at 2200 steps (2.25M tokens) batch 16 / lr 3e-3 reached 1.683,
    # 16 / 2e-3 1.712, 32 / 3e-3 1.725 with half the steps, but took 4m52s then: 1800 steps
    # kept a margin under 5 minutes.
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=16, dropout=0.0,
                learning_rate=3e-3, min_lr=3e-4, warmup_iters=100, max_iters=1800, lr_decay_iters=1800,
                eval_interval=900, eval_iters=50, log_interval=100, ckpt_interval=900, sample_tokens=300),
    # A few seconds anywhere: smoke tests and trying the pipeline.
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=16, dropout=0.0,
                 max_iters=20, lr_decay_iters=20, warmup_iters=2, eval_interval=10, eval_iters=2,
                 log_interval=5, ckpt_interval=10, sample_tokens=50),
}


def default_preset(platform: str) -> str:
    return "cpu" if platform == "cpu" else "shakespeare_char"


def _coerce(key: str, raw: str):
    """Parse a command-line value for `key` into its declared type, or raise ConfigError."""
    hint = typing.get_type_hints(TrainConfig)[key]
    optional = type(None) in typing.get_args(hint)
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    if optional and raw in ("None", "none", ""):
        return None
    if base is str:
        return raw
    if base is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key}={raw!r}: expected true or false")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not base:
        raise ConfigError(f"--{key}={raw!r}: expected {base.__name__}" + (" or None" if optional else ""))
    return value


def parse_overrides(args: list[str]) -> tuple[str | None, dict]:
    """`--preset NAME` and `--key=value` / `--key value` -> (preset, {key: typed value})."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    preset, overrides, i = None, {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value: use --{key}=VALUE")
            raw, i = args[i + 1], i + 1
        i += 1
        if key == "preset":
            if raw not in PRESETS:
                raise ConfigError(f"unknown preset {raw!r}: choose one of {', '.join(PRESETS)}")
            preset = raw
        elif key in fields:
            overrides[key] = _coerce(key, raw)
        else:
            raise ConfigError(f"unknown config key {key!r}: valid keys are preset, {', '.join(sorted(fields))}")
    return preset, overrides


def make_config(preset: str, overrides: dict) -> TrainConfig:
    try:
        return TrainConfig(**{**PRESETS[preset], **overrides})
    except TypeError as e:  # an unknown key passed programmatically
        raise ConfigError(str(e)) from None
