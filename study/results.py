"""What a study's runs produced: each run's outcome and each arm's best setting.

Everything is read from the run directories, so it works for runs made here, by a launcher or by a
SLURM array, and after any interruption. Relative run directories are taken from the repo root
(data.paths.resolve_path), where the runner starts train.py, whatever the working directory.

- status of a run (`RunStatus`), the first that applies:
  complete    metrics.jsonl has a finite val/loss at step train.max_steps (the trainer's final
              evaluation; it wins over a stale marker: the run's result is there);
  diverged    the trainer wrote trainer.run_outcome.DIVERGED_FILE (non-finite loss or gradient norm),
              or the final val/loss is not finite;
  failed      the study's runner wrote runner.FAILED_FILE (the process exited non-zero otherwise);
  incomplete  the run directory has metrics records or checkpoints but not the final evaluation
              (interrupted, or running now);
  pending     nothing yet.
- final val loss = val/loss at max_steps (complete runs only); best = the lowest finite val/loss
  logged (any status); tokens_seen and flops_seen at the last logged step, from the config
  (global_batch x seq_len x step; trainer.flop_budget.config_flops(cfg).cumulative(step));
  tokens/s = the median of the logged throughput/tokens_per_s; peak memory = the largest
  memory/peak_bytes; optimizer state bytes = the last memory/optimizer_state_bytes; the max_steps
  is the study's (the run's resolved config), not whatever a later resume changed it to.
- A metrics.jsonl that cannot be read (damaged inside, see trainer.metrics) or that is missing while
  the run directory has checkpoints is a StudyResultsError naming the run (arm, tuned values, seed,
  directory) and the fix.
- So is a run directory whose config.yaml (the config the run last started with) differs from the study's run
  in a key that changes what the run computes: everything but `HOW_IT_RAN` (where the data and outputs live,
  micro-batching, device, engine, compile, intervals). A directory is named by the study's tuned values and
  seed only, so after an edit of a fixed override (weight decay, warmup, max_steps, ...) its old results
  would otherwise count as the new setting's.

Arms (`summarize_arms`): per tuned setting the final val loss of each seed (a diverged run counts as
+inf: worse than any finished one; failed / incomplete / pending runs are missing); the best setting
is the lowest mean over the seeds that have all finished (the study's seeds; without `seeds`, the
seeds of that setting's runs). A setting whose mean is +inf (a seed diverged) is never best, so an
arm whose every setting diverged has no best. `edge` flags a best lr at the smallest ("low") or
largest ("high") `optim.lr` among the arm's runs whatever their status (an lr above the best that
diverged still shows the grid reached far enough), when at least two were tried, so a reader knows
to widen the grid. Each seed's own best is kept too (`best_per_seed`: the lowest finite loss of that
seed alone), for the orderings: would a study with only that seed have drawn the same conclusion?

The rest of a study's report builds on these: study.figure_data (the rows behind each figure),
study.orderings (what beats what), study.report (the CSV and Markdown tables).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from data.paths import resolve_path
from study.failed_marker import read_failed
from study.spec import Study, StudyRun
from study.tables import (
    fmt_loss,
    fmt_value,
)
from trainer.checkpoint import list_checkpoints
from trainer.flop_budget import config_flops
from trainer.metrics import MetricsFileError, read_metrics
from trainer.resume_policy import config_changes, listed
from trainer.run_outcome import read_diverged

RunStatus = Literal["complete", "diverged", "failed", "incomplete", "pending"]

# "section.key" or "section.*": settings in which a run directory may differ from its study run and still hold
# that run's result: where things live and how the steps were executed, the same computation to rounding.
HOW_IT_RAN = (
    "run.dir",
    "data.prepared_dir",  # the data's identity is the manifest's, checked when a checkpoint loads
    "data.tokenizer",
    "data.num_workers",
    "data.verify",
    "eval.interval",
    "eval.batch_size",
    "log.*",
    "checkpoint.*",
    "train.micro_batch",
    "train.device",
    "train.compile",
    "train.loss_chunk_tokens",
    "train.engine",
    "train.zero_stage",
    "train.deepspeed_config",
    "optim.compile",
)

EDGE_NOTE = "best lr at the grid's edge"
INCOMPLETE_NOTE = "incomplete"
NO_BEST_NOTE = "no finished setting"


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


# ----- one run ---------------------------------------------------------------------------------------


def tuned_text(tuned: dict[str, Any]) -> str:
    """The tuned values as text: "optim.lr=1e-3, optim.delta=0.5" ("" when nothing is tuned)."""
    return ", ".join(f"{key}={fmt_value(value)}" for key, value in tuned.items())


def describe_run(run: StudyRun) -> str:
    """The run for messages: its arm, tuned values, seed and run directory."""
    tuned = f" {tuned_text(run.tuned)}" if run.tuned else ""
    return f"run '{run.arm}'{tuned} seed {run.seed} ({run.run_dir})"


def read_run_metrics(run: StudyRun) -> list[dict]:
    """The run's metrics.jsonl records ([] when there is none and no checkpoint either); a
    StudyResultsError naming the run and the fix when the file is damaged, unreadable or missing
    from a run directory that has checkpoints."""
    run_dir = resolve_path(run.run_dir)
    path = run_dir / "metrics.jsonl"
    try:
        records = read_metrics(path)
    except MetricsFileError as e:
        raise StudyResultsError(
            f"{describe_run(run)}: its metrics.jsonl is damaged: {e} Or delete {run_dir} to train the run again "
            "from scratch (the study reruns it)."
        ) from None
    except OSError as e:
        raise StudyResultsError(
            f"{describe_run(run)}: cannot read {path}: {e.strerror or e}. Make it readable, or delete {run_dir} to "
            "train the run again from scratch (the study reruns it)."
        ) from None
    if not path.exists():
        checkpoints = list_checkpoints(run_dir / "checkpoints")
        if checkpoints:
            # A resume would go on from the checkpoint and log only the later steps: the curve and the
            # metrics of the earlier steps would be silently missing from the study's results.
            raise StudyResultsError(
                f"{describe_run(run)}: {path} is missing, but the run has {len(checkpoints)} checkpoint(s) "
                f"(latest {checkpoints[-1].name}), so its logged losses are lost. Restore metrics.jsonl from a "
                f"backup, or delete {run_dir} to train the run again from scratch (the study reruns it)."
            )
    return records


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return float(values[-1]) if values else None


def _marker_message(data: dict[str, Any], what: str) -> str:
    message = str(data.get("message") or what).strip()
    return message.splitlines()[0] if message else what


def check_run_config(run: StudyRun, run_dir: Path) -> None:
    """StudyResultsError when `run_dir`'s config.yaml differs from `run`'s config outside HOW_IT_RAN (see the
    module docstring); nothing when the run has not started (no config.yaml)."""
    path = run_dir / "config.yaml"
    if not path.exists():
        return
    try:
        saved = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise StudyResultsError(
            f"{describe_run(run)}: cannot read {path}: {e}. Delete {run_dir} to train the run again from scratch "
            "(the study reruns it)."
        ) from None
    # Every config value is a YAML scalar, so the saved file and to_dict() compare as they are.
    changes = config_changes(saved if isinstance(saved, dict) else {}, run.config.to_dict())
    differ = {key: change for key, change in changes.items() if not listed(key, HOW_IT_RAN)}
    if differ:
        lines = "; ".join(f"{key}: {old!r} in the run, {new!r} in the study" for key, (old, new) in differ.items())
        raise StudyResultsError(
            f"{describe_run(run)}: {run_dir} was trained with other settings than the study's ({lines}), so its "
            f"losses are not this run's. Delete {run_dir} to train it again with the study's settings (the study "
            f"reruns it), or set the study back to the run's values ({path})."
        )


def run_result(run: StudyRun) -> RunResult:
    """Read one run's outcome from its run directory (see the module docstring)."""
    run_dir = resolve_path(run.run_dir)
    check_run_config(run, run_dir)
    records = read_run_metrics(run)
    cfg = run.config
    max_steps = cfg.train.max_steps
    step = max((r["step"] for r in records), default=0)
    val = [(r["step"], float(r["val/loss"])) for r in records if r.get("val/loss") is not None]
    finite = [loss for _, loss in val if math.isfinite(loss)]
    final = next((loss for s, loss in reversed(val) if s == max_steps), None)
    throughput = [float(r["throughput/tokens_per_s"]) for r in records if r.get("throughput/tokens_per_s") is not None]
    peaks = [float(r["memory/peak_bytes"]) for r in records if r.get("memory/peak_bytes") is not None]

    status: RunStatus
    message = ""
    diverged = read_diverged(run_dir)
    failed = read_failed(run_dir)
    if final is not None and math.isfinite(final):
        status = "complete"
    elif final is not None:
        status, message = "diverged", f"the final validation loss is {final}"
    elif diverged is not None:
        status, message = "diverged", _marker_message(diverged, "diverged")
    elif failed is not None:
        code = failed.get("exit_code")
        detail = _marker_message(failed, "failed")
        status, message = "failed", (f"exit code {code}: {detail}" if code is not None else detail)
    elif records or list_checkpoints(run_dir / "checkpoints"):
        status = "incomplete"
    else:
        status = "pending"
    return RunResult(
        run=run,
        status=status,
        step=step,
        max_steps=max_steps,
        final_val_loss=final if status == "complete" else None,
        best_val_loss=min(finite) if finite else None,
        tokens_seen=step * cfg.train.global_batch * cfg.data.seq_len,
        flops_seen=float(config_flops(cfg).cumulative(step)),
        tokens_per_s=statistics.median(throughput) if throughput else None,
        peak_memory_bytes=max(peaks) if peaks else None,
        optimizer_state_bytes=_last(records, "memory/optimizer_state_bytes"),
        message=message,
    )


def collect(study: Study) -> list[RunResult]:
    """Every run's result, in the study's order."""
    return [run_result(run) for run in study.runs]


# ----- arms --------------------------------------------------------------------------------------------


def _setting_key(tuned: dict[str, Any]) -> str:
    return repr(sorted(tuned.items()))  # repr: tuned values may be unhashable (lists)


def _final_loss(result: RunResult) -> float | None:
    """What a run contributes to its setting: its final loss, +inf when diverged, None when not finished."""
    if result.status == "complete":
        return result.final_val_loss
    if result.status == "diverged":
        return math.inf
    return None


def _lowest(settings: list[SettingResult], values: list[float | None]) -> SettingResult | None:
    """The setting with the lowest finite value (the first in grid order on a tie); None if none is finite."""
    best: SettingResult | None = None
    best_value = math.inf
    for setting, value in zip(settings, values, strict=True):
        if value is not None and value < best_value:
            best, best_value = setting, value
    return best


def _summarize_arm(arm_results: list[RunResult], seeds: list[int]) -> ArmSummary:
    groups: dict[str, list[RunResult]] = {}
    for result in arm_results:  # first appearance = the grid's order (the study lists runs in grid order)
        groups.setdefault(_setting_key(result.run.tuned), []).append(result)
    settings = []
    for group in groups.values():
        expected = seeds or sorted({r.run.seed for r in group})
        losses = {r.run.seed: loss for r in group if (loss := _final_loss(r)) is not None}
        mean = statistics.fmean(losses[s] for s in expected) if all(s in losses for s in expected) else None
        settings.append(SettingResult(tuned=dict(group[0].run.tuned), losses=losses, mean=mean))
    best = _lowest(settings, [s.mean for s in settings])
    all_seeds = seeds or sorted({r.run.seed for r in arm_results})
    best_per_seed = {}
    for seed in all_seeds:
        own = _lowest(settings, [s.losses.get(seed) for s in settings])
        if own is not None:
            best_per_seed[seed] = own
    edge: Literal["", "low", "high"] = ""
    lrs = sorted({r.run.config.optim.lr for r in arm_results})
    if best is not None and len(lrs) >= 2:
        best_lr = next(r.run.config.optim.lr for r in arm_results if r.run.tuned == best.tuned)
        edge = "low" if best_lr == lrs[0] else "high" if best_lr == lrs[-1] else ""
    first = arm_results[0].run
    return ArmSummary(
        entry=first.entry,
        arm=first.arm,
        runs=arm_results,
        settings=settings,
        best=best,
        best_per_seed=best_per_seed,
        edge=edge,
        complete=all(r.status in ("complete", "diverged") for r in arm_results),
    )


def summarize_arms(results: list[RunResult], seeds: list[int]) -> list[ArmSummary]:
    """One summary per arm, in first-appearance order (`seeds`: the study's; [] = one replicate each)."""
    by_arm: dict[str, list[RunResult]] = {}
    for result in results:
        by_arm.setdefault(result.run.arm, []).append(result)
    return [_summarize_arm(arm_results, list(seeds)) for arm_results in by_arm.values()]


def arm_notes(arm: ArmSummary) -> list[str]:
    """What a conclusion resting on this arm should carry: its best lr at the grid's edge, missing runs."""
    notes = []
    if arm.best is None:
        notes.append(NO_BEST_NOTE)
    if arm.edge:
        notes.append(f"{EDGE_NOTE}: {arm.edge}")
    if not arm.complete:
        notes.append(INCOMPLETE_NOTE)
    return notes


def lr_curve(arm: ArmSummary) -> str:
    """The arm's loss over its tuned grid, in grid order: "1e-3: 4.1230 | 3.16e-3: 4.0110* | 1e-2: diverged".
    A setting is named by its value when one key is tuned, by key=value pairs otherwise; its loss is the
    mean over seeds, "partial (seed 0: 4.1230)" when some seeds have not finished, "missing" when none
    has; * marks the best."""
    parts = []
    for setting in arm.settings:
        if len(setting.tuned) == 1:
            name = fmt_value(next(iter(setting.tuned.values())))
        else:
            name = tuned_text(setting.tuned) or "(untuned)"
        if setting.mean is not None:
            loss = fmt_loss(setting.mean)
        elif setting.losses:
            loss = "partial (" + ", ".join(f"seed {s}: {fmt_loss(v)}" for s, v in sorted(setting.losses.items())) + ")"
        else:
            loss = "missing"
        parts.append(f"{name}: {loss}{'*' if setting is arm.best else ''}")
    return " | ".join(parts)
