"""memopt-lm's one entry point.

    python train.py configs/tiny.yaml [--section.key=value ...]
    torchrun --nproc_per_node=8 train.py configs/210m.yaml --optim.name=adamem --optim.lr=3.16e-3

Re-running the same command on the same run directory resumes from its latest checkpoint.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

USAGE = "usage: python train.py CONFIG.yaml [--section.key=value ...]   (e.g. configs/tiny.yaml --train.max_steps=200)"


def main(argv: list[str]) -> int:
    if not argv or "-h" in argv or "--help" in argv:
        if not argv:
            print(USAGE, file=sys.stderr)
            return 2
        from trainer.config import help_text

        print(USAGE + "\n\nEvery key (a YAML file sets them per section; --section.key=value overrides):" + help_text())
        return 0
    from data import DataError, DataWarning
    from trainer.checkpoint import CheckpointError
    from trainer.config import ConfigError, load_config
    from trainer.metrics import read_metrics
    from trainer.run_lock import RunDirError
    from trainer.trainer import TrainingDiverged, train

    main_rank = int(os.environ.get("RANK", "0")) == 0
    try:
        with warnings.catch_warnings():
            warnings.showwarning = data_warning_printer(DataWarning, main_rank, warnings.showwarning)
            cfg = load_config(argv[0], argv[1:])
            result = train(cfg)
    except (ConfigError, DataError, CheckpointError, RunDirError, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if main_rank:
        run_dir = cfg.run.dir
        # The whole run's, not only this start's: a resumed run's first evaluation is not its first.
        history = [(r["step"], r["val/loss"]) for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "val/loss" in r]
        if history:
            first, last = history[0], history[-1]
            print(f"validation loss: {first[1]:.4f} at step {first[0]} -> {last[1]:.4f} at step {last[0]}")
        if result.stopped_by_signal:
            print(f"stopped at step {result.final_step} of {cfg.train.max_steps}: re-run the same command to resume")
        print(f"run directory: {run_dir}  (config.yaml, metrics.jsonl, checkpoints/)")
        print(f"view the curves: tensorboard --logdir {run_dir}/tensorboard   (then open http://localhost:6006)")
    return 0


def data_warning_printer(
    category: type[Warning], main_rank: bool, fallback: Callable[..., None]
) -> Callable[..., None]:
    """warnings.showwarning that prints `category` warnings as one `warning: ...` line (on the
    main rank only: every rank opens the data) and leaves other warnings to `fallback`."""

    def show(message: Warning | str, cat: type[Warning], *args: Any, **kwargs: Any) -> None:
        if issubclass(cat, category):
            if main_rank:
                print(f"warning: {message}", file=sys.stderr, flush=True)
        else:
            fallback(message, cat, *args, **kwargs)

    return show


if __name__ == "__main__":
    from trainer.console import exit_quietly_on_closed_stdout, print_to_stderr  # a light module: --help stays fast

    try:
        sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
    except KeyboardInterrupt:  # a Ctrl-C before training (imports, data checks) or a second one during it
        if int(os.environ.get("RANK", "0")) == 0:  # torchrun forwards the signal to every rank
            print_to_stderr(
                "\nerror: interrupted: exited at once, without saving (every checkpoint written before is whole: "
                "re-run the same command to resume from the latest)"
            )
        sys.exit(130)
