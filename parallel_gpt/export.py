"""`python -m parallel_gpt.export --out_dir RUN --to DIR`: a run's newest valid checkpoint
as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads. See `hf.export`."""

from __future__ import annotations

import argparse
import sys

from parallel_gpt import hf, runstate
from parallel_gpt.errors import run_cli


def export_run(out_dir: str, to: str, report=print) -> str:
    arrays, meta, config, tokenizer = runstate.read_newest(out_dir, report)
    hf.export(config, arrays, tokenizer, to)
    return f"wrote step {meta['step']} of {out_dir} to {to}"


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel_gpt.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out", help="the training run's out_dir (default: out)")
    ap.add_argument("--to", required=True, help="the directory to write")
    args = ap.parse_args(argv)
    print(export_run(args.out_dir, args.to, report=lambda m: print(m, file=sys.stderr)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
