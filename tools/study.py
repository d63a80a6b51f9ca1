"""Run a study (arms x grids x seeds, see study/spec.py) and turn its runs into tables and figures.

    python tools/study.py configs/studies/mini.yaml                    # status, and the commands left
    python tools/study.py configs/studies/mini.yaml --run              # setup, run what is left, collect
    python tools/study.py STUDY --launcher "torchrun --nproc_per_node=8"          # the commands, started that way
    python tools/study.py STUDY --setup                                # only the setup steps (before --slurm)
    python tools/study.py STUDY --slurm study.sbatch --slurm-option "--gres=gpu:8" --jobs 16   # a SLURM array
    python tools/study.py STUDY --collect                              # results/, figures/, orderings from the runs

Finished and diverged runs are skipped, interrupted ones resume from their checkpoint, failed ones are
tried again; re-running the same command continues a study. `--run` exits 1 when a run failed (after the
tables of the rest are written). Run directories are relative to the repo
root: the tool works from there whatever the current directory (the study path is read first).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from study import figures, results
from study.figure_data import figure_data
from study.orderings import orderings
from study.report import write_tables
from study.runner import (
    FAILED_FILE,
    LEFT_STATUSES,
    REPO,
    StudyRunError,
    command,
    format_duration,
    run_local,
    run_setup,
    runs_left,
    setup_left,
    write_slurm,
)
from study.spec import Study, load_study
from trainer.config import ConfigError
from trainer.console import exit_quietly_on_closed_stdout
from trainer.flag_parser import FlagParser

CWD = Path.cwd()  # where the user started the tool: the printed resume command works from there
STATUSES = ("complete", "diverged", "failed", "incomplete", "pending")


def main(argv: list[str]) -> int:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path)
    parser.add_argument("--run", action="store_true", help="run the setup and what is left here, then --collect")
    parser.add_argument(
        "--setup", action="store_true", help="run the setup steps (data, tokenizer) here; alone, only them"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once (--run; default: one per CPU core when every run trains on the CPU, else 1), "
        "array tasks at once (--slurm)",
    )
    parser.add_argument(
        "--launcher", default=None, help='how each run starts, e.g. "torchrun --nproc_per_node=8" (default: python)'
    )
    parser.add_argument("--slurm", type=Path, metavar="FILE", help="write an sbatch array script of the runs left")
    parser.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="OPT",
        dashed_value=True,
        help="an #SBATCH line, e.g. --slurm-option --time=24:00:00 (repeat it for each)",
    )
    parser.add_argument("--collect", action="store_true", help="write the result tables, figures and orderings")
    parser.add_argument("--seeds", help="replace the study's seeds, e.g. 0,1")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs} (leave it out for the default)")
    if args.slurm is not None:
        if args.run or args.collect:
            parser.error("--slurm writes the array script only: run --collect after the array has finished")
        args.slurm = args.slurm.resolve()  # from here, before the runner moves to the repo root
        if not args.slurm.parent.is_dir():
            parser.error(f"--slurm {args.slurm}: the directory {args.slurm.parent} does not exist")
    started = time.monotonic()
    try:
        seeds = parse_seeds(args.seeds)
        study = load_study(args.study.resolve(), seeds)
        os.chdir(REPO)  # run directories are relative to the repo root, as for train.py's children
        code = dispatch(args, study, argv)
    except (ConfigError, StudyRunError, results.StudyResultsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.run or args.collect:
        print(f"study wall time: {format_duration(time.monotonic() - started)}")
    return code


def default_jobs(study: Study) -> int:
    """One run per core when every run trains on the CPU: a small model gains more from running
    next to another (one thread each) than from a second thread; one at a time otherwise (a run
    takes the GPUs its launcher gives it)."""
    if all(run.config.train.device == "cpu" for run in study.runs):
        return os.cpu_count() or 1
    return 1


def parse_seeds(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a list of integers; write e.g. --seeds 0,1") from None
    if not seeds:
        raise ConfigError("--seeds is empty; write e.g. --seeds 0,1")
    return seeds


def dispatch(args: argparse.Namespace, study: Study, argv: list[str]) -> int:
    launcher = args.launcher or "python"
    if args.setup:
        run_setup(study)
        if not (args.slurm or args.run or args.collect):
            return 0
    if args.slurm is not None:
        pending = setup_left(study)
        if pending:
            raise StudyRunError(
                f"the study's setup has not run here ({', '.join(str(step.creates) for step in pending)} missing), "
                f"and the array's tasks read what it creates: run `python tools/study.py {args.study} --setup` first"
            )
        write_slurm(study, runs_left(study), launcher, args.slurm, args.slurm_option, max_parallel=args.jobs)
        return 0
    if args.run:
        run_setup(study)
        left = runs_left(study)
        done = len(study.runs) - len(left)
        print(f"study {study.name}: {len(study.runs)} runs, {done} finished, {len(left)} to run", flush=True)
        # Locally, the default is this interpreter (the project's venv), not whatever `python` is on PATH.
        summary = run_local(study, left, args.launcher or shlex.quote(sys.executable), args.jobs or default_jobs(study))
        if summary.stopped_by is not None:
            resume = shlex.join(["python", sys.argv[0] or "tools/study.py", *argv])
            print(
                f"study stopped: {len(runs_left(study))} run(s) left; resume with the same command "
                f"(from {CWD}):\n  {resume}"
            )
            return summary.exit_code
        code = report(study)
        failed = summary.outcomes.get("failed", [])
        if failed:  # a script (make study, a scheduler) must see it; the runs' reasons are in their failed.json
            print(
                f"error: {len(failed)} run(s) failed (their {FAILED_FILE} says why, the status lists them); fix the "
                "cause and re-run the same command: it retries them",
                file=sys.stderr,
            )
            return 1
        return code
    if args.collect:
        return report(study)
    print_status(study, launcher)
    return 0


def print_status(study: Study, launcher: str) -> None:
    """The status counts, the setup steps left (whose `creates` path is missing), then the command of every run
    left (pending, incomplete or failed)."""
    statuses = [results.run_result(run).status for run in study.runs]
    counts: Counter[str] = Counter(statuses)
    print(
        f"# study {study.name}: {len(study.runs)} runs: "
        + ", ".join(f"{counts[s]} {s}" for s in STATUSES)
        + f"; {sum(counts[s] for s in LEFT_STATUSES)} left"
    )
    steps = setup_left(study)
    if steps:
        print(f"# setup left: run these first (--setup runs them; --run too), from {REPO}:")
        for step in steps:
            print(step.run)
    for run, status in zip(study.runs, statuses, strict=True):
        if status in LEFT_STATUSES:
            print(shlex.join(command(run, launcher)))


def report(study: Study) -> int:
    """Collect every run, summarise the arms, write the tables, draw the figures, print the arms'
    best settings, the orderings (also written to results/orderings.md) and the paths written."""
    run_results = results.collect(study)
    arms = results.summarize_arms(run_results, study.seeds)
    data = figure_data(study, arms)
    study.results_dir.mkdir(parents=True, exist_ok=True)
    study.figures_dir.mkdir(parents=True, exist_ok=True)
    written = write_tables(study, run_results, arms, data)
    written += [figures.draw(figure, study.figures_dir) for figure in data]
    counts: Counter[str] = Counter(r.status for r in run_results)
    print(f"\nstudy {study.name}: " + ", ".join(f"{counts[s]} {s}" for s in STATUSES))
    print("best setting per arm (lowest final val loss, mean over seeds):")
    for arm in arms:
        print("  " + describe_arm(arm))
    lines = orderings(study, arms)
    orderings_path = study.results_dir / "orderings.md"
    orderings_path.write_text(f"# Observed orderings: study {study.name}\n\n" + "".join(f"- {x}\n" for x in lines))
    written.append(orderings_path)
    print("orderings:")
    for line in lines:
        print(f"  {line}")
    print("written:")
    for path in written:
        print(f"  {path}")
    return 0


def describe_arm(arm: results.ArmSummary) -> str:
    """ "<arm>: optim.lr=0.01 -> 4.1234 (seed 0: 4.1200, seed 1: 4.1268) [best lr at the grid's high edge]"."""
    if arm.best is None:
        return f"{arm.arm}: no setting finished for every seed yet"
    tuned = " ".join(f"{k}={v}" for k, v in arm.best.tuned.items())
    seeds = ", ".join(f"seed {s}: {loss:.4f}" for s, loss in sorted(arm.best.losses.items()))
    text = f"{arm.arm}: {tuned} -> {arm.best.mean:.4f}" if arm.best.mean is not None else f"{arm.arm}: {tuned}"
    if len(arm.best.losses) > 1:
        text += f" ({seeds})"
    if arm.edge:
        text += f" [best lr at the grid's {arm.edge} edge: widen the lr grid]"
    if not arm.complete:
        text += " [incomplete]"
    return text


if __name__ == "__main__":
    sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
