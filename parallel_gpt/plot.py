"""`python -m parallel_gpt.plot OUT_DIR [OUT_DIR ...] --out curves.png`: loss curves from metrics.jsonl.

Four panels, one colour per run, labelled with its out_dir: train loss (the logged
steps', thin) and the evaluations' val loss (dashed, with markers) against steps and
against tokens trained on, the learning rate, and tokens/s. Runs logged before rows
carried a token count are left out of the tokens panel. Needs matplotlib (the [plot]
extra). A missing or unreadable out_dir is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from parallel_gpt.files import write_atomic
from parallel_gpt.errors import DataError, OutputError, run_cli

SIZE_INCHES, DPI = (12, 8), 100  # a 1200 x 800 picture


def read_rows(out_dir: str) -> list[dict]:
    """The rows of out_dir/metrics.jsonl; DataError naming the file and line of a bad one."""
    path = Path(out_dir) / "metrics.jsonl"
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{path} does not exist: pass the out_dir of a training run") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}, line {number}: not a metrics row (JSON with a step): is this a run's out_dir?")
        rows.append(row)
    if not rows:
        raise DataError(f"{path} has no rows yet: plot a run once it has logged a step")
    return rows


def series(rows: list[dict], key: str, x: str = "step") -> tuple[list, list]:
    """(xs, ys) of the rows that have both `x` and `key`."""
    pairs = [(r[x], r[key]) for r in rows if r.get(x) is not None and r.get(key) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(runs: dict[str, list[dict]], out: str):
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=SIZE_INCHES, dpi=DPI)
    (by_step, by_tokens), (lr, speed) = axes
    for i, (label, rows) in enumerate(runs.items()):
        color = f"C{i}"
        for ax, x in ((by_step, "step"), (by_tokens, "tokens")):
            ax.plot(*series(rows, "loss", x), color=color, linewidth=0.8, alpha=0.6, label=f"{label} train")
            ax.plot(*series(rows, "val_loss", x), color=color, linestyle="--", marker="o", markersize=3,
                    label=f"{label} val")
        lr.plot(*series(rows, "lr"), color=color, label=label)
        speed.plot(*series(rows, "tokens_per_sec"), color=color, label=label)
    for ax, xlabel, ylabel in ((by_step, "step", "loss"), (by_tokens, "tokens", "loss"),
                               (lr, "step", "learning rate"), (speed, "step", "tokens/s")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    plt.close(fig)
    write_atomic(Path(out), png.getvalue())  # a failed write leaves no half picture


def main(argv=None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR")
    parser.add_argument("--out", default="curves.png", help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DataError("plot needs matplotlib: pip install 'parallel_gpt[plot]'") from None
    runs = {}
    for out_dir in args.out_dirs:
        label = Path(out_dir).resolve().name
        runs[label if label not in runs else out_dir] = read_rows(out_dir)
    try:
        plot(runs, args.out)
    except OSError as e:
        raise OutputError(f"cannot write {args.out}: {e.strerror or e}: choose another --out") from None
    print(f"{args.out}: {', '.join(runs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
