"""`python -m parallel_gpt.plan`: the training step compiled ahead of time for a TPU slice
or N devices, from any machine, and whether it fits each device's memory.

    python -m parallel_gpt.plan [--preset NAME] [--key=value ...] --topology NAME
        [--memory_limit GIB] [--max_batch N] [--vocab_size N] [--json]

The training settings are train's (model shape, batch_size, dtype, remat, grad_accum...).
--topology: a TPU slice by its Cloud name (v4-32, v5litepod-16, v5p-8, v6e-8; see
`topologies`), compiled by libtpu for every chip of every host (needs `pip install -e
'.[tpu]'`, no TPU), or cpu:N, N simulated CPU devices. --memory_limit overrides the
chip's memory (GiB per device); cpu:N defaults to this host's RAM shared by N.
--max_batch: also find the largest global batch up to N that fits, by bisection (each probe
is one more compile). --vocab_size: the tokenizer's vocabulary (default: GPT-2's 50257 with
--tokenizer=gpt2, else the dataset's, read as train reads it).

The step compiled is the step that trains: `parallel.shard_map_step` over a mesh of the
target's devices, with the state laid out at the run's `state_sharding`
(`sharding.StateLayout`) and the batch sharded over the devices as `parallel.shard_batch`
places it, model and optimizer state donated.

Exit codes: 0 fits; 1 does not fit; 2 bad input (one line on stderr says what to change).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parallel_gpt import parallel, runtime, topologies
from parallel_gpt.config import TrainConfig, default_preset, make_config, parse_overrides
from parallel_gpt.data import load_corpus
from parallel_gpt.errors import ConfigError, run_cli
from parallel_gpt.model import GPT
from parallel_gpt.optim import adam_init
from parallel_gpt.sharding import AXIS, StateLayout, TrainState
from parallel_gpt.tokenizers import GPT2Tokenizer

EXIT_FITS, EXIT_DOES_NOT_FIT = 0, 1  # and errors.EXIT_BAD_INPUT (2) for bad input
GiB = 1 << 30
# --name=value options of plan itself, with their types; everything else is train's.
OPTIONS = {"topology": str, "memory_limit": float, "max_batch": int, "vocab_size": int, "json": bool,
           "compilation_cache": str}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: list  # compile-only TPU devices, or this process's CPU devices
    platform: str  # "tpu" or "cpu": resolves the model's "auto" kernels as train would there
    memory: int  # bytes per device
    memory_source: str


def target(name: str, memory_limit_gib: float | None = None) -> Target:
    """The devices of `name` (a TPU slice or cpu:N) and each one's memory, or ConfigError."""
    if name.startswith("cpu:"):
        n = int(name[4:]) if name[4:].isdigit() else 0
        if n < 1:
            raise ConfigError(f"--topology={name}: use cpu:N with N >= 1 simulated CPU devices")
        available = jax.devices("cpu")
        if n > len(available):
            raise ConfigError(f"--topology={name} but this process has {len(available)} CPU devices: run plan in a "
                            f"new process (it sets jax_num_cpu_devices) or use cpu:{len(available)}")
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        memory, source = ram // n, f"this host's {ram / GiB:.1f} GiB RAM shared by {n} devices"
        devices, platform = available[:n], "cpu"
    else:
        s = topologies.parse_slice(name)
        if s is None:
            raise ConfigError(f"unknown --topology={name!r}: use cpu:N or one of {', '.join(topologies.known_names())}")
        if importlib.util.find_spec("libtpu") is None:
            raise ConfigError(f"--topology={name} compiles with libtpu, which is not installed: pip install -e '.[tpu]'")
        # libtpu reads these at start-up; off a TPU VM it would otherwise ask the metadata
        # server and print errors, though the compile-only devices work either way. Its
        # one-process lock (/tmp/libtpu_lockfile) guards chips that plan never runs on:
        # without this, a second plan fails while the first compiles.
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", name)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        devices, platform = topologies.compile_only_devices(s), "tpu"
        memory, source = s.generation.hbm_gib * GiB, s.generation.source
    if memory_limit_gib is not None:
        if memory_limit_gib <= 0:
            raise ConfigError(f"--memory_limit={memory_limit_gib} must be > 0 (GiB per device)")
        memory, source = int(memory_limit_gib * GiB), "--memory_limit"
    return Target(name, list(devices), platform, memory, source)


def abstract_step_inputs(tconf: TrainConfig, config, mesh: Mesh):
    """The state's layout at tconf's `state_sharding`, and (model, xb, yb, opt_state, stop)
    as shapes with shardings: the arguments train passes to the step, with no array allocated."""
    model = jax.eval_shape(lambda: GPT.create(config, key=jax.random.key(tconf.seed)))
    layout = StateLayout(tconf.state_sharding, mesh.size, model)
    state = layout.abstract(TrainState(model, jax.eval_shape(adam_init, model)), mesh)
    n, sharded = mesh.size, NamedSharding(mesh, P(AXIS))
    batch = jax.ShapeDtypeStruct((n, tconf.batch_size // n, config.block_size), jnp.int32, sharding=sharded)
    stop = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=sharded)
    return layout, (state.model, batch, batch, state.opt, stop)


def per_device_bytes(tree) -> int:
    """Bytes of `tree`'s leaves held by one device (the first), from their shardings."""
    return sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize for s in jax.tree.leaves(tree))


def compile_step(tconf: TrainConfig, config, t: Target) -> dict:
    """Compile train's step for `t` at tconf's batch; its per-device bytes, FLOPs and compile time."""
    parallel.check_layout(tconf.batch_size, tconf.grad_accum, len(t.devices), where=f" of {t.name}")
    mesh = Mesh(np.array(t.devices), (AXIS,))
    layout, (model, xb, yb, opt_state, stop) = abstract_step_inputs(tconf, config, mesh)
    pstep = parallel.shard_map_step(mesh, layout, hp=tconf.optim, seed=tconf.seed, grad_accum=tconf.grad_accum,
                                    dtype=jnp.dtype(tconf.dtype))
    n = mesh.size
    flops_per_token = GPT.shapes(config).flops_per_token()  # of the logical model: no padding
    step = {"batch_size": tconf.batch_size, "per_device_batch": tconf.batch_size // n,
            "params": per_device_bytes(model), "optimizer": per_device_bytes(opt_state),
            "batch": per_device_bytes((xb, yb, stop)),
            "formula_flops": flops_per_token * tconf.batch_size // n * config.block_size}
    start = time.perf_counter()
    try:
        compiled = pstep.trace(model, xb, yb, opt_state, stop).lower().compile()
    except jax.errors.JaxRuntimeError as e:
        # libtpu refuses a program larger than the chip's HBM instead of compiling it:
        # "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO
        # temporaries (32.27G) exceeds available HBM (15.75G)." Its figures are the verdict.
        if not str(e).startswith("RESOURCE_EXHAUSTED"):
            raise
        needed = re.search(r"\(([0-9.]+)G\) exceeds available HBM \(([0-9.]+)G\)", str(e))
        return step | {"compile_seconds": round(time.perf_counter() - start, 1), "compiler_refused": str(e),
                       "total": int(float(needed[1]) * GiB) if needed else None}
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    # Outputs aliased to donated arguments (the new model and optimizer state) take no
    # memory of their own; the program's code is loaded into device memory too.
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
    return step | {"compile_seconds": round(seconds, 1), "arguments": mem.argument_size_in_bytes,
                   "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
                   "temporaries": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes, "total": total,
                   # XLA's cost analysis counts a loop's body once: with scanned layers, one block.
                   **({} if config.scan_layers else {"flops": compiled.cost_analysis()["flops"]})}


def fits(step: dict, t: Target) -> bool:
    return "compiler_refused" not in step and step["total"] <= t.memory


def largest_batch(tconf: TrainConfig, config, t: Target, max_batch: int, first: dict) -> dict:
    """The largest global batch up to `max_batch` whose step fits, by bisection over the
    per-device micro-batch count (batches step by devices x grad_accum); `first` is the
    compile at tconf's batch. batch_size 0 when even the smallest does not fit."""
    unit = len(t.devices) * tconf.grad_accum
    if max_batch < unit:
        raise ConfigError(f"--max_batch={max_batch} is below the smallest batch for {t.name}: "
                        f"{len(t.devices)} devices x grad_accum={tconf.grad_accum} = {unit}")
    good, bad = 0, max_batch // unit + 1  # in units: the largest known to fit, the smallest known not to
    known = tconf.batch_size // unit
    if known < bad:
        good, bad = (known, bad) if fits(first, t) else (0, known)
    best, compiles = (first if good else None), 0
    while bad - good > 1:
        mid = (good + bad) // 2
        probe = compile_step(dataclasses.replace(tconf, batch_size=mid * unit), config, t)
        compiles += 1
        if fits(probe, t):
            good, best = mid, probe
        else:
            bad = mid
    return {"batch_size": good * unit, "per_device_batch": good * unit // len(t.devices),
            "total": best["total"] if best else None, "searched_up_to": max_batch, "compiles": compiles}


def plan(tconf: TrainConfig, t: Target, vocab_size: int, max_batch: int | None = None) -> dict:
    """The report: devices, parameters, per-device bytes against memory, FLOPs, compile time."""
    try:
        config = tconf.model_config(vocab_size).for_platform(t.platform, jnp.dtype(tconf.dtype))
    except ValueError as e:  # a kernel that cannot run on these devices
        raise ConfigError(str(e)) from None
    step = compile_step(tconf, config, t)
    model = GPT.shapes(config)
    report = {
        "topology": t.name, "device_kind": t.devices[0].device_kind, "devices": len(t.devices),
        "hosts": len({d.process_index for d in t.devices}), "parameters": model.num_params(non_embedding=False),
        "memory": t.memory, "memory_source": t.memory_source, "step": step,
        "fits": fits(step, t), "margin": None if step["total"] is None else t.memory - step["total"],
        "settings": {k: v for k, v in tconf.to_flat().items()
                     if k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "dtype", "remat",
                              "scan_layers", "grad_accum", "state_sharding")}
        | {"vocab_size": config.vocab_size, "attention": config.attention},
    }
    if max_batch is not None:
        report["largest_batch"] = largest_batch(tconf, config, t, max_batch, step)
    return report


def _size(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB // 10 else f"{n / (1 << 20):.2f} MiB"


def format_report(r: dict) -> str:
    s, step = r["settings"], r["step"]
    rows = [
        ("target", f"{r['topology']}: {r['devices']} x {r['device_kind']}, {r['hosts']} host(s)"),
        ("model", f"{r['parameters'] / 1e6:.2f}M parameters ({s['n_layer']} x {s['n_embd']}, block "
                  f"{s['block_size']}, vocab {s['vocab_size']}), {s['dtype']} activations, remat={s['remat']}, "
                  f"scan_layers={s['scan_layers']}, attention={s['attention']}"),
        ("state", f"state_sharding={s['state_sharding']}"),
        ("batch", f"{step['batch_size']} ({step['per_device_batch']} per device, grad_accum={s['grad_accum']})"),
        ("params", _size(step["params"])),
        ("optimizer state", _size(step["optimizer"])),
        ("batch", _size(step["batch"])),
    ]
    memory = f"{_size(r['memory'])} ({r['memory_source']})"
    if "compiler_refused" in step:
        needed = _size(step["total"]) if step["total"] is not None else "more"
        rows += [("total per device", f"{needed} of {memory}"),
                 ("compiler", step["compiler_refused"].splitlines()[0])]
    else:
        rows += [("temporaries", f"{_size(step['temporaries'])} (activations kept for the backward pass, "
                                 f"gradients, workspace)"),
                 ("total per device", f"{_size(step['total'])} of {memory}")]
    margin = r["margin"]
    rows.append(("verdict", f"fits ({_size(margin)} to spare)" if r["fits"] else
                 "does not fit" + (f" (by {_size(-margin)})" if margin is not None and margin < 0 else "")))
    if "flops" in step:
        rows.append(("FLOPs per device", f"{step['flops']:.4g} per step compiled, {step['formula_flops']:.4g} by "
                                         f"6N + 12LTC per token ({step['flops'] / step['formula_flops']:.3f}x)"))
    elif "compiler_refused" not in step:
        rows.append(("FLOPs per device", f"{step['formula_flops']:.4g} by 6N + 12LTC per token (XLA counts a "
                                         f"scanned loop's body once: --scan_layers=false to check it)"))
    rows.append(("compile", f"{step['compile_seconds']:.1f} s"))
    if "largest_batch" in r:
        lb = r["largest_batch"]
        rows.append(("largest batch", f"{lb['batch_size']} ({lb['per_device_batch']} per device) of at most "
                                      f"{lb['searched_up_to']}, {lb['compiles']} more compile(s)"
                     if lb["batch_size"] else f"none up to {lb['searched_up_to']} fits"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def split_args(argv: list[str]) -> tuple[dict, list[str]]:
    """plan's own options (OPTIONS) -> typed {name: value}; the rest, train's, untouched."""
    own, rest, i = {}, [], 0
    while i < len(argv):
        key, eq, raw = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        if key not in OPTIONS:
            rest.append(argv[i])
        elif OPTIONS[key] is bool:
            own[key] = raw.lower() in ("", "true", "1", "yes")
        else:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"--{key} needs a value: use --{key}=VALUE")
                raw, i = argv[i + 1], i + 1
            try:
                own[key] = OPTIONS[key](raw)
            except ValueError:
                raise ConfigError(f"--{key}={raw!r}: expected {OPTIONS[key].__name__}") from None
        i += 1
    return own, rest


def vocab_size_for(tconf: TrainConfig, given: int | None) -> int:
    if given is not None:
        if given < 1:
            raise ConfigError(f"--vocab_size={given} must be >= 1")
        return given
    if tconf.tokenizer == "gpt2":
        return GPT2Tokenizer.vocab_size
    return load_corpus(tconf.dataset, tconf.tokenizer).tokenizer.vocab_size


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    own, rest = split_args(argv)
    if "topology" not in own:
        raise ConfigError("--topology is required: a TPU slice (v4-32, v5litepod-16, ...) or cpu:N")
    name = own["topology"]
    # plan runs nothing, so it leaves this machine's accelerators alone (a TPU VM's may be
    # training); compile-only TPU devices come from libtpu all the same.
    jax.config.update("jax_platforms", "cpu")
    if name.startswith("cpu:") and name[4:].isdigit():
        with contextlib.suppress(RuntimeError):  # CPU devices already made (tests): `target` checks the count
            jax.config.update("jax_num_cpu_devices", int(name[4:]))
    preset, overrides = parse_overrides(rest)
    t = target(name, own.get("memory_limit"))
    # A program compiled for compile-only TPU devices cannot be loaded back from the cache
    # (JAX: "PjRtCompiler must be constructed with a Client"), so only cpu:N plans use it.
    runtime.use_compilation_cache(own.get("compilation_cache", "auto") if t.platform == "cpu" else "off")
    tconf = make_config(preset or default_preset(t.platform), overrides)
    report = plan(tconf, t, vocab_size_for(tconf, own.get("vocab_size")), own.get("max_batch"))
    print(json.dumps(report, indent=1) if own.get("json") else format_report(report))
    return EXIT_FITS if report["fits"] else EXIT_DOES_NOT_FIT


if __name__ == "__main__":
    sys.exit(main())
