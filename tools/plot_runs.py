"""Plot a metric of several runs from their metrics.jsonl, and print each run's final value.

python tools/plot_runs.py runs/210m/* --metric val/loss --out val_loss.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.metrics import read_metrics


def series(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    by_step = {r["step"]: r[metric] for r in read_metrics(run_dir / "metrics.jsonl") if metric in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metric", default="val/loss")
    parser.add_argument("--out", type=Path, default=Path("runs.png"))
    parser.add_argument("--logy", action="store_true")
    args = parser.parse_args(argv)
    # A Figure made directly, not through pyplot: no display backend and no global figure state needed.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted = 0
    for run in args.runs:
        steps, values = series(run, args.metric)
        if not steps:
            print(f"{run}: no {args.metric} records", file=sys.stderr)
            continue
        ax.plot(steps, values, label=run.name, marker="o" if len(steps) < 30 else None)
        print(f"{run}: final {args.metric} {values[-1]:.4f} at step {steps[-1]}")
        plotted += 1
    if not plotted:
        print(f"error: none of the runs has {args.metric} in metrics.jsonl", file=sys.stderr)
        return 1
    ax.set_xlabel("step")
    ax.set_ylabel(args.metric)
    if args.logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
