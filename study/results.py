"""What a study's runs produced: each run's outcome, each arm's best setting, the tables behind figures.

Everything is read from the run directories, so it works for runs made here, by a launcher or by a
SLURM array, and after any interruption:

- status of a run (`RunStatus`):
  complete    metrics.jsonl has val/loss at step train.max_steps (the trainer's final evaluation);
  diverged    the trainer wrote trainer.run_outcome.DIVERGED_FILE (non-finite loss or gradient norm);
  failed      the study's runner wrote runner.FAILED_FILE (the process exited non-zero otherwise);
  incomplete  the run directory has metrics or checkpoints but not the final evaluation (interrupted,
              or running now);
  pending     nothing yet.
- final val loss = val/loss at max_steps; best = the lowest val/loss logged; tokens_seen and
  flops_seen from the config (global_batch x seq_len x steps; trainer.flop_budget.config_flops);
  tokens/s = the median of the logged throughput/tokens_per_s; peak memory = the largest
  memory/peak_bytes; optimizer state bytes = the last memory/optimizer_state_bytes.
- A metrics.jsonl that cannot be read (damaged inside, see trainer.metrics) or that is missing while
  the run directory has checkpoints is a StudyResultsError naming the run (arm, tuned values, seed,
  directory) and the fix.

Arms (`summarize_arms`): per tuned setting the final val loss of each seed (a diverged run counts as
+inf: worse than any finished one; failed / incomplete / pending runs are missing); the best setting
is the lowest mean over the seeds that have all finished; `edge` flags a best lr at the smallest
("low") or largest ("high") lr tried, when at least two were tried, so a reader knows to widen the
grid. Each seed's own best is kept too (`best_per_seed`), for the orderings: would a study with only
that seed have drawn the same conclusion?

Figure data (`figure_data`): the rows behind each figure, written as CSV and Markdown and drawn by
study.figures. Orderings (`orderings`): the comparisons a reader takes away, per seed and on the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from study.spec import FigureSpec, Study, StudyRun

RunStatus = Literal["complete", "diverged", "failed", "incomplete", "pending"]


class StudyResultsError(ValueError):
    """A run's results cannot be read; the message names the run and the fix."""


@dataclass(frozen=True)
class RunResult:
    run: StudyRun
    status: RunStatus
    step: int  # the last step logged (0 when none)
    max_steps: int
    final_val_loss: float | None  # val/loss at max_steps; None unless complete
    best_val_loss: float | None  # the lowest val/loss logged
    tokens_seen: int  # at `step`
    flops_seen: float  # at `step`
    tokens_per_s: float | None
    peak_memory_bytes: float | None
    optimizer_state_bytes: float | None
    message: str = ""  # diverged / failed: what happened, one line


@dataclass(frozen=True)
class SettingResult:
    """One tuned setting of an arm, over its seeds."""

    tuned: dict[str, Any]
    losses: dict[int, float]  # seed -> final val loss (inf: diverged); missing seeds are not finished
    mean: float | None  # over all seeds of the study (None unless every seed finished)


@dataclass(frozen=True)
class ArmSummary:
    entry: str
    arm: str
    runs: list[RunResult]
    settings: list[SettingResult]  # the whole curve over the tuned grid, in grid order
    best: SettingResult | None  # lowest mean; None if no setting has all seeds finished
    best_per_seed: dict[int, SettingResult]  # each seed's own best setting
    edge: Literal["", "low", "high"]  # the best lr at the grid's low / high end
    complete: bool  # every run of the arm is complete or diverged


@dataclass
class FigureData:
    """The table behind one figure: `columns` names the keys of every row."""

    spec: FigureSpec
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


def run_result(run: StudyRun) -> RunResult:
    """Read one run's outcome from its run directory (see the module docstring)."""
    raise NotImplementedError


def collect(study: Study) -> list[RunResult]:
    """Every run's result, in the study's order."""
    return [run_result(run) for run in study.runs]


def summarize_arms(results: list[RunResult], seeds: list[int]) -> list[ArmSummary]:
    """One summary per arm, in first-appearance order (`seeds`: the study's; [] = one replicate each)."""
    raise NotImplementedError


def figure_data(study: Study, arms: list[ArmSummary]) -> list[FigureData]:
    """The rows behind every figure of the study."""
    raise NotImplementedError


def orderings(study: Study, arms: list[ArmSummary]) -> list[str]:
    """The observed orderings, one line each (what beats what, where, and whether every seed agrees)."""
    raise NotImplementedError


def write_tables(
    study: Study, results: list[RunResult], arms: list[ArmSummary], figures: list[FigureData]
) -> list[Path]:
    """runs.csv/.md and arms.csv/.md in study.results_dir, each figure's table as .csv/.md in
    study.figures_dir; returns the paths written."""
    raise NotImplementedError
