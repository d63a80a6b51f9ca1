"""What a study's runs produced: each run's outcome, each arm's best setting, the tables behind figures.

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

Arms (`summarize_arms`): per tuned setting the final val loss of each seed (a diverged run counts as
+inf: worse than any finished one; failed / incomplete / pending runs are missing); the best setting
is the lowest mean over the seeds that have all finished (the study's seeds; without `seeds`, the
seeds of that setting's runs). A setting whose mean is +inf (a seed diverged) is never best, so an
arm whose every setting diverged has no best. `edge` flags a best lr at the smallest ("low") or
largest ("high") `optim.lr` among the arm's runs whatever their status (an lr above the best that
diverged still shows the grid reached far enough), when at least two were tried, so a reader knows
to widen the grid. Each seed's own best is kept too (`best_per_seed`: the lowest finite loss of that
seed alone), for the orderings: would a study with only that seed have drawn the same conclusion?

Figure data (`figure_data`): the rows behind each figure (the contract with study.figures is in
`figure_data`'s docstring). A figure selects arms by entry label (`series` for line / curves /
pareto, `rows` for table; empty = every entry) and by `where`, read from the config of the arm's
first run (the values a figure filters or plots on are the same for every run of an arm).

Orderings (`orderings`): the comparisons a reader takes away, on the means and per seed, with the
arms they rest on marked when their best lr is at the grid's edge or some of their runs are missing.
`write_tables` writes runs / arms / figure tables as CSV (exact values) and Markdown (formatted,
study.tables).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data.paths import resolve_path
from study.failed_marker import read_failed
from study.spec import FigureSpec, Study, StudyRun, config_value
from study.tables import (
    fmt_flops,
    fmt_int,
    fmt_loss,
    fmt_mib,
    fmt_plain,
    fmt_value,
    write_csv,
    write_markdown,
)
from trainer.checkpoint import list_checkpoints
from trainer.flop_budget import config_flops
from trainer.metrics import MetricsFileError, read_metrics
from trainer.run_outcome import read_diverged

RunStatus = Literal["complete", "diverged", "failed", "incomplete", "pending"]

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


@dataclass
class FigureData:
    """The table behind one figure: `columns` names the keys of every row."""

    spec: FigureSpec
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)


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


def run_result(run: StudyRun) -> RunResult:
    """Read one run's outcome from its run directory (see the module docstring)."""
    run_dir = resolve_path(run.run_dir)
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


# ----- figure data -------------------------------------------------------------------------------------


def _arm_config_value(arm: ArmSummary, key: str, figure: FigureSpec) -> Any:
    try:
        return config_value(arm.runs[0].run.config, key)
    except (KeyError, ValueError):
        raise StudyResultsError(
            f"figure '{figure.name}': '{key}' is not a config key (arm '{arm.arm}'); use a dotted key such as "
            "optim.rank or train.global_batch"
        ) from None


def _selected(figure: FigureSpec, arms: list[ArmSummary], entries: list[str]) -> list[ArmSummary]:
    """The arms of `entries` (all when empty) whose config matches the figure's `where`."""
    return [
        arm
        for arm in arms
        if (not entries or arm.entry in entries)
        and all(_arm_config_value(arm, key, figure) in values for key, values in figure.where.items())
    ]


def _sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then everything else as text (config values of one key may mix)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _mean(arm: ArmSummary) -> float | None:
    return arm.best.mean if arm.best is not None else None


def _best_of(arms: list[ArmSummary]) -> ArmSummary | None:
    """The arm with the lowest best mean (the first on a tie); None when none has a finished best."""
    scored = [(m, i) for i, arm in enumerate(arms) if (m := _mean(arm)) is not None]
    return arms[min(scored)[1]] if scored else None


def _series_points(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> dict[str, dict[Any, list[ArmSummary]]]:
    """Line figures: series label -> x value -> the series' arms at that x (x in sorted order)."""
    if figure.x is None:
        raise StudyResultsError(f"figure '{figure.name}': a line figure needs `x` (a dotted config key)")
    x_key = figure.x
    points: dict[str, dict[Any, list[ArmSummary]]] = {}
    for label in figure.series or study.entries:
        by_x: dict[Any, list[ArmSummary]] = {}
        for arm in _selected(figure, arms, [label]):
            by_x.setdefault(_arm_config_value(arm, x_key, figure), []).append(arm)
        points[label] = {x: by_x[x] for x in sorted(by_x, key=_sort_key)}
    return points


def _reference_arms(figure: FigureSpec, arms: list[ArmSummary]) -> dict[str, list[ArmSummary]]:
    return {label: _selected(figure, arms, entries) for label, entries in figure.references.items()}


def _line_row(series: str, role: str, x: Any, arm: ArmSummary | None) -> dict[str, Any]:
    best = arm.best if arm is not None else None
    losses = list(best.losses.values()) if best is not None else []
    return {
        "series": series,
        "role": role,
        "x": x,
        "loss_mean": best.mean if best is not None else None,
        "loss_min": min(losses) if losses else None,
        "loss_max": max(losses) if losses else None,
        "seeds": len(losses),
        "arm": arm.arm if arm is not None else "",
        "best": tuned_text(best.tuned) if best is not None else "",
    }


LINE_COLUMNS = ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "best"]
CURVES_COLUMNS = ["arm", "seed", "step", "tokens", "flops", "val_loss"]
PARETO_COLUMNS = [
    "arm",
    "entry",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "loss_mean",
    "frontier_state",
    "frontier_peak",
]


def _line_data(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> FigureData:
    rows = []
    for series, by_x in _series_points(figure, study, arms).items():
        for x, at_x in by_x.items():
            # Several arms of one series at one x (e.g. configs the figure does not filter): the best one.
            rows.append(_line_row(series, "line", x, _best_of(at_x) or at_x[0]))
    for label, ref_arms in _reference_arms(figure, arms).items():
        rows.append(_line_row(label, "reference", None, _best_of(ref_arms)))
    return FigureData(figure, list(LINE_COLUMNS), rows)


def table_column(key: str, value: Any) -> str:
    """A table figure's column name for one value of its `columns` key: "optim.beta2=0.95"."""
    return f"{key}={fmt_value(value)}"


def _table_data(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> FigureData:
    if figure.columns is None:
        raise StudyResultsError(f"figure '{figure.name}': a table figure needs `columns` (a dotted config key)")
    key = figure.columns
    entries = figure.rows or study.entries
    selected = _selected(figure, arms, entries)
    values = sorted({_arm_config_value(arm, key, figure) for arm in selected}, key=_sort_key)
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"entry": entry}
        for value in values:
            best = _best_of([a for a in selected if a.entry == entry and _arm_config_value(a, key, figure) == value])
            row[table_column(key, value)] = _mean(best) if best is not None else None
        rows.append(row)
    return FigureData(figure, ["entry"] + [table_column(key, v) for v in values], rows)


def _best_runs(arm: ArmSummary) -> list[RunResult]:
    """The runs of the arm's best setting, one per seed that finished it, in seed order."""
    if arm.best is None:
        return []
    best = arm.best
    runs = [r for r in arm.runs if r.run.tuned == best.tuned and r.run.seed in best.losses]
    return sorted(runs, key=lambda r: r.run.seed)


def _curves_data(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> FigureData:
    rows = []
    for arm in _selected(figure, arms, figure.series):
        for result in _best_runs(arm):
            cfg = result.run.config
            flops = config_flops(cfg)
            tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
            for record in read_run_metrics(result.run):
                if record.get("val/loss") is None:
                    continue
                step = record["step"]
                rows.append(
                    {
                        "arm": arm.arm,
                        "seed": result.run.seed,
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "flops": flops.cumulative(step),
                        "val_loss": float(record["val/loss"]),
                    }
                )
    return FigureData(figure, list(CURVES_COLUMNS), rows)


def _max_or_none(values: Iterable[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _frontier(points: list[tuple[float | None, float]]) -> list[bool]:
    """Per (bytes, loss): True when no other point has bytes <= its bytes and a lower loss. A point with
    unknown bytes cannot be placed: never on the frontier, and it hides no other point."""
    flags = []
    for i, (b, loss) in enumerate(points):
        flags.append(
            b is not None
            and not any(j != i and ob is not None and ob <= b and ol < loss for j, (ob, ol) in enumerate(points))
        )
    return flags


def _pareto_data(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> FigureData:
    rows: list[dict[str, Any]] = []
    for arm in _selected(figure, arms, figure.series):
        mean = _mean(arm)
        if mean is None:
            continue
        runs = _best_runs(arm)
        rows.append(
            {
                "arm": arm.arm,
                "entry": arm.entry,
                "optimizer_state_bytes": _max_or_none(r.optimizer_state_bytes for r in runs),
                "peak_memory_bytes": _max_or_none(r.peak_memory_bytes for r in runs),
                "loss_mean": mean,
            }
        )
    state = _frontier([(r["optimizer_state_bytes"], r["loss_mean"]) for r in rows])
    peak = _frontier([(r["peak_memory_bytes"], r["loss_mean"]) for r in rows])
    for row, on_state, on_peak in zip(rows, state, peak, strict=True):
        row["frontier_state"], row["frontier_peak"] = on_state, on_peak
    return FigureData(figure, list(PARETO_COLUMNS), rows)


_FIGURE_DATA = {"line": _line_data, "table": _table_data, "curves": _curves_data, "pareto": _pareto_data}


def figure_data(study: Study, arms: list[ArmSummary]) -> list[FigureData]:
    """The rows behind every figure of the study, in the study's figure order. Each row is a dict with
    exactly the keys of `columns`, in that order:

    line    ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "best"]: one row per
            (series, x) with role "line" (series = entry label, in `series` order (default: every entry);
            x = the arm's value of `x`, ascending; loss_mean = the arm's best setting's mean final val loss,
            loss_min / loss_max its min / max over seeds, seeds = how many; best = tuned_text of the best
            setting); when several arms of a series share an x, the one with the lowest loss_mean. Then one
            row per reference (role "reference", x None): the best arm among the reference's entries. An arm
            without a finished best: losses None, seeds 0, best "" (a reference with none: arm "" too).
    table   ["entry", "<columns key>=<value>" per value, ascending]: one row per entry of `rows` (default:
            every entry); a cell = the lowest best mean of the entry's arms with that value (None if none).
    curves  ["arm", "seed", "step", "tokens", "flops", "val_loss"]: every val/loss record of each arm's best
            setting's run of each seed (tokens = step x global_batch x seq_len; flops =
            config_flops(cfg).cumulative(step)); arms without a finished best have no rows.
    pareto  ["arm", "entry", "optimizer_state_bytes", "peak_memory_bytes", "loss_mean", "frontier_state",
            "frontier_peak"]: one row per arm with a finished best, in arm order (bytes: the max over its best
            setting's seeds; None when never logged); frontier_* = True when no other arm has both
            lower-or-equal bytes and a lower loss on that memory axis.
    """
    return [_FIGURE_DATA[figure.kind](figure, study, arms) for figure in study.figures]


# ----- orderings ---------------------------------------------------------------------------------------


def _mean_value(arms: list[ArmSummary]) -> float | None:
    best = _best_of(arms)
    return _mean(best) if best is not None else None


def _seed_value(arms: list[ArmSummary], seed: int) -> float | None:
    """The lowest loss of `seed` among the arms, each with that seed's own best setting."""
    values = [arm.best_per_seed[seed].losses[seed] for arm in arms if seed in arm.best_per_seed]
    return min(values) if values else None


def _join(values: Iterable[Any]) -> str:
    return ", ".join(fmt_value(v) for v in values)


def _caveats(arms: Iterable[ArmSummary]) -> str:
    """The notes of the arms that have any, as a suffix: '; caveats: A (best lr at the grid's edge: low), B
    (incomplete)'; "" when none has."""
    noted = [f"{arm.arm} ({', '.join(notes)})" for arm in _unique(arms) if (notes := arm_notes(arm))]
    return "; caveats: " + ", ".join(noted) if noted else ""


def _unique(arms: Iterable[ArmSummary]) -> list[ArmSummary]:
    seen: dict[str, ArmSummary] = {}
    for arm in arms:
        seen.setdefault(arm.arm, arm)
    return list(seen.values())


def _where_lower(values: dict[Any, float | None], reference: float) -> tuple[list[Any], list[Any]]:
    """(the xs whose value is below `reference`, the xs with no value), in the dict's order."""
    lower = [x for x, v in values.items() if v is not None and v < reference]
    missing = [x for x, v in values.items() if v is None]
    return lower, missing


def _reference_lines(figure: FigureSpec, study: Study, arms: list[ArmSummary], seeds: list[int]) -> list[str]:
    assert figure.x is not None  # _series_points checked
    label = figure.x.rsplit(".", 1)[-1]
    points = _series_points(figure, study, arms)
    lines = []
    for series, by_x in points.items():
        xs = list(by_x)
        if not xs:
            lines.append(f"{figure.name}: {series}: no arm in this figure")
            continue
        for ref_label, ref_arms in _reference_arms(figure, arms).items():
            involved = [a for at_x in by_x.values() for a in at_x] + ref_arms
            head = f"{figure.name}: {series} < {ref_label}"
            ref = _mean_value(ref_arms)
            if ref is None:
                lines.append(f"{head}: no finished {ref_label} result to compare with{_caveats(involved)}")
                continue
            lower, missing = _where_lower({x: _mean_value(at_x) for x, at_x in by_x.items()}, ref)
            compared = [x for x in xs if x not in missing]
            if not lower:
                text = f"{head} at no {label}" + (f" (tried {_join(compared)})" if compared else "")
            elif len(lower) == len(compared) and not missing:
                text = f"{head} at {label} {_join(lower)} (every {label})"
            else:
                others = [x for x in compared if x not in lower]
                text = f"{head} at {label} {_join(lower)}" + (f" (not at {_join(others)})" if others else "")
            if missing:
                text += f"; no result at {label} {_join(missing)}"
            for seed in seeds:
                ref_s = _seed_value(ref_arms, seed)
                if ref_s is None:
                    text += f"; seed {seed}: no {ref_label} result"
                    continue
                lower_s, missing_s = _where_lower({x: _seed_value(at_x, seed) for x, at_x in by_x.items()}, ref_s)
                if lower_s and len(lower_s) == len(xs):
                    text += f"; seed {seed}: every {label}"
                elif lower_s:
                    text += f"; seed {seed}: {_join(lower_s)}"
                else:
                    text += f"; seed {seed}: none"
                if missing_s:
                    text += f" (no result at {_join(missing_s)})"
            lines.append(text + _caveats(involved))
    return lines


def _chain(ranked: list[tuple[str, float]], with_values: bool = True) -> str:
    """Names in ascending order of value, with = for ties: 'A (3.9000) < B (4.0000) = C (4.0000)'."""
    text = ""
    for i, (name, value) in enumerate(ranked):
        if i:
            text += " = " if value == ranked[i - 1][1] else " < "
        text += f"{name} ({fmt_loss(value)})" if with_values else name
    return text


def _ranked(values: dict[str, float | None]) -> list[tuple[str, float]]:
    known = [(name, v) for name, v in values.items() if v is not None]
    return sorted(known, key=lambda item: item[1])  # stable: spec / arm order on ties


def _order_lines(figure: FigureSpec, study: Study, arms: list[ArmSummary], seeds: list[int]) -> list[str]:
    assert figure.x is not None
    label = figure.x.rsplit(".", 1)[-1]
    points = _series_points(figure, study, arms)
    xs = sorted({x for by_x in points.values() for x in by_x}, key=_sort_key)
    lines = []
    for x in xs:
        at_x = {series: by_x.get(x, []) for series, by_x in points.items()}
        ranked = _ranked({s: _mean_value(a) if a else None for s, a in at_x.items()})
        text = f"{figure.name} at {label} {fmt_value(x)}: {_chain(ranked) or 'no finished result'}"
        missing = [s for s, a in at_x.items() if s not in dict(ranked)]
        if missing:
            text += f"; no result: {', '.join(missing)}"
        mean_order = [name for name, _ in ranked]
        for seed in seeds:
            ranked_s = _ranked({s: _seed_value(a, seed) for s, a in at_x.items()})
            order_s = [name for name, _ in ranked_s]
            same = order_s == [s for s in mean_order if s in order_s]
            text += f"; seed {seed}: " + ("same order" if same else _chain(ranked_s, with_values=False))
        lines.append(text + _caveats(a for group in at_x.values() for a in group))
    return lines


def _swaps(mean: dict[str, float], seed_values: dict[str, float]) -> list[tuple[str, str]]:
    """Pairs (a, b) with a strictly better than b on the means and strictly worse in the seed."""
    names = [n for n in mean if n in seed_values]
    return [(a, b) for a in names for b in names if mean[a] < mean[b] and seed_values[a] > seed_values[b]]


def _ranking_line(arms: list[ArmSummary], seeds: list[int]) -> str:
    means = {arm.arm: _mean(arm) for arm in arms}
    ranked = _ranked(means)
    notes = {arm.arm: arm_notes(arm) for arm in arms}
    parts = []
    for i, (name, value) in enumerate(ranked):
        note = f", {', '.join(notes[name])}" if notes[name] else ""
        if i:
            parts.append(" = " if value == ranked[i - 1][1] else " < ")
        parts.append(f"{name} ({fmt_loss(value)}{note})")
    text = "all arms by mean final val loss of their best setting: " + ("".join(parts) or "no finished arm")
    unfinished = [name for name, v in means.items() if v is None]
    if unfinished:
        text += f"; {NO_BEST_NOTE}: {', '.join(unfinished)}"
    known = dict(ranked)
    for seed in seeds:
        seed_values = {
            arm.arm: arm.best_per_seed[seed].losses[seed]
            for arm in arms
            if arm.arm in known and seed in arm.best_per_seed
        }
        swaps = _swaps(known, seed_values)
        absent = [name for name in known if name not in seed_values]
        if not swaps:
            text += f"; seed {seed}: same ranking"
        else:
            pairs = ", ".join(f"{a} / {b}" for a, b in swaps)
            text += f"; seed {seed}: {len(swaps)} pair(s) swap ({pairs})"
        if absent:
            text += f" (no result for {', '.join(absent)})"
    return text


def orderings(study: Study, arms: list[ArmSummary]) -> list[str]:
    """The observed orderings, one line each (what beats what, where, and whether every seed agrees).

    - A line figure with references: per series and reference, the x values where the series' best final
      val loss (the lowest of its arms at that x) is lower than the reference's (its best arm), e.g.
      "fig1_rank: AdaMeM < Adafactor at rank 8, 32, 64 (every rank); seed 0: every rank; seed 1: 8, 32".
    - A line figure without references: per x, the series in ascending loss ("A (3.9) < B (4.1)"), and
      per seed "same order" or that seed's order.
    - Last, one line ranking every arm by the mean loss of its best setting, and per seed "same ranking"
      or the pairs that seed alone would rank the other way.
    Per-seed parts (only when the study has two or more seeds) use each seed's own best settings
    (`best_per_seed`), i.e. what a study with only that seed would have concluded. Every line ends with
    the caveats of the arms it rests on: "(best lr at the grid's edge: low|high)", "(incomplete)", "(no
    finished setting)".
    """
    seeds = list(study.seeds) if len(study.seeds) >= 2 else []
    lines = []
    for figure in study.figures:
        if figure.kind != "line":
            continue
        if figure.references:
            lines += _reference_lines(figure, study, arms, seeds)
        else:
            lines += _order_lines(figure, study, arms, seeds)
    lines.append(_ranking_line(arms, seeds))
    return lines


# ----- tables ------------------------------------------------------------------------------------------


def _tuned_keys(runs: Iterable[StudyRun]) -> list[str]:
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.tuned))
    return list(keys)


def _write_runs(study: Study, results: list[RunResult]) -> list[Path]:
    tuned = _tuned_keys(r.run for r in results)
    header = ["entry", "arm", "seed", *tuned, "status", "final_val_loss", "best_val_loss", "step", "max_steps"]
    header += ["tokens_seen", "flops_seen", "tokens_per_s", "peak_memory_bytes", "optimizer_state_bytes"]
    header += ["run_dir", "message"]
    csv_rows = []
    md_rows = []
    for r in results:
        values = [r.run.tuned.get(k) for k in tuned]
        csv_rows.append(
            [r.run.entry, r.run.arm, r.run.seed, *values, r.status, r.final_val_loss, r.best_val_loss, r.step]
            + [r.max_steps, r.tokens_seen, r.flops_seen, r.tokens_per_s, r.peak_memory_bytes]
            + [r.optimizer_state_bytes, str(r.run.run_dir), r.message]
        )
        md_rows.append(
            [r.run.entry, r.run.arm, str(r.run.seed), *(fmt_plain(v) for v in values), r.status]
            + [fmt_loss(r.final_val_loss), fmt_loss(r.best_val_loss), f"{r.step}/{r.max_steps}"]
            + [f"{r.tokens_seen:,}", fmt_flops(r.flops_seen), fmt_int(r.tokens_per_s), fmt_mib(r.peak_memory_bytes)]
            + [fmt_mib(r.optimizer_state_bytes), str(r.run.run_dir), r.message]
        )
    md_header = ["entry", "arm", "seed", *tuned, "status", "final val loss", "best val loss", "step"]
    md_header += ["tokens", "FLOPs", "tokens/s", "peak memory (MiB)", "optimizer state (MiB)", "run dir", "message"]
    out = study.results_dir
    return [
        write_csv(out / "runs.csv", header, csv_rows),
        write_markdown(out / "runs.md", f"{study.name}: runs", md_header, md_rows),
    ]


def _write_arms(study: Study, arms: list[ArmSummary]) -> list[Path]:
    seeds = sorted({s for arm in arms if arm.best is not None for s in arm.best.losses} | set(study.seeds))
    header = ["entry", "arm", "best", "mean_final_val_loss", *(f"seed {s}" for s in seeds)]
    header += ["best_per_seed", "edge", "complete", "finished", "lr_curve"]
    csv_rows = []
    md_rows = []
    for arm in arms:
        best = arm.best
        per_seed = [best.losses.get(s) if best is not None else None for s in seeds]
        own = "; ".join(f"seed {s}: {tuned_text(b.tuned)}" for s, b in sorted(arm.best_per_seed.items()))
        finished = sum(r.status in ("complete", "diverged") for r in arm.runs)
        count, curve = f"{finished}/{len(arm.runs)}", lr_curve(arm)
        best_text = tuned_text(best.tuned) if best is not None else ""
        csv_rows.append(
            [arm.entry, arm.arm, best_text, best.mean if best is not None else None, *per_seed]
            + [own, arm.edge, arm.complete, count, curve]
        )
        md_rows.append(
            [arm.entry, arm.arm, best_text, fmt_loss(best.mean if best is not None else None)]
            + [fmt_loss(v) for v in per_seed]
            + [own, arm.edge, fmt_plain(arm.complete), count, curve]
        )
    md_header = ["entry", "arm", "best", "mean final val loss", *(f"seed {s}" for s in seeds)]
    md_header += ["best per seed", "best lr at edge", "complete", "finished", "loss over the tuned grid (* best)"]
    out = study.results_dir
    return [
        write_csv(out / "arms.csv", header, csv_rows),
        write_markdown(
            out / "arms.md", f"{study.name}: arms (best setting by mean final val loss)", md_header, md_rows
        ),
    ]


_LOSS_COLUMNS = {"loss_mean", "loss_min", "loss_max", "val_loss"}
_BYTES_COLUMNS = {"optimizer_state_bytes", "peak_memory_bytes"}


def _figure_cell(figure: FigureData, column: str, value: Any) -> str:
    if column in _LOSS_COLUMNS or (figure.spec.kind == "table" and column != "entry"):
        return fmt_loss(value)
    if column in _BYTES_COLUMNS:
        return fmt_mib(value)
    if column == "flops":
        return fmt_flops(value)
    return fmt_plain(value)


def _figure_header(column: str) -> str:
    return f"{column} (MiB)" if column in _BYTES_COLUMNS else column


def _write_figure(study: Study, figure: FigureData) -> list[Path]:
    out = study.figures_dir
    name = figure.spec.name
    csv_rows = [[row[c] for c in figure.columns] for row in figure.rows]
    md_rows = [[_figure_cell(figure, c, row[c]) for c in figure.columns] for row in figure.rows]
    title = figure.spec.title or name
    return [
        write_csv(out / f"{name}.csv", figure.columns, csv_rows),
        write_markdown(out / f"{name}.md", title, [_figure_header(c) for c in figure.columns], md_rows),
    ]


def write_tables(
    study: Study, results: list[RunResult], arms: list[ArmSummary], figures: list[FigureData]
) -> list[Path]:
    """runs.csv/.md and arms.csv/.md in study.results_dir, each figure's table as .csv/.md in
    study.figures_dir; returns the paths written.

    runs: one row per run (entry, arm, seed, one column per tuned key, status, final / best val loss,
    step / max_steps, tokens and FLOPs seen, tokens/s, peak memory, optimizer state bytes, run dir,
    message). arms: one row per arm (entry, arm, best tuned values, mean final val loss, the best
    setting's loss per seed, each seed's own best, edge flag, complete, finished / all runs, and the
    loss over the tuned grid as text, `lr_curve`). CSV cells are exact (bytes in bytes); Markdown cells
    are formatted (study.tables: losses 4 decimals, MiB, FLOPs in scientific notation).
    """
    paths = _write_runs(study, results) + _write_arms(study, arms)
    for figure in figures:
        paths += _write_figure(study, figure)
    return paths
