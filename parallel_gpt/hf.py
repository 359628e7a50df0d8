"""Hugging Face GPT-2 checkpoints in and out: `config.json` + `model.safetensors`.

Our tree is GPT-2's: `Linear` weights are (in, out) like its `Conv1D`, and the paths
match its names (`h.0.attn.c_attn.weight` is our `h/0/attn/c_attn/weight`), so the
conversion is renaming, the `transformer.` prefix, the vocabulary padding, and checks.

Import (`--init_from=DIR`) takes what real files hold: keys with or without the
`transformer.` prefix, `attn.bias` / `attn.masked_bias` buffers (dropped), a
`lm_head.weight` equal to `wte` (an untied head is refused), float16 / bfloat16 tensors
(cast to float32), `layer_norm_epsilon`, and `n_positions` above the run's block_size
(`wpe` cropped). What the model cannot represent is refused in one line naming the field.
Export writes the unpadded vocabulary with the `transformer.` prefix and
`{"format": "pt"}` metadata, which `transformers.GPT2LMHeadModel.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

from parallel_gpt import checkpoint, tokenizers
from parallel_gpt.errors import CheckpointError, HFError
from parallel_gpt.model import GPTConfig, pad_vocab

CONFIG, WEIGHTS = "config.json", "model.safetensors"
EXPORTED = (CONFIG, WEIGHTS, "vocab.json", "merges.txt", "tokenizer_config.json")  # every file `export` writes
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
_BUFFERS = (".attn.bias", ".attn.masked_bias")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def hf_key(name: str) -> str:
    """A checkpoint array's name as a GPT-2 tensor key: model/h/0/attn/c_attn/weight ->
    transformer.h.0.attn.c_attn.weight (`checkpoint.leaf_name` with sep=".", prefixed)."""
    return "transformer." + name.removeprefix("model/").replace("/", ".")


def our_name(key: str) -> str:
    """The inverse of `hf_key` (the `transformer.` prefix optional, as in real files)."""
    return "model/" + key.removeprefix("transformer.").replace(".", "/")


def check_dir(path: str, setting: str = "init_from"):
    """HFError unless `path` holds a config.json and a model.safetensors."""
    if not ((Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()):
        raise HFError(f"{setting}={path!r} is not a Hugging Face GPT-2 directory (config.json + model.safetensors)"
                      + (": use auto, scratch, resume, or such a directory" if setting == "init_from" else ""))


def read_config(path: str) -> dict:
    """The model settings of a GPT-2 `config.json`, as our flat keys (n_layer, n_head,
    n_embd, block_size, bias, layer_norm_eps) plus `vocab_tokens`; HFError for anything
    our GPT cannot represent."""
    file = Path(path) / CONFIG
    c = _read_config_json(file)
    if c.get("model_type", "gpt2") != "gpt2":
        raise HFError(f"{file}: model_type={c.get('model_type')!r}, only gpt2 models load")
    refusals = [
        ("activation_function", c.get("activation_function", "gelu_new") not in TANH_GELUS,
         f"only the tanh GELU ({', '.join(TANH_GELUS)})"),
        ("n_inner", c.get("n_inner") not in (None, 4 * c.get("n_embd", 0)), "only 4 x n_embd"),
        ("scale_attn_by_inverse_layer_idx", bool(c.get("scale_attn_by_inverse_layer_idx")), "only false"),
        ("reorder_and_upcast_attn", bool(c.get("reorder_and_upcast_attn")), "only false"),
        ("add_cross_attention", bool(c.get("add_cross_attention")), "no cross-attention"),
        ("scale_attn_weights", c.get("scale_attn_weights", True) is not True, "only true"),
        ("tie_word_embeddings", c.get("tie_word_embeddings", True) is not True, "only a head tied to wte"),
    ]
    for field, refused, allowed in refusals:
        if refused:
            raise HFError(f"{file}: {field}={c.get(field)!r} cannot be represented ({allowed})")
    missing = [k for k in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")
               if type(c.get(k)) is not int or not 0 < c[k] < 2**31]
    if missing:
        raise HFError(f"{file} lacks {', '.join(missing)} (or has a value that is not a positive integer): "
                      f"not a GPT-2 config")
    if c["n_embd"] % c["n_head"]:
        raise HFError(f"{file}: n_embd={c['n_embd']} is not a multiple of n_head={c['n_head']}: not a GPT-2 config")
    eps = c.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not (math.isfinite(eps) and eps > 0):
        raise HFError(f"{file}: layer_norm_epsilon={eps!r} must be a positive number")
    return {"n_layer": c["n_layer"], "n_head": c["n_head"], "n_embd": c["n_embd"], "block_size": c["n_positions"],
            "bias": True, "layer_norm_eps": float(eps), "vocab_tokens": c["vocab_size"]}


def _read_config_json(file: Path) -> dict:
    try:
        c = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise HFError(f"cannot read {file} ({e})") from None
    if not isinstance(c, dict):
        raise HFError(f"{file} holds a JSON {type(c).__name__}, not an object: not a GPT-2 config")
    return c


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """{name: array} of a .safetensors file, memory-mapped. The `safetensors` package's
    numpy reader has no bfloat16, which real GPT-2 exports use; the format is a length, a
    JSON header and raw little-endian data, read here with ml_dtypes for bfloat16."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        data = np.memmap(file, np.uint8, mode="r", offset=8 + n) if file.stat().st_size > 8 + n else np.zeros(0, np.uint8)
    except (OSError, ValueError, struct.error) as e:
        raise HFError(f"cannot read {file} ({e}): not a safetensors file") from None
    if not isinstance(header, dict):
        raise HFError(f"cannot read {file}: its header is not a JSON object: not a safetensors file")
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(t, dict) or t.get("dtype") not in _DTYPES:
            raise HFError(f"{file}: tensor {name} has dtype {t.get('dtype') if isinstance(t, dict) else None}, "
                          f"not a float type this loader reads")
        try:
            (start, end), shape = t["data_offsets"], tuple(t["shape"])
            size = math.prod(shape) * np.dtype(_DTYPES[t["dtype"]]).itemsize
            valid = 0 <= start <= end and end - start == size
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise HFError(f"{file}: tensor {name} has a damaged header entry: not a safetensors file")
        if end > data.size:  # an interrupted copy
            raise HFError(f"{file} is truncated ({file.stat().st_size} bytes, tensor {name} needs {8 + n + end}): "
                          f"copy or download it again")
        out[name] = data[start:end].view(_DTYPES[t["dtype"]]).reshape(shape)
    return out


def load_model(path: str, config: GPTConfig, template):
    """The HF checkpoint as our GPT with host arrays (float32, vocabulary padded to
    config.vocab_size, wpe cropped to config.block_size), checked against `template`
    (the model's shapes, from `jax.eval_shape`)."""
    file = Path(path) / WEIGHTS
    tensors = {our_name(k): v for k, v in read_safetensors(file).items() if not k.endswith(_BUFFERS)}
    head = tensors.pop(our_name("lm_head.weight"), None)
    if head is not None and not np.array_equal(head, tensors.get(our_name("wte.weight"))):
        raise HFError(f"{file}: lm_head.weight differs from wte.weight (an untied head); this GPT ties them")
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a, np.float32)
        if name == "model/wte/weight":  # (vocab_tokens, C) -> (vocab_size, C); padding rows are never predicted
            if a.shape[0] != config.vocab_tokens:
                raise HFError(f"{file}: wte.weight has {a.shape[0]} rows but config.json says vocab_size="
                              f"{config.vocab_tokens}: the files do not belong together")
            a = np.pad(a, ((0, config.vocab_size - a.shape[0]), (0, 0)))
        elif name == "model/wpe/weight":
            a = a[: config.block_size]
        arrays[name] = a
    try:
        model = checkpoint.unflatten(template, "model", arrays)
    except CheckpointError as e:
        raise HFError(f"{file}: {e}") from None
    unexpected = sorted(arrays.keys() - set(checkpoint.names(template, "model")))
    if unexpected:
        raise HFError(f"{file} has tensors this GPT does not have ({', '.join(unexpected[:3])}): its config.json "
                      f"does not describe it")
    return model


def adopt(flat: dict, path: str, tokenizer) -> dict:
    """Run settings `flat` with the model shape of the HF checkpoint at `path`; its
    block_size is the smaller of the run's and the checkpoint's n_positions. HFError when
    the dataset's `tokenizer` is not the model's: another vocabulary than the one its
    config.json names (`parallel_gpt_tokenizer`, or GPT-2's for 50,257 ids), or another size."""
    hf = read_config(path)
    own = _named_tokenizer(_read_config_json(Path(path) / CONFIG))
    if own is not None and own != tokenizer.to_json():
        raise HFError(f"{Path(path) / CONFIG}: the model's vocabulary ({_describe(own)}) is not the dataset's "
                      f"({_describe(tokenizer.to_json())}): every id would mean another token; train on text "
                      f"encoded with the model's tokenizer")
    if hf["vocab_tokens"] != tokenizer.vocab_size:
        raise HFError(f"{Path(path) / CONFIG}: vocab_size={hf['vocab_tokens']} but the dataset's tokenizer has "
                      f"{tokenizer.vocab_size} ids: prepare the data with the model's tokenizer (--tokenizer=gpt2)")
    shape = {k: v for k, v in hf.items() if k != "vocab_tokens"}
    return {**flat, **shape, "block_size": min(flat["block_size"], hf["block_size"])}


def export(model_config: GPTConfig, arrays: dict[str, np.ndarray], tokenizer, to: str, source: str | None = None):
    """Write `to`/config.json and model.safetensors for `transformers.GPT2LMHeadModel`;
    config.json names our tokenizer too (`parallel_gpt_tokenizer`), so a character-level
    model carries its vocabulary, and the run it came from (`parallel_gpt_source`, the
    resolved out_dir), so that exporting the run again may replace it."""
    from safetensors.numpy import save_file

    c = model_config
    n = tokenizer.vocab_size
    tensors = {}
    for name, a in arrays.items():
        if not name.startswith("model/"):
            continue
        key = hf_key(name)
        tensors[key] = np.ascontiguousarray(a[:n] if key == "transformer.wte.weight" else a, np.float32)
    if not c.bias:  # GPT-2 always has biases: zeros compute the same model
        for key in list(tensors):
            if key.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight", "c_attn.weight", "c_proj.weight",
                             "c_fc.weight")):
                bias = key.removesuffix("weight") + "bias"
                tensors.setdefault(bias, np.zeros(tensors[key].shape[-1], np.float32))
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": n,
              "n_positions": c.block_size, "n_ctx": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer,
              "n_head": c.n_head, "n_inner": None, "activation_function": "gelu_new",
              "resid_pdrop": c.dropout, "embd_pdrop": c.dropout, "attn_pdrop": 0.0,
              "layer_norm_epsilon": c.layer_norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
              "tie_word_embeddings": True, "parallel_gpt_tokenizer": tokenizer.to_json(), "parallel_gpt_source": source}
    if tokenizer.eot is not None:
        config.update(bos_token_id=50256, eos_token_id=50256)
    out = Path(to)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if isinstance(tokenizer, tokenizers.GPT2Tokenizer):
        write_gpt2_tokenizer(out, c.block_size)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (vocab.json and merges.txt spell tokens so)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair of tokens whose merge made `token`: byte-pair encoding of its bytes with
    the merges ranked before it, which ends in exactly two parts."""
    parts, limit = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], limit), i) for i in range(len(parts) - 1))
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts[0], parts[1]


def write_gpt2_tokenizer(out: Path, max_length: int):
    """vocab.json, merges.txt and tokenizer_config.json: what `transformers.AutoTokenizer`
    needs for GPT-2's tokenizer, derived from the shipped ranks."""
    ranks = tokenizers.gpt2_encoding()._mergeable_ranks
    spell = _bytes_to_unicode()
    text = lambda token: "".join(spell[b] for b in token)  # noqa: E731
    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[tokenizers.EOT] = tokenizers.GPT2Tokenizer.eot
    merges = ["#version: 0.2"] + [" ".join(map(text, _merge(token, ranks)))
                                   for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(token) > 1]
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    eot = tokenizers.EOT
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": max_length, "bos_token": eot, "eos_token": eot,
        "unk_token": eot, "add_prefix_space": False}, indent=2) + "\n")


def _named_tokenizer(c: dict) -> dict | None:
    """The tokenizer (as `to_json`) a config.json names: ours, else GPT-2's for 50,257 ids."""
    if "parallel_gpt_tokenizer" in c:
        return c["parallel_gpt_tokenizer"]
    return tokenizers.GPT2Tokenizer().to_json() if c.get("vocab_size") == tokenizers.GPT2Tokenizer.vocab_size else None


def _describe(tokenizer_json) -> str:
    chars = tokenizer_json.get("chars") if isinstance(tokenizer_json, dict) else None
    kind = tokenizer_json.get("type") if isinstance(tokenizer_json, dict) else tokenizer_json
    return f"{kind} tokens" + (f", {len(chars)} characters starting {chars[:12]!r}" if isinstance(chars, str) else "")


def tokenizer(path: str):
    """The tokenizer of an HF checkpoint: the one our export names, else GPT-2's for a
    50,257-id vocabulary; HFError otherwise."""
    file = Path(path) / CONFIG
    c = _read_config_json(file)
    named = _named_tokenizer(c)
    if named is not None:
        try:
            tok = tokenizers.from_json(named)
        except tokenizers.DataError as e:
            raise HFError(f"{file}: parallel_gpt_tokenizer names {e}") from None
        if tok.vocab_size != c.get("vocab_size"):
            raise HFError(f"{file}: its tokenizer has {tok.vocab_size} ids but vocab_size={c.get('vocab_size')!r}: "
                          f"the file is damaged")
        return tok
    raise HFError(f"{Path(path) / CONFIG}: vocab_size={c.get('vocab_size')} is not GPT-2's and names no tokenizer: "
                  f"sampling needs a tokenizer this version knows")


def model_config(path: str, block_size: int | None = None) -> GPTConfig:
    """The GPTConfig of an HF checkpoint (backend settings unresolved), for sampling."""
    hf = read_config(path)
    vocab = hf.pop("vocab_tokens")
    if block_size:
        hf["block_size"] = min(block_size, hf["block_size"])
    try:
        return dataclasses.replace(GPTConfig(dropout=0.0), **hf, vocab_size=pad_vocab(vocab), vocab_tokens=vocab)
    except ValueError as e:  # GPTConfig's own checks
        raise HFError(f"{Path(path) / CONFIG}: {e}") from None
