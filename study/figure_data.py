"""The rows behind each figure of a study, from its arms' best settings (drawn by study.figures).

Figure data (`figure_data`): the rows behind each figure (the contract with study.figures is in
`figure_data`'s docstring). A figure selects arms by entry label (`series` for line / curves /
pareto, `rows` for table; empty = every entry) and by `where`, read from the config of the arm's
first run (the values a figure filters or plots on are the same for every run of an arm).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from study.results import (
    ArmSummary,
    RunResult,
    StudyResultsError,
    read_run_metrics,
    tuned_text,
)
from study.spec import FigureSpec, Study, config_value
from study.tables import (
    fmt_value,
)
from trainer.flop_budget import config_flops


@dataclass
class FigureData:
    """The table behind one figure: `columns` names the keys of every row; `entries` is the study's entry
    labels in study order, which give each entry one colour in every figure of the study."""

    spec: FigureSpec
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    entries: list[str] = field(default_factory=list)


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


def sort_key(value: Any) -> tuple[int, float, str]:
    """Numbers in numeric order, then everything else as text (config values of one key may mix)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def mean_loss(arm: ArmSummary) -> float | None:
    return arm.best.mean if arm.best is not None else None


def best_arm(arms: list[ArmSummary]) -> ArmSummary | None:
    """The arm with the lowest best mean (the first on a tie); None when none has a finished best."""
    scored = [(m, i) for i, arm in enumerate(arms) if (m := mean_loss(arm)) is not None]
    return arms[min(scored)[1]] if scored else None


def series_points(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> dict[str, dict[Any, list[ArmSummary]]]:
    """Line figures: series label -> x value -> the series' arms at that x (x in sorted order)."""
    if figure.x is None:
        raise StudyResultsError(f"figure '{figure.name}': a line figure needs `x` (a dotted config key)")
    x_key = figure.x
    points: dict[str, dict[Any, list[ArmSummary]]] = {}
    for label in figure.series or study.entries:
        by_x: dict[Any, list[ArmSummary]] = {}
        for arm in _selected(figure, arms, [label]):
            by_x.setdefault(_arm_config_value(arm, x_key, figure), []).append(arm)
        points[label] = {x: by_x[x] for x in sorted(by_x, key=sort_key)}
    return points


def reference_arms(figure: FigureSpec, arms: list[ArmSummary]) -> dict[str, list[ArmSummary]]:
    return {label: _selected(figure, arms, entries) for label, entries in figure.references.items()}


def _line_row(series: str, role: str, x: Any, arm: ArmSummary | None, entry: str) -> dict[str, Any]:
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
        "entry": entry,
        "best": tuned_text(best.tuned) if best is not None else "",
    }


LINE_COLUMNS = ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "entry", "best"]
CURVES_COLUMNS = ["arm", "entry", "seed", "step", "tokens", "flops", "val_loss"]
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
    for series, by_x in series_points(figure, study, arms).items():
        for x, at_x in by_x.items():
            # Several arms of one series at one x (e.g. configs the figure does not filter): the best one.
            rows.append(_line_row(series, "line", x, best_arm(at_x) or at_x[0], series))
    for label, ref_arms in reference_arms(figure, arms).items():
        best = best_arm(ref_arms)
        rows.append(_line_row(label, "reference", None, best, best.entry if best is not None else ""))
    return FigureData(figure, list(LINE_COLUMNS), rows, list(study.entries))


def table_column(key: str, value: Any) -> str:
    """A table figure's column name for one value of its `columns` key: "optim.beta2=0.95"."""
    return f"{key}={fmt_value(value)}"


def _table_data(figure: FigureSpec, study: Study, arms: list[ArmSummary]) -> FigureData:
    if figure.columns is None:
        raise StudyResultsError(f"figure '{figure.name}': a table figure needs `columns` (a dotted config key)")
    key = figure.columns
    entries = figure.rows or study.entries
    selected = _selected(figure, arms, entries)
    values = sorted({_arm_config_value(arm, key, figure) for arm in selected}, key=sort_key)
    rows = []
    for entry in entries:
        row: dict[str, Any] = {"entry": entry}
        for value in values:
            best = best_arm([a for a in selected if a.entry == entry and _arm_config_value(a, key, figure) == value])
            row[table_column(key, value)] = mean_loss(best) if best is not None else None
        rows.append(row)
    return FigureData(figure, ["entry"] + [table_column(key, v) for v in values], rows, list(study.entries))


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
                        "entry": arm.entry,
                        "seed": result.run.seed,
                        "step": step,
                        "tokens": step * tokens_per_step,
                        "flops": flops.cumulative(step),
                        "val_loss": float(record["val/loss"]),
                    }
                )
    return FigureData(figure, list(CURVES_COLUMNS), rows, list(study.entries))


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
        mean = mean_loss(arm)
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
    return FigureData(figure, list(PARETO_COLUMNS), rows, list(study.entries))


_FIGURE_DATA = {"line": _line_data, "table": _table_data, "curves": _curves_data, "pareto": _pareto_data}


def figure_data(study: Study, arms: list[ArmSummary]) -> list[FigureData]:
    """The rows behind every figure of the study, in the study's figure order. Each row is a dict with
    exactly the keys of `columns`, in that order:

    line    ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "entry", "best"]:
            one row per (series, x) with role "line" (series = entry = the entry label, in `series` order
            (default: every entry); x = the arm's value of `x`, ascending; loss_mean = the arm's best
            setting's mean final val loss, loss_min / loss_max its min / max over seeds, seeds = how many;
            best = tuned_text of the best setting); when several arms of a series share an x, the one with
            the lowest loss_mean. Then one row per reference (role "reference", x None): the best arm among
            the reference's entries, entry = that arm's entry. An arm without a finished best: losses None,
            seeds 0, best "" (a reference with none: arm and entry "" too).
    table   ["entry", "<columns key>=<value>" per value, ascending]: one row per entry of `rows` (default:
            every entry); a cell = the lowest best mean of the entry's arms with that value (None if none).
    curves  ["arm", "entry", "seed", "step", "tokens", "flops", "val_loss"]: every val/loss record of each
            arm's best setting's run of each seed (tokens = step x global_batch x seq_len; flops =
            config_flops(cfg).cumulative(step)); arms without a finished best have no rows.
    pareto  ["arm", "entry", "optimizer_state_bytes", "peak_memory_bytes", "loss_mean", "frontier_state",
            "frontier_peak"]: one row per arm with a finished best, in arm order (bytes: the max over its best
            setting's seeds; None when never logged); frontier_* = True when no other arm has both
            lower-or-equal bytes and a lower loss on that memory axis.
    """
    return [_FIGURE_DATA[figure.kind](figure, study, arms) for figure in study.figures]
