"""`python -m parallel_gpt.export --out_dir RUN --to DIR`: a run's newest valid checkpoint
as a Hugging Face GPT-2 directory (config.json + model.safetensors) that
`transformers.GPT2LMHeadModel.from_pretrained(DIR)` loads. See `hf.export`.

The directory is written beside DIR and renamed into place, so a failed export leaves DIR
as it was. A DIR that holds anything but an earlier export of the same run is refused
without --overwrite."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from parallel_gpt import hf, runstate
from parallel_gpt.errors import OutputError, run_cli
from parallel_gpt.files import replace_dir


def export_run(out_dir: str, to: str, report=print, overwrite: bool = False) -> str:
    if not to.strip():
        raise OutputError("--to is empty: name the directory to write")
    target = Path(to)
    if not overwrite and _holds_other_files(target, out_dir):
        raise OutputError(f"--to {to!r} already holds files that are not an export of {out_dir!r}: pass --overwrite "
                          f"to replace them, or choose another --to")
    arrays, meta, config, tokenizer = runstate.read_newest(out_dir, report)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        hf.export(config, arrays, tokenizer, str(tmp), source=str(Path(out_dir).resolve()))
        replace_dir(tmp, target)  # a file at `to` makes this fail, and nothing was replaced
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return f"wrote step {meta['step']} of {out_dir} to {to}"


def _holds_other_files(target: Path, out_dir: str) -> bool:
    """Whether `target` exists and is not empty nor an earlier export of the run in `out_dir`."""
    if not target.exists():
        return False
    if not target.is_dir():
        return True
    entries = list(target.iterdir())
    if not entries:
        return False
    try:
        source = json.loads((target / hf.CONFIG).read_text()).get("parallel_gpt_source")
    except (OSError, ValueError, AttributeError):
        return True
    return source != str(Path(out_dir).resolve()) or any(e.name not in hf.EXPORTED or not e.is_file() for e in entries)


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m parallel_gpt.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out_dir", default="out", help="the training run's out_dir (default: out)")
    ap.add_argument("--to", required=True, help="the directory to write")
    ap.add_argument("--overwrite", action="store_true", help="replace a --to that holds other files")
    args = ap.parse_args(argv)
    print(export_run(args.out_dir, args.to, report=lambda m: print(m, file=sys.stderr), overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
