"""Plot a metric of several runs from their metrics.jsonl, and print each run's final value.

python tools/plot_runs.py runs/210m/* --metric val/loss --out val_loss.png
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.console import exit_quietly_on_closed_stdout
from trainer.flag_parser import FlagParser
from trainer.metrics import MetricsFileError, read_metrics

FORMATS = (".png", ".pdf", ".svg")


def series(records: list[dict], metric: str) -> tuple[list[int], list[float]]:
    by_step = {r["step"]: r[metric] for r in records if metric in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def read_runs(runs: list[Path]) -> dict[Path, list[dict]]:
    """{run directory: its records}; a ValueError naming the path that is no run directory (a metrics.jsonl passed
    for its directory is taken as it)."""
    out = {}
    for run in runs:
        run = run.parent if run.name == "metrics.jsonl" else run
        if not (run / "metrics.jsonl").is_file():
            what = "does not exist" if not run.exists() else "has no metrics.jsonl"
            raise ValueError(f"{run} {what}: pass run directories (the --run.dir of train.py), e.g. runs/210m/*")
        out[run] = read_metrics(run / "metrics.jsonl")
    return out


def run_labels(runs: list[Path]) -> dict[Path, str]:
    """Each run directory's legend label: its path below the runs' common parent, so that study runs, which all
    end in seed<N>, stay apart (runs/studies/mini/runs/adamw/lr0.001/seed0 and .../galore/lr0.01/seed0 ->
    adamw/lr0.001/seed0 and galore/lr0.01/seed0); a single run's label is its name."""
    resolved = [run.resolve() for run in runs]
    if len(resolved) < 2:
        return {run: run.name for run in runs}
    common = Path(os.path.commonpath(resolved))
    below = {run: path.relative_to(common) for run, path in zip(runs, resolved, strict=True)}
    return {run: run.name if rel == Path() else str(rel) for run, rel in below.items()}


def main(argv: list[str]) -> int:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--metric", default="val/loss")
    parser.add_argument("--out", type=Path, default=Path("runs.png"), help=f"the figure: {', '.join(FORMATS)}")
    parser.add_argument("--logy", action="store_true")
    args = parser.parse_args(argv)
    if args.out.suffix.lower() not in FORMATS:
        parser.error(f"--out {args.out}: the figure's name must end in {', '.join(FORMATS)}")
    if not args.out.parent.is_dir():
        parser.error(f"--out {args.out}: the directory {args.out.parent} does not exist; create it or pick another")
    try:
        runs = read_runs(args.runs)
    except (ValueError, MetricsFileError) as e:  # MetricsFileError: a damaged line, named with its fix
        parser.error(str(e))
    # A Figure made directly, not through pyplot: no display backend and no global figure state needed.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    plotted = 0
    labels = run_labels(list(runs))
    for run, records in runs.items():
        steps, values = series(records, args.metric)
        if not steps:
            print(f"{run}: no {args.metric} records", file=sys.stderr)
            continue
        ax.plot(steps, values, label=labels[run], marker="o" if len(steps) < 30 else None)
        print(f"{run}: final {args.metric} {values[-1]:.4f} at step {steps[-1]}")
        plotted += 1
    if not plotted:
        logged = sorted({k for records in runs.values() for r in records for k in r} - {"step"})
        print(
            f"error: none of the runs has {args.metric} in metrics.jsonl; they log: {', '.join(logged) or 'nothing'}",
            file=sys.stderr,
        )
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
    sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
