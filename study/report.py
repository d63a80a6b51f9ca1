"""A study's result tables: runs, arms and the table behind each figure, as CSV (exact values) and
Markdown (formatted, study.tables).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from study.figure_data import FigureData
from study.results import (
    ArmSummary,
    RunResult,
    lr_curve,
    tuned_text,
)
from study.spec import Study, StudyRun
from study.tables import (
    fmt_flops,
    fmt_int,
    fmt_loss,
    fmt_mib,
    fmt_plain,
    write_csv,
    write_markdown,
)


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
