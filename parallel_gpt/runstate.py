"""A run's state on disk: start or resume, save, and what a checkpoint's metadata says.

A checkpoint's `meta.json` (format 2) describes the model without the trainer:

    {"format": 2, "step": 1000,
     "model": {GPTConfig fields, vocab_size included},   # enough to rebuild the model
     "tokenizer": {"type": "char", "chars": "..."},
     "train": {flat key: value},                          # the run's settings, for resume checks
     "rng": {"seed": 1337, "version": 1},                 # parallel.RNG_VERSION
     "data": {"next_step": 1000}, "sha256": {...},
     "run": {"dataset_fingerprint": "...", "devices": 8, "processes": 2}}  # `run_facts`; absent before

Format 1 (the run settings under "config", the RNG derivation as a formula) is read too.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from pathlib import Path

import jax
import jax.numpy as jnp

from parallel_gpt import checkpoint, hf, parallel, runtime
from parallel_gpt.config import TrainConfig
from parallel_gpt.errors import CheckpointError, ConfigError, DataError, OutputError
from parallel_gpt import tokenizers
from parallel_gpt.model import GPT, GPTConfig, pad_vocab
from parallel_gpt.optim import AdamState, adam_init
from parallel_gpt.runtime import is_main_process, print0

META_FORMAT = 2
# Settings a resumed run must share with its checkpoint (the tokenizer's vocabulary too):
# the model's shape and the data it reads, compared by content (`run_facts`); by the
# dataset's name only for checkpoints that recorded no fingerprint. Everything else may
# change, and is listed.
FIXED_ON_RESUME = ("n_layer", "n_head", "n_embd", "block_size", "bias", "layer_norm_eps")
# How a run was started, not what it computes: never reported as a changed setting.
_RUN_CONTROL = ("init_from", "out_dir", "compilation_cache", "coordinator_address", "process_id")


def run_facts(dataset_fingerprint: str, mesh) -> dict:
    """What a checkpoint records of the run besides its settings: the content of its data
    (compared on resume instead of the dataset's spelling) and the device layout (listed
    when it changes: dropout masks depend on the device index)."""
    return {"dataset_fingerprint": dataset_fingerprint, "devices": int(mesh.size), "processes": jax.process_count()}


def save_checkpoint(tconf: TrainConfig, step: int, state: parallel.TrainState | None, tokenizer,
                    writer: checkpoint.Writer, facts: dict | None = None):
    """Process 0 has `writer` write checkpoint `step` of the run (atomically, in the
    background; see checkpoint.Writer), with `facts` (`run_facts`) when given. `state`:
    the logical state in host memory (`DataParallel.to_host`); None on other processes."""
    if not is_main_process():
        return
    arrays = {**checkpoint.flatten(state.model, "model"), **checkpoint.flatten(state.opt, "opt")}
    meta = {"format": META_FORMAT, "model": dataclasses.asdict(state.model.config), "tokenizer": tokenizer.to_json(),
            "train": tconf.to_flat(), "rng": {"seed": tconf.seed, "version": parallel.RNG_VERSION},
            "data": {"next_step": step}, **({"run": facts} if facts else {})}
    writer.save(tconf.out_dir, step, arrays, meta, keep=tconf.keep_checkpoints)


def read_meta(meta: dict, where: str) -> dict:
    """`meta` in format 2, checked; CheckpointError (one line, naming `where`) otherwise."""
    fmt = meta.get("format")
    if fmt == 1:
        if not (isinstance(meta.get("config"), dict) and isinstance(meta.get("tokenizer"), dict)):
            raise CheckpointError(f"{where}: its format 1 meta.json lacks config or tokenizer: "
                                  f"the checkpoint is damaged")
        meta = _from_format_1(meta)
    elif fmt != META_FORMAT:
        raise CheckpointError(f"{where} has metadata format {fmt!r}, this version reads 1 and "
                              f"{META_FORMAT}: use the version of parallel_gpt that wrote it")
    missing = [k for k in ("model", "tokenizer", "train", "rng") if not isinstance(meta.get(k), dict)]
    if not isinstance(meta.get("step"), int):
        missing.append("step")
    if missing:
        raise CheckpointError(f"{where}: meta.json lacks {', '.join(missing)}: the checkpoint is damaged")
    return meta


def _from_format_1(meta: dict) -> dict:
    config = meta["config"]
    shape = {f.name for f in dataclasses.fields(GPTConfig)} - {"vocab_size", "attention", "layernorm_backward"}
    chars = meta["tokenizer"].get("chars", "")
    vocab = pad_vocab(len(chars)) if isinstance(chars, str) else None  # read_tokenizer refuses other chars
    return {**meta, "format": META_FORMAT, "train": config,
            "model": {**{k: v for k, v in config.items() if k in shape}, "vocab_size": vocab},
            "rng": {"seed": config.get("seed"), "version": 1}}


# How the model was run, not what it is: whoever loads a checkpoint chooses for themselves.
_HOW_IT_RAN = ("attention", "layernorm_backward", "remat", "scan_layers")


def read_model_config(meta: dict, where: str) -> GPTConfig:
    """The GPTConfig a checkpoint was trained with, its settings of how it ran (kernels,
    remat, stacked layers) back to their defaults so that whoever loads it chooses for
    their own devices. Checkpoints written before
    padding ids were masked get vocab_tokens from their tokenizer (the mask changes no
    real id's probability relative to another's)."""
    hints = typing.get_type_hints(GPTConfig)
    model = {k: v for k, v in meta["model"].items() if k not in _HOW_IT_RAN}
    model.setdefault("vocab_tokens", read_tokenizer(meta, where).vocab_size)
    unknown = sorted(model.keys() - hints.keys())
    if unknown:
        raise CheckpointError(f"{where} has model settings this version does not know "
                              f"({', '.join(unknown)}): use the version of parallel_gpt that wrote it")
    wrong = [f"{k}={v!r}" for k, v in model.items() if not _has_type(v, hints[k])]
    if wrong:
        raise CheckpointError(f"{where} has model settings of the wrong type ({', '.join(wrong)}): "
                              f"the checkpoint is damaged")
    try:
        config = GPTConfig(**model)
    except ValueError as e:
        raise CheckpointError(f"{where} has an invalid model config ({e})") from None
    if config.vocab_size is None:
        raise CheckpointError(f"{where} has no vocab_size in its model config: the checkpoint is damaged")
    ids = read_tokenizer(meta, where).vocab_size
    if ids != config.vocab_tokens or ids > config.vocab_size:
        raise CheckpointError(f"{where}: its tokenizer has {ids} ids but its model {config.vocab_tokens}: "
                              f"meta.json is damaged")
    return config


def _has_type(value, hint) -> bool:
    """Whether a JSON value fits a GPTConfig field's type (an int is a float; a bool is not an int)."""
    allowed = typing.get_args(hint) or (hint,)
    if isinstance(value, bool):
        return bool in allowed
    return any(t is not bool and isinstance(value, t) for t in allowed) or (float in allowed and isinstance(value, int))


def read_tokenizer(meta: dict, where: str):
    try:
        return tokenizers.from_json(meta["tokenizer"])
    except DataError as e:
        raise CheckpointError(f"{where} has {e}") from None


def read_newest(out_dir: str, report=print):
    """(arrays, meta, GPTConfig, tokenizer) of the newest valid checkpoint in `out_dir`, for
    sampling and export; CheckpointError (one line) when there is none this version reads."""
    skipped = []
    found = checkpoint.load_latest(out_dir, report=skipped.append)
    if found is None and skipped:  # the newest's reason, in the one line
        raise CheckpointError(f"no valid checkpoint in {out_dir!r}: every one is damaged, the newest: "
                              f"{skipped[0].removeprefix('skipping ')}")
    for line in skipped:
        report(line)
    if found is None:
        raise CheckpointError(
            f"no checkpoint in {out_dir!r}: train one first with `python -m parallel_gpt.train --out_dir={out_dir}`")
    arrays, meta = found
    where = f"the checkpoint of step {meta.get('step')} in {out_dir!r}"
    meta = read_meta(meta, where)
    return arrays, meta, read_model_config(meta, where), read_tokenizer(meta, where)


def init_or_resume(tconf: TrainConfig, tokenizer, platform: str, facts: dict | None = None):
    """(model, opt_state or None, start_step) for `platform` devices: a new model, or the
    newest valid checkpoint in out_dir, following `init_from`; `facts` (`run_facts`) are
    compared with the checkpoint's.

    Process 0 alone reads out_dir and sends the state to the others, so that a run whose
    processes have separate disks (a TPU pod's workers) resumes too."""
    try:
        config = tconf.model_config(tokenizer.vocab_size).for_platform(platform, jnp.dtype(tconf.dtype))
    except ValueError as e:  # a kernel that cannot run on these devices
        raise ConfigError(str(e)) from None
    template = GPT.shapes(config)  # shapes only: no initialisation when resuming
    templates = (template, jax.eval_shape(adam_init, template))
    loaded = {}
    start = runtime.on_process_0(_load_newest, tconf, tokenizer, config, templates, loaded, facts)
    if start == "scratch":
        # One compiled initialiser instead of a dispatch (and a compile) per weight matrix.
        return jax.jit(lambda: GPT.create(config, key=jax.random.key(tconf.seed)))(), None, 0
    stack = GPT.stack_layers if config.scan_layers else (lambda tree: tree)  # checkpoints hold a tuple of blocks
    if start == "hf":
        return stack(runtime.broadcast_tree(loaded.get("model"), templates[0])), None, 0
    model, opt = runtime.broadcast_tree(loaded.get("state"), templates)
    return stack(model), AdamState(opt.count, stack(opt.mu), stack(opt.nu)), start


def _load_newest(tconf: TrainConfig, tokenizer, config, templates, loaded: dict, facts: dict | None):
    """Process 0: "scratch" for a new model; "hf" for a Hugging Face checkpoint's, put in
    `loaded["model"]`; or the step of the checkpoint to resume, its (model, opt_state) put
    in `loaded["state"]`."""
    has_ckpt = bool(checkpoint.checkpoint_dirs(tconf.out_dir))
    if tconf.init_from == "scratch" and has_ckpt:
        raise ConfigError(f"out_dir {tconf.out_dir!r} already holds checkpoints: use --init_from=resume "
                          f"to continue them, or choose another out_dir for a new run")
    if tconf.init_from == "scratch" or (tconf.init_from == "auto" and not has_ckpt):
        return "scratch"
    if tconf.hf_dir is not None and not has_ckpt:  # its run resumes once saved
        loaded["model"] = hf.load_model(tconf.hf_dir, config, templates[0])
        print0(f"starting from the Hugging Face checkpoint in {tconf.hf_dir}")
        return "hf"
    found = checkpoint.load_latest(tconf.out_dir, report=lambda msg: print0(msg, file=sys.stderr))
    if found is None and has_ckpt:
        ckpts = Path(tconf.out_dir) / "checkpoints"
        raise CheckpointError(f"every checkpoint in {str(ckpts)!r} is damaged (see the lines above): restore one "
                              f"from a copy, or move that directory aside to start a new run in this out_dir")
    if found is None:
        raise CheckpointError(f"no checkpoint to resume in {tconf.out_dir!r}: check out_dir, or use "
                              f"--init_from=auto to start a new run there")
    arrays, meta = found
    meta = read_meta(meta, f"the checkpoint of step {meta.get('step')} in {tconf.out_dir!r}")
    check_resume(meta, tconf, tokenizer, facts)
    loaded["state"] = (checkpoint.unflatten(templates[0], "model", arrays),
                       checkpoint.unflatten(templates[1], "opt", arrays))
    print0(f"resuming from step {meta['step']} in {tconf.out_dir}")
    return meta["step"]


def check_resume(meta: dict, tconf: TrainConfig, tokenizer, facts: dict | None = None):
    """ConfigError listing what forbids resuming `meta`'s run with `tconf` (and `facts`,
    `run_facts`); prints what else changed."""
    old, new = dict(meta["train"]), tconf.to_flat()
    if "remat" in old:  # a boolean before remat had levels: compared as the level it meant
        old["remat"] = GPTConfig(remat=old["remat"]).remat
    recorded = meta.get("run") if isinstance(meta.get("run"), dict) else {}
    fixed = FIXED_ON_RESUME if recorded.get("dataset_fingerprint") else (*FIXED_ON_RESUME, "dataset")
    changed = [k for k, v in new.items() if k in old and old[k] != v and k not in _RUN_CONTROL]
    forbidden = [f"{k} ({old[k]!r} -> {new[k]!r})" for k in changed if k in fixed]
    if meta["tokenizer"].get("type") != tokenizer.to_json()["type"]:
        forbidden.append(f"tokenizer ({meta['tokenizer'].get('type')!r} -> {tokenizer.to_json()['type']!r})")
    elif meta["tokenizer"] != tokenizer.to_json():
        forbidden.append("vocabulary")
    elif facts and recorded.get("dataset_fingerprint") not in (None, facts["dataset_fingerprint"]):
        # (The fingerprint covers the tokenizer too: named above when that is what changed.)
        was, now = recorded["dataset_fingerprint"][:12], facts["dataset_fingerprint"][:12]
        forbidden.append(f"dataset content ({old.get('dataset')!r}, fingerprint {was} -> {tconf.dataset!r}, {now})")
    if meta["rng"].get("version") != parallel.RNG_VERSION:
        forbidden.append(f"dropout RNG derivation (version {meta['rng'].get('version')!r} -> {parallel.RNG_VERSION})")
    if forbidden:
        raise ConfigError("cannot resume: the checkpoint differs in " + ", ".join(forbidden)
                          + ": use the checkpoint's settings or another out_dir")
    listed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in changed if k not in fixed]
    listed += [f"{k} {recorded[k]!r} -> {facts[k]!r}" for k in ("devices", "processes")
               if facts and k in recorded and recorded[k] != facts[k]]
    if listed:
        print0("resuming with changed settings: " + ", ".join(listed))


def check_writable(out_dir: str):
    """OutputError, before anything is written, when out_dir cannot be written or holds an
    entry of the wrong kind (a directory named metrics.jsonl, a file named tb). A missing
    out_dir is not made here (a refused run leaves none): the run makes it when it writes."""
    path = Path(out_dir)
    for name, want_dir in (("metrics.jsonl", False), ("tb", True), ("checkpoints", True)):
        entry = path / name
        if entry.exists() and entry.is_dir() != want_dir:
            raise OutputError(f"{entry} is a {'directory' if entry.is_dir() else 'file'}, but the run writes a "
                              f"{'directory' if want_dir else 'file'} there: move it aside or choose another out_dir")
    existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"out_dir {out_dir!r} is not writable ({existing} is not a writable directory): "
                          f"choose another out_dir")
