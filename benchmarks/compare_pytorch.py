"""Our JAX training step against the same GPT in PyTorch, eager and under torch.compile, on the CPU.

From the repository root, with the benchmark extra (`pip install torch==2.13.0`, or `.[bench]`):

    PYTHONPATH=. python benchmarks/compare_pytorch.py                    # nanoGPT's CPU shape and block 128
    PYTHONPATH=. python benchmarks/compare_pytorch.py --shapes 4,4,128,64,12 --steps 10 --rounds 9 --json cmp.json
    PYTHONPATH=. python benchmarks/compare_pytorch.py --no_compile     # eager only: no C++ compiler needed

A shape is n_layer,n_head,n_embd,block_size,batch_size. For each shape the three steps
(ours: `parallel.DataParallel` on 1 device; PyTorch eager; PyTorch with `torch.compile(model)`)
are warmed up, then timed in alternating rounds of `--steps` steps (ours, eager, compiled,
`--rounds` times, each round starting one further along that list) because the machine may
be shared; each step time is the median over rounds, and "ours / this" is the median of
the per-round ratios, so that a slow spell of the machine that spans a round cancels out.
The first step is timed on its own (it includes compilation), before the warm-up.

Each framework runs in its own process, as its users run it: ours in this one, set up as
our entry points set it up (`runtime.keep_freed_memory`, a process-wide malloc setting), and
PyTorch in a worker process with its defaults, which runs its rounds when told to while
this one waits. Only one of them computes at a time.

The PyTorch GPT has our shapes and starts from our weights (copied from the JAX model, so
both report the same loss on the first batch): pre-LayerNorm blocks, a fused qkv Linear,
`scaled_dot_product_attention(is_causal=True)`, tanh-GELU, learned position embeddings, an
output head tied to the token embedding, biases, the vocabulary padded as ours, no dropout,
float32. Its step: cross-entropy, backward, global-norm clipping to 1.0, AdamW (fused, with
our betas, eps and weight decay on >= 2-D parameters only; a constant learning rate, where
ours computes its warmup + cosine schedule on the device: a few scalar operations).
Batches come from the same DataLoader over synthetic tokens for all three.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# PyTorch here is the CPU build: keep JAX on the CPU as well, whatever else is installed.
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import Runner, median_ratio, model_config, synthetic_loader, time_alternating  # noqa: E402  (benchmarks/ is on sys.path)
from parallel_gpt import checkpoint, parallel, runtime  # noqa: E402
from parallel_gpt.model import GPT, GPTConfig  # noqa: E402
from parallel_gpt.optim import AdamHParams  # noqa: E402

DEFAULT_SHAPES = ("4,4,128,64,12", "4,4,128,128,16")  # nanoGPT's CPU shape (block 64, batch 12), then block 128


class TorchAttention(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.n_head = c.n_head
        self.c_attn = torch.nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = torch.nn.Linear(c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)  # (B, T, 3, nh, hs), as ours
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, nh, T, hs) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class TorchMLP(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.c_fc = torch.nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = torch.nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class TorchBlock(torch.nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(c.n_embd, bias=c.bias)
        self.attn = TorchAttention(c)
        self.ln_2 = torch.nn.LayerNorm(c.n_embd, bias=c.bias)
        self.mlp = TorchMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TorchGPT(torch.nn.Module):
    """Our GPT in PyTorch; parameter names follow our tree paths (h.0.attn.c_attn.weight)."""

    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte = torch.nn.Embedding(c.vocab_size, c.n_embd)
        self.wpe = torch.nn.Embedding(c.block_size, c.n_embd)
        self.h = torch.nn.ModuleList(TorchBlock(c) for _ in range(c.n_layer))
        self.ln_f = torch.nn.LayerNorm(c.n_embd, bias=c.bias)

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe.weight[:T]  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, vocab): the tied head
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))

    @classmethod
    def from_arrays(cls, config: GPTConfig, arrays) -> "TorchGPT":
        """A model holding `arrays` ({tree path: array}, see `weights`); our Linear weights
        are (in, out), PyTorch's (out, in)."""
        torch_model = cls(config)
        params = dict(torch_model.named_parameters())
        with torch.no_grad():
            for name, array in arrays.items():
                value = torch.from_numpy(np.array(array))
                owner = torch_model.get_submodule(name.rsplit(".", 1)[0])
                if isinstance(owner, torch.nn.Linear) and name.endswith("weight"):
                    value = value.T
                params[name].copy_(value)
        return torch_model


def weights(model: GPT) -> dict[str, np.ndarray]:
    """{tree path as PyTorch names it (h.0.attn.c_attn.weight): array} of a JAX model."""
    return {checkpoint.leaf_name(path, "."): np.array(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(model)[0]}


class TorchRunner:
    """A PyTorch training step with the `run(n) -> seconds` interface of common.Runner."""

    def __init__(self, model: TorchGPT, forward, loader, hp: AdamHParams):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        self.model, self.forward, self.loader, self.hp, self.next_batch = model, forward, loader, hp, 0
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps, fused=True)

    def run(self, n: int) -> float:
        # PyTorch's CPU operations return when they are done: no device to synchronise.
        t = time.perf_counter()
        for i in range(self.next_batch, self.next_batch + n):
            x, y = (torch.from_numpy(a).long() for a in self.loader.batch(i))  # (B, T) each
            loss = self.forward(x, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.hp.grad_clip)
            self.optimizer.step()
        self.next_batch += n
        return time.perf_counter() - t


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 5 or min(shape) < 1:
        raise SystemExit(f"error: shape {text!r}: give five positive integers n_layer,n_head,n_embd,block_size,batch_size")
    return shape


def config_of(shape: tuple[int, ...], vocab_size: int) -> GPTConfig:
    """The config of `shape` for JAX on the CPU in float32, where this script runs both
    frameworks; the PyTorch model reads only its shape from it."""
    n_layer, n_head, n_embd, block_size, _ = shape
    try:
        return model_config(n_layer, n_head, n_embd, block_size, vocab_size, "cpu", "float32")
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def torch_worker(args) -> int:
    """The PyTorch side, in its own process: build its steps from the weights file, report the
    first-batch loss, then run `<step name> <n>` commands from stdin, answering seconds."""
    shape = parse_shape(args.shapes[0])
    config = config_of(shape, args.vocab_size)
    loader = synthetic_loader(args.vocab_size, config.block_size, shape[-1])
    with np.load(args.torch_worker, allow_pickle=False) as f:
        arrays = dict(f)
    hp = AdamHParams()
    eager = TorchGPT.from_arrays(config, arrays)
    runners = {"PyTorch eager": TorchRunner(eager, eager, loader, hp)}
    if not args.no_compile:
        compiled = TorchGPT.from_arrays(config, arrays)
        runners["PyTorch torch.compile"] = TorchRunner(compiled, torch.compile(compiled), loader, hp)
    x, y = loader.batch(0)
    with torch.no_grad():
        loss = float(eager(torch.from_numpy(x).long(), torch.from_numpy(y).long()))
    print(json.dumps({"loss": loss, "steps": list(runners)}), flush=True)
    for line in sys.stdin:
        name, n = line.rsplit(" ", 1)
        print(runners[name].run(int(n)), flush=True)
    return 0


class RemoteRunner:
    """One step of the PyTorch worker process, with the `run(n) -> seconds` interface."""

    def __init__(self, worker: subprocess.Popen, name: str):
        self.worker, self.name = worker, name

    def run(self, n: int) -> float:
        self.worker.stdin.write(f"{self.name} {n}\n")
        self.worker.stdin.flush()
        reply = self.worker.stdout.readline()
        if not reply:
            raise SystemExit(f"error: the PyTorch worker stopped (exit code {self.worker.wait()}); see its output above")
        return float(reply)


def compare(shape: tuple[int, ...], args) -> dict:
    """First-step and steady-state figures of the three steps for one shape."""
    n_layer, n_head, n_embd, block_size, batch_size = shape
    config = config_of(shape, args.vocab_size)
    hp = AdamHParams()
    loader = synthetic_loader(args.vocab_size, block_size, batch_size)
    mesh = parallel.make_mesh(1)
    jax_model = GPT.create(config, key=jax.random.key(0))
    params = jax_model.num_params()
    x, y = loader.batch(0)
    first_loss = float(jax.jit(GPT.loss)(jax_model, x, y))  # one compile, not one per operation

    with tempfile.TemporaryDirectory() as tmp:
        weights_file = os.path.join(tmp, "weights.npz")
        np.savez(weights_file, **weights(jax_model))
        cmd = [sys.executable, os.path.abspath(__file__), "--shapes", ",".join(map(str, shape)),
               "--vocab_size", str(args.vocab_size), "--torch_worker", weights_file]
        worker = subprocess.Popen(cmd + (["--no_compile"] if args.no_compile else []),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            hello = worker.stdout.readline()
            if not hello:
                raise SystemExit(f"error: the PyTorch worker failed to start (exit code {worker.wait()})")
            hello = json.loads(hello)
            dp = parallel.DataParallel(mesh, hp=hp)
            # The placed state may share jax_model's buffers, which the step donates.
            runners = {"ours (JAX pmap, 1 device)": Runner(dp.step, dp.lower, dp.place(jax_model),
                                                           lambda s: dp.batch(*loader.batch(s)))}
            runners.update((name, RemoteRunner(worker, name)) for name in hello["steps"])
            first_step = {name: r.run(1) for name, r in runners.items()}
            for r in runners.values():
                r.run(args.warmup)
            per_step = time_alternating(runners, args.rounds, args.steps)
        finally:
            worker.stdin.close()
            worker.wait()

    tokens = batch_size * block_size
    results = {name: {"first_step_s": first_step[name], "step_s": statistics.median(t), "step_s_rounds": t,
                      "tokens_per_s": tokens / statistics.median(t)} for name, t in per_step.items()}
    ours = per_step["ours (JAX pmap, 1 device)"]
    for name, r in results.items():  # ours / this in tokens/s is this / ours in step time
        r["ours_over_this"] = median_ratio(per_step[name], ours)
    return {"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "block_size": block_size,
            "batch_size": batch_size, "vocab_size": config.vocab_size, "params": params,
            "first_batch_loss": {"jax": first_loss, "torch": hello["loss"]}, "results": results}


def markdown(report: dict) -> str:
    lines = [f"CPU, {report['threads']} torch threads, torch {report['torch']}, jax {report['jax']}; "
             f"{report['rounds']} alternating rounds x {report['steps']} steps after {report['warmup']} warm-up steps",
             "", "| shape (L, H, C, T, B) | step | first step s (compile) | step ms | tokens/s | ours / this |",
             "|---|---|---:|---:|---:|---:|"]
    for s in report["shapes"]:
        shape = f"{s['n_layer']}, {s['n_head']}, {s['n_embd']}, {s['block_size']}, {s['batch_size']}"
        for name, r in s["results"].items():
            lines.append(f"| {shape} | {name} | {r['first_step_s']:.2f} | {1e3 * r['step_s']:.1f} | "
                         f"{r['tokens_per_s']:,.0f} | {r['ours_over_this']:.2f} |")
    lines += ["", "Loss on the first batch from the same weights (JAX / PyTorch): " + ", ".join(
        f"{s['first_batch_loss']['jax']:.4f} / {s['first_batch_loss']['torch']:.4f}" for s in report["shapes"])]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Tokens/s of our JAX step against PyTorch eager and torch.compile.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES), metavar="L,H,C,T,B",
                   help="n_layer,n_head,n_embd,block_size,batch_size (several allowed)")
    p.add_argument("--vocab_size", type=int, default=77, help="padded to a multiple of 64, as in training")
    # Many short rounds: the machine's speed drifts, and a ratio is only as good as its round.
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and step kind")
    p.add_argument("--rounds", type=int, default=15, help="alternating rounds; step times and ratios are their medians")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first")
    p.add_argument("--no_compile", action="store_true",
                   help="skip torch.compile (it needs a C++ compiler; a first compile takes about a minute on 2 cores)")
    p.add_argument("--json", metavar="FILE", help="write every figure to FILE")
    p.add_argument("--torch_worker", metavar="WEIGHTS.npz", help=argparse.SUPPRESS)  # the worker's job
    args = p.parse_args(argv)
    torch.set_num_threads(os.cpu_count())
    if args.torch_worker:
        return torch_worker(args)
    runtime.keep_freed_memory()  # before JAX starts its CPU threads, as our entry points do
    shapes = [parse_shape(s) for s in args.shapes]
    if min(args.steps, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("error: --steps and --rounds must be >= 1, --warmup >= 0")
    report = {"threads": torch.get_num_threads(), "torch": torch.__version__, "jax": jax.__version__,
              "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
              "shapes": [compare(shape, args) for shape in shapes]}
    print(markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
