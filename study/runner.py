"""Run a study: what is left, here (one after another or N at a time), as printed or launched commands,
or as a SLURM array script.

A run is left when its results.run_result status is pending, incomplete or failed (a failed run is
tried again; a diverged one is a result and is not). Local runs start `train.py` (through
`launcher`) from the repo root with their stdout and stderr appended to <run_dir>/train.log; an
interrupted run resumes from its latest checkpoint (the trainer's resume). A run that exits
non-zero without the trainer's divergence marker gets FAILED_FILE (exit code and last error line)
in its run directory, removed when it starts again. Progress: one line per start and end (which
run, how many left, the ETA from the measured seconds per step of the runs finished so far).

How the ambiguous points are read:
- Run directories and `creates` paths are relative to the repo root (every child starts there); a `creates`
  path under `.cache/` follows MEMOPT_CACHE, as the data tools' paths do (data.paths.resolve_path).
- ETA = the steps still to do x (wall seconds of the runs finished in this session / the steps they
  did) / jobs. Wall seconds include each process's start-up and evaluations, which are real costs
  of the remaining runs too. A running run's steps still to do are estimated from its elapsed time
  at that rate (it is not polled). No finished run yet: no ETA ("--:--").
- A stop (SIGINT / SIGTERM to the study) forwards SIGTERM to the running children (the trainer
  finishes its step, saves and exits 0), starts nothing new and waits for them. A child that exits
  non-zero while the study is stopping is interrupted, not failed: it is not marked.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import TextIO

from data.paths import resolve_path

# Defined in study/failed_marker.py (study.results reads it, and this module reads results): no import cycle.
from study.failed_marker import FAILED_FILE as FAILED_FILE
from study.results import StudyResultsError, run_result
from study.spec import SetupStep, Study, StudyRun
from trainer.run_outcome import read_diverged, write_marker

REPO = Path(__file__).resolve().parent.parent
LEFT_STATUSES = ("pending", "incomplete", "failed")
LOG_FILE = "train.log"
POLL_SECONDS = 0.2


class StudyRunError(RuntimeError):
    """A study cannot be run as asked (a setup command failed, a bad SLURM option); the message says
    what and the fix."""


# ----- what is left, and how each run starts ---------------------------------------------------------


def runs_left(study: Study) -> list[StudyRun]:
    """The runs whose status is pending, incomplete or failed, in the study's order.
    A damaged metrics.jsonl is results.StudyResultsError (naming the run), raised here."""
    return [run for run in study.runs if run_result(run).status in LEFT_STATUSES]


def command(run: StudyRun, launcher: str) -> list[str]:
    """`launcher` (split like a shell would) + train.py, the run's config (relative to the repo root
    when it lies inside it, so the command works from any checkout) and its overrides."""
    config = run.config_path
    config_arg = config.relative_to(REPO) if config.is_absolute() and config.is_relative_to(REPO) else config
    return [*shlex.split(launcher), "train.py", str(config_arg), *run.overrides]


def setup_left(study: Study) -> list[SetupStep]:
    """The setup steps whose `creates` path does not exist yet (a step without one cannot be checked: left out)."""
    return [step for step in study.setup if step.creates is not None and not resolve_path(step.creates).exists()]


def run_setup(study: Study, out: TextIO | None = None) -> None:
    """Run each setup step once, in order, from the repo root (a shell command; `python` in it is
    this interpreter); a step whose `creates` path exists is skipped. A failing command, or one that
    succeeds without creating its `creates` path, is a StudyRunError naming the step."""
    out = sys.stdout if out is None else out  # resolved per call: a test or caller may have replaced sys.stdout
    for step in study.setup:
        if step.creates is not None and resolve_path(step.creates).exists():
            print(f"setup: {step.creates} exists, skipping: {step.run}", file=out, flush=True)
            continue
        print(f"setup: {step.run}", file=out, flush=True)
        # `python` in a step means this interpreter (the project's venv), whatever is first on PATH.
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        code = subprocess.call(step.run, shell=True, cwd=REPO, env={**os.environ, "PATH": path})
        if code != 0:
            raise StudyRunError(
                f"setup command of {study.path} exited with {code}: {step.run!r}; fix the command (run it from "
                f"{REPO} to see its error) and re-run the study"
            )
        if step.creates is not None and not resolve_path(step.creates).exists():
            raise StudyRunError(
                f"setup command of {study.path} succeeded but did not create {step.creates}: {step.run!r}; fix its "
                "`creates:` path (relative to the repo root; .cache/ follows MEMOPT_CACHE) or the command"
            )


# ----- the failed marker --------------------------------------------------------------------------------


def mark_failed(run_dir: Path, exit_code: int, log: Path) -> None:
    """Write FAILED_FILE: {"exit_code", "message"}; the message is the last `error:` line of the log
    (train.py prints every known error that way), else its last non-empty line."""
    lines = [line.strip() for line in _tail(log).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    message = errors[-1] if errors else (lines[-1] if lines else f"exited with {exit_code}, nothing logged")
    write_marker(run_dir / FAILED_FILE, {"exit_code": exit_code, "message": message})


def clear_failed(run_dir: Path) -> None:
    (run_dir / FAILED_FILE).unlink(missing_ok=True)


def _tail(path: Path, size: int = 16384) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# ----- progress -----------------------------------------------------------------------------------------


def eta_seconds(finished_seconds: float, finished_steps: int, remaining_steps: float, jobs: int) -> float | None:
    """remaining_steps x (finished_seconds / finished_steps) / jobs; None before any step was measured."""
    if finished_steps <= 0:
        return None
    return max(0.0, remaining_steps) * finished_seconds / finished_steps / max(1, jobs)


def format_duration(seconds: float | None) -> str:
    """mm:ss, h:mm:ss from an hour on; "--:--" when unknown."""
    if seconds is None:
        return "--:--"
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def describe(run: StudyRun) -> str:
    """ "<arm> <tuned> seed S", e.g. "GaLore rank=8 optim.lr=0.01 seed 0"."""
    tuned = " ".join(f"{k}={v}" for k, v in run.tuned.items())
    return f"{run.arm}{' ' + tuned if tuned else ''} seed {run.seed}"


# ----- local runs ---------------------------------------------------------------------------------------


@dataclass
class _Running:
    index: int  # 1-based start order in this session
    run: StudyRun
    proc: subprocess.Popen[bytes]
    log: TextIO
    started: float
    start_step: int


@dataclass
class LocalRunSummary:
    """What run_local did: the runs per outcome, and the signal that stopped the study (None if none)."""

    outcomes: dict[str, list[StudyRun]] = field(default_factory=dict)  # done / diverged / failed / stopped
    stopped_by: int | None = None

    @property
    def exit_code(self) -> int:
        """128 + the signal's number when stopped (130 for Ctrl-C, 143 for SIGTERM), else 0."""
        return 128 + self.stopped_by if self.stopped_by is not None else 0


def child_env(jobs: int) -> dict[str, str]:
    """The environment of each child: OMP_NUM_THREADS = max(1, cores // jobs) unless already set,
    so N concurrent runs do not oversubscribe the cores (cores: the ones this process may use)."""
    env = dict(os.environ)
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // max(1, jobs)))
    return env


def run_local(
    study: Study, runs: Sequence[StudyRun], launcher: str, jobs: int = 1, out: TextIO | None = None
) -> LocalRunSummary:
    """Run `runs` here, `jobs` at a time (subprocess.Popen, polled), and print one progress line at
    each start and end. A diverged or failed run does not stop the others. SIGINT / SIGTERM stops the
    study as the module docstring says; the caller prints how to resume and exits with
    summary.exit_code."""
    out = sys.stdout if out is None else out  # resolved per call: a test or caller may have replaced sys.stdout
    if jobs < 1:
        raise StudyRunError(f"--jobs must be at least 1, got {jobs}")
    total = len(runs)
    summary = LocalRunSummary()
    if total == 0:
        return summary
    env = child_env(jobs)
    queue = list(runs)
    done_at_start = {id(run): _steps_done(run) for run in runs}  # read once: the ETA and each start use it
    todo = {id(run): max(0, run.config.train.max_steps - done_at_start[id(run)]) for run in runs}
    running: list[_Running] = []
    measured_seconds, measured_steps = 0.0, 0
    started = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        first = summary.stopped_by is None
        summary.stopped_by = summary.stopped_by or signum
        if first:
            print(
                f"study: got {signal.Signals(signum).name}; asking {len(running)} running run(s) to save and stop "
                "(SIGTERM), starting no new ones",
                file=out,
                flush=True,
            )
        for r in running:
            if r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while running or (queue and summary.stopped_by is None):
            while queue and len(running) < jobs and summary.stopped_by is None:
                run = queue.pop(0)
                started += 1
                running.append(_start(started, total, run, done_at_start[id(run)], launcher, env, out))
            time.sleep(POLL_SECONDS)
            for r in [r for r in running if r.proc.poll() is not None]:
                running.remove(r)
                r.log.close()
                seconds = time.monotonic() - r.started
                outcome, step = _finish(r, summary.stopped_by is not None)
                summary.outcomes.setdefault(outcome, []).append(r.run)
                if outcome in ("done", "diverged", "failed") and step > r.start_step:
                    measured_seconds += seconds
                    measured_steps += step - r.start_step
                left = len(queue) + len(running)
                remaining = sum(todo[id(q)] for q in queue) + sum(
                    max(0.0, todo[id(x.run)] - _steps_done_estimate(x, measured_seconds, measured_steps))
                    for x in running
                )
                eta = eta_seconds(measured_seconds, measured_steps, remaining, jobs)
                print(
                    f"[{r.index}/{total}] {outcome} {describe(r.run)} in {seconds:.1f} s | left {left} | "
                    f"ETA {format_duration(eta)}",
                    file=out,
                    flush=True,
                )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return summary


def _steps_done(run: StudyRun) -> int:
    """The last step the run logged (0 for a new run, or one whose metrics cannot be read)."""
    try:
        return run_result(run).step
    except StudyResultsError:
        return 0


def _steps_done_estimate(r: _Running, measured_seconds: float, measured_steps: int) -> float:
    if measured_steps <= 0:
        return 0.0
    return (time.monotonic() - r.started) * measured_steps / measured_seconds


def _start(
    index: int, total: int, run: StudyRun, start_step: int, launcher: str, env: dict[str, str], out: TextIO
) -> _Running:
    run_dir = REPO / run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_failed(run_dir)  # started again: whatever made it fail may be fixed
    cmd = command(run, launcher)
    log = (run_dir / LOG_FILE).open("a")
    log.write(f"# {datetime.now().isoformat(timespec='seconds')} study {run.entry!r}: {shlex.join(cmd)}\n")
    log.flush()
    print(f"[{index}/{total}] start {describe(run)} -> {run.run_dir}", file=out, flush=True)
    # Same process group as the study: a Ctrl-C in the terminal or a kill of the group reaches the run too.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    return _Running(index, run, proc, log, time.monotonic(), start_step)


def _finish(r: _Running, stopping: bool) -> tuple[str, int]:
    """The outcome of an ended child (done / diverged / failed / stopped) and the step it reached."""
    run_dir = REPO / r.run.run_dir
    code = r.proc.returncode
    if code != 0 and not stopping and read_diverged(run_dir) is None:
        mark_failed(run_dir, code, run_dir / LOG_FILE)
    try:
        result = run_result(r.run)
    except StudyResultsError:
        return "failed", r.start_step
    outcome = {"complete": "done", "diverged": "diverged", "failed": "failed"}.get(result.status, "stopped")
    return outcome, result.step


# ----- SLURM --------------------------------------------------------------------------------------------


def write_slurm(
    study: Study,
    runs: Sequence[StudyRun],
    launcher: str,
    path: Path,
    options: Sequence[str] = (),
    max_parallel: int | None = None,
    out: TextIO | None = None,
) -> Path:
    """Write an sbatch array script running `runs` (task i = runs[i]), at most `max_parallel` at a
    time (default: all), with an `#SBATCH <option>` line per option (e.g. "--gres=gpu:8"). Each task
    cds to the repo root and execs its command with stdout and stderr appended to its train.log, like
    a local run; SLURM's own output goes to <out>/slurm/. The script is executable; re-writing it
    later (from runs_left) covers only what is still left. Prints how to submit it."""
    out = sys.stdout if out is None else out  # resolved per call: a test or caller may have replaced sys.stdout
    if not runs:
        raise StudyRunError(f"nothing is left to run in {study.path}: no SLURM script written")
    for option in options:
        if not option.startswith("-"):
            raise StudyRunError(
                f"--slurm-option {option!r} is not an sbatch option; give it as sbatch takes it, e.g. "
                '--slurm-option "--gres=gpu:8" or --slurm-option "--time=24:00:00"'
            )
    n = len(runs)
    throttle = min(max_parallel, n) if max_parallel else n
    slurm_dir = (REPO / study.out / "slurm").resolve()
    slurm_dir.mkdir(parents=True, exist_ok=True)  # sbatch does not create the directory of --output
    commands = [shlex.join(command(run, launcher)) for run in runs]
    logs = [str(Path(run.run_dir) / LOG_FILE) for run in runs]
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={shlex.quote('study-' + study.name)}",
        f"#SBATCH --array=0-{n - 1}%{throttle}",
        f"#SBATCH --output={slurm_dir}/%A_%a.out",
        *(f"#SBATCH {option}" for option in options),
        f"# Written by tools/study.py at {datetime.now().isoformat(timespec='seconds')} for {study.path}:",
        f"# the {n} runs left then. Write it again later (same command) to cover only what is still left.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(REPO))}",
        "COMMANDS=(",
        *(f"  {shlex.quote(c)}" for c in commands),
        ")",
        "LOGS=(",
        *(f"  {shlex.quote(log)}" for log in logs),
        ")",
        'LOG="${LOGS[$SLURM_ARRAY_TASK_ID]}"',
        'mkdir -p "$(dirname "$LOG")"',
        # The commands are shlex-joined (POSIX-quoted) strings: eval restores their words exactly.
        'eval "exec ${COMMANDS[$SLURM_ARRAY_TASK_ID]}" >> "$LOG" 2>&1',
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    print(f"wrote {path}: an array of {n} runs, at most {throttle} at a time; submit with: sbatch {path}", file=out)
    return path
