"""Typed run configuration: `TrainConfig`, presets, and flat `--key=value` parsing.

Each setting is declared once. The model's live in `GPTConfig`, the optimizer's in
`AdamHParams`, the process group's in `runtime.ProcessConfig`; `TrainConfig` nests the
three and declares the rest (data, run length,
logging, checkpoints, parallelism). On the command line every setting has its flat nanoGPT
name (`--n_layer`, `--learning_rate`, `--eps`, `--max_iters`), mapped to where it lives by
`FLAT_KEYS`. Unknown keys and values of the wrong type are rejected with a one-line
`ConfigError` naming the key.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import typing

from parallel_gpt.errors import ConfigError
from parallel_gpt.model import GPTConfig, pad_vocab
from parallel_gpt.optim import AdamHParams
from parallel_gpt.runtime import ProcessConfig
from parallel_gpt.sharding import LEVELS
from parallel_gpt.tokenizers import TOKENIZERS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: GPTConfig = dataclasses.field(default_factory=GPTConfig)  # vocab_size comes from the tokenizer
    optim: AdamHParams = dataclasses.field(default_factory=AdamHParams)
    process: ProcessConfig = dataclasses.field(default_factory=ProcessConfig)
    # data
    dataset: str = "shakespeare"  # the embedded corpus, a UTF-8 text file, or a directory made by prepare
    tokenizer: typing.Optional[str] = None  # char or gpt2; None: a prepared directory's own, else char
    batch_size: int = 64  # global batch, split over all devices of all processes
    seed: int = 1337
    # run length, evaluation, logging, checkpoints
    max_iters: int = 5000
    eval_interval: int = 250
    eval_iters: int = 200
    log_interval: int = 10
    ckpt_interval: int = 1000
    out_dir: str = "out"
    # auto: resume if out_dir holds a checkpoint, else scratch; or scratch, resume, or a Hugging Face GPT-2
    # directory to fine-tune (the model's shape comes from its config.json; out_dir's checkpoints, once
    # there, are resumed)
    init_from: str = "auto"
    keep_checkpoints: int = 3
    max_nonfinite: int = 10  # consecutive skipped (non-finite) updates before the run stops
    sample_tokens: int = 300  # length of the sample printed at the end; 0 for none
    # Weights & Biases, nanoGPT's names (the [wandb] extra): process 0 logs metrics.jsonl's rows and this
    # config to one W&B run per out_dir, whose id is kept in out_dir/wandb.json so that a resume continues it
    wandb_log: bool = False
    wandb_project: str = "parallel_gpt"
    wandb_run_name: typing.Optional[str] = None  # None: W&B names the run
    # a jax.profiler trace of steps profile_from .. profile_from + profile_steps - 1 into out_dir/profile
    # (TensorBoard's profile plugin, XProf, or Perfetto); 0: no trace
    profile_from: int = 0
    profile_steps: int = 3
    profile_all_processes: bool = False  # every process writes its own trace; False: process 0 only
    # parallelism and numerics
    # JAX's persistent compilation cache: auto (JAX_COMPILATION_CACHE_DIR, else
    # ~/.cache/parallel_gpt/xla), off, or a directory (a bucket shared by a pod's workers)
    compilation_cache: str = "auto"
    devices: typing.Optional[int] = None  # first N local devices; None = all
    # where the training state lives (sharding.LEVELS): replicated on every device; optimizer, AdamW's
    # moments split over the devices (ZeRO-1/2); full, the parameters too (ZeRO-3 / FSDP)
    state_sharding: str = "replicated"
    grad_accum: int = 1
    dtype: str = "float32"  # activations; weights and optimizer state stay float32

    def __post_init__(self):
        if self.model.vocab_size is not None or self.model.vocab_tokens is not None:
            raise ConfigError("vocab_size is set by the dataset's tokenizer, not in a TrainConfig")
        positive = ("batch_size", "max_iters", "eval_interval", "eval_iters", "log_interval", "ckpt_interval",
                    "grad_accum", "keep_checkpoints", "max_nonfinite", "profile_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}={getattr(self, key)} must be a positive integer")
        if self.sample_tokens < 0:
            raise ConfigError(f"sample_tokens={self.sample_tokens} must be >= 0")
        if self.profile_from < 0:
            raise ConfigError(f"profile_from={self.profile_from} must be a step >= 1, or 0 for no trace")
        if not 0 <= self.seed < 2**31:
            raise ConfigError(f"seed={self.seed} must be in [0, 2**31)")
        if not self.out_dir.strip():
            raise ConfigError("out_dir is empty: name the run's directory, e.g. --out_dir=out")
        _check_numbers(self)
        if not self.init_from.strip():
            raise ConfigError("init_from is empty: use auto, scratch, resume, or a Hugging Face GPT-2 directory")
        if self.tokenizer not in (None, *TOKENIZERS):
            raise ConfigError(f"tokenizer={self.tokenizer!r}: use {' or '.join(TOKENIZERS)}")
        if self.state_sharding not in LEVELS:
            raise ConfigError(f"state_sharding={self.state_sharding!r}: use one of {', '.join(LEVELS)}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"dtype={self.dtype!r}: use float32 or bfloat16")

    @property
    def hf_dir(self) -> str | None:
        """The Hugging Face GPT-2 directory `init_from` names (checked where it is read), or None."""
        return None if self.init_from in INIT_MODES else self.init_from

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model for a tokenizer of `vocab_size` ids (padded with `pad_vocab`), backend settings unresolved."""
        return dataclasses.replace(self.model, vocab_size=pad_vocab(vocab_size), vocab_tokens=vocab_size)

    def to_flat(self) -> dict:
        """{flat key: value} for every setting, as the command line names them."""
        return {key: getattr(getattr(self, group) if group else self, key) for key, group in FLAT_KEYS.items()}

    @classmethod
    def from_flat(cls, flat: dict) -> "TrainConfig":
        """A TrainConfig from {flat key: value}; ConfigError for an unknown key or a bad value."""
        unknown = sorted(set(flat) - FLAT_KEYS.keys())
        if unknown:
            raise _unknown_key(unknown[0])
        groups = {group: {} for group in _GROUPS}
        for key, value in flat.items():
            groups[FLAT_KEYS[key]][key] = value
        try:
            nested = {group: owner(**groups[group]) for group, owner in _GROUPS.items() if group}
            return cls(**nested, **groups[None])
        except (TypeError, ValueError) as e:  # GPTConfig's and AdamHParams' own checks, or a wrong type
            raise ConfigError(str(e)) from None


def _check_numbers(conf):
    """ConfigError for a float setting that is not finite or an integer setting outside
    int32 (the step count, the seed and the shapes are int32 on the devices), nested groups too."""
    for f in dataclasses.fields(conf):
        value = getattr(conf, f.name)
        if dataclasses.is_dataclass(value):
            _check_numbers(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{f.name}={value} must be a finite number")
        elif isinstance(value, int) and not isinstance(value, bool) and not -2**31 <= value < 2**31:
            raise ConfigError(f"{f.name}={value} is out of range: it must be below 2**31")


INIT_MODES = ("auto", "scratch", "resume")
_GROUPS = {"model": GPTConfig, "optim": AdamHParams, "process": ProcessConfig, None: TrainConfig}


def _flat_keys() -> dict[str, str | None]:
    keys = {}
    for group, owner in _GROUPS.items():
        names = [f.name for f in dataclasses.fields(owner) if f.name not in ("vocab_size", "vocab_tokens", *_GROUPS)]
        assert not keys.keys() & set(names), "a flat key names two settings"
        keys.update(dict.fromkeys(names, group))
    return keys


FLAT_KEYS = _flat_keys()  # {flat key: its group in _GROUPS ("model", "optim", "process", or None: TrainConfig's own)}

PRESETS: dict[str, dict] = {
    # nanoGPT's config/train_shakespeare_char.py, for accelerators: the defaults.
    "shakespeare_char": {},
    # Sized for a 2-core CPU: a couple of minutes (README, Quickstart, has the time and the loss).
    # At this size (0.8M parameters) small batches learn more per token: of the settings
    # tried, batch 16 at lr 3e-3 reached the lowest loss in a 5-minute budget.
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


_FLAGS = ("remat", "scan_layers")  # settings that are not booleans but may be given alone, meaning "true"


def _unknown_key(key: str) -> ConfigError:
    return ConfigError(f"unknown config key {key!r}: valid keys are preset, {', '.join(sorted(FLAT_KEYS))}")


def _hint(key: str):
    return typing.get_type_hints(_GROUPS[FLAT_KEYS[key]])[key]


def _coerce(key: str, raw: str):
    """Parse a command-line value for `key` into its declared type, or raise ConfigError."""
    hint = _hint(key)
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
    """`--preset NAME` and `--key=value` / `--key value` -> (preset, {flat key: typed value}).

    A boolean key given alone (`--decay_lr`) means true; so do `--scan_layers` and
    `--remat` alone (true: "full")."""
    preset, overrides, i = None, {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --key=value")
        key, eq, raw = arg[2:].partition("=")
        if key != "preset" and key not in FLAT_KEYS:
            raise _unknown_key(key)
        if not eq:
            alone = key != "preset" and (_hint(key) is bool or key in _FLAGS)
            if alone and (i + 1 == len(args) or args[i + 1].startswith("--")):
                raw = "true"
            elif i + 1 >= len(args):
                raise ConfigError(f"--{key} needs a value: use --{key}=VALUE")
            else:
                raw, i = args[i + 1], i + 1
        i += 1
        if key == "preset":
            if raw not in PRESETS:
                raise ConfigError(f"unknown preset {raw!r}: choose one of {', '.join(PRESETS)}")
            preset = raw
        else:
            overrides[key] = _coerce(key, raw)
    return preset, overrides


def process_config(overrides: dict) -> ProcessConfig:
    """The process-group settings among `overrides`, alone: the group must form before
    anything else (even the choice of preset) asks JAX about devices."""
    try:
        conf = ProcessConfig(**{k: v for k, v in overrides.items() if FLAT_KEYS[k] == "process"})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_numbers(conf)
    return conf


def make_config(preset: str, overrides: dict) -> TrainConfig:
    return TrainConfig.from_flat({**PRESETS[preset], **overrides})
