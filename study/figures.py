"""A study's figures as PNG files (matplotlib, no display), drawn from figure_data.FigureData rows.

line     best final val loss per arm vs `x` (one line per series; references as horizontal lines;
         error bars = min..max over seeds)
table    the grid of best losses (rows: entries; columns: values of a config key) as a table image
curves   val loss of each arm's best run against tokens and against FLOPs (two panels)
pareto   final val loss vs optimizer state bytes and vs peak memory (two panels), frontier marked

The rows' keys per kind are the contract written in study.results (`FigureData`). Figures are built
on `matplotlib.figure.Figure` directly, never through pyplot: no global figure state, no display
backend, nothing to close, so drawing works on a headless node and inside tests alike.

What is not drawn: rows whose loss is None (the arm has no finished best yet) or not finite (every
setting diverged: +inf), and, on a log axis, points at x <= 0 (e.g. an evaluation at step 0, 0 tokens).
A series with no drawable row gets no line. A figure with nothing drawable at all is still written,
as a PNG that says "no finished runs yet", because a study's figures are drawn while runs are missing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogFormatter, NullLocator

from study.figure_data import CURVES_COLUMNS, LINE_COLUMNS, PARETO_COLUMNS, FigureData

DPI = 120
NO_DATA = "no finished runs yet"
MIB = 2**20
LOSS_LABEL = "final validation loss"

# The row keys each kind reads (study.results' contract); checked up front so a mismatch names the figure.
# The columns each kind reads: the contract with study.figure_data, which fills them.
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "line": tuple(LINE_COLUMNS),
    "table": ("entry",),
    "curves": tuple(CURVES_COLUMNS),
    "pareto": tuple(PARETO_COLUMNS),
}


class FigureError(ValueError):
    """FigureData that cannot be drawn (unknown kind, missing columns); the message names the figure."""


def draw(figure: FigureData, out_dir: Path) -> Path:
    """Draw one figure to <out_dir>/<name>.png (dpi 120); returns the path.

    The PNG is written to a temporary name and renamed, so an interrupted study never leaves a
    truncated image behind that a reader would take for the figure."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{figure.spec.name}.png"
    tmp = path.with_name(path.name + ".tmp")
    build(figure).savefig(tmp, dpi=DPI, format="png")
    os.replace(tmp, path)
    return path


def build(figure: FigureData) -> Figure:
    """The matplotlib Figure of one FigureData, by its spec's kind (see the module docstring)."""
    kind = figure.spec.kind
    builder = BUILDERS.get(kind)
    if builder is None:
        raise FigureError(f"figure {figure.spec.name!r}: unknown kind {kind!r}; use one of {sorted(BUILDERS)}")
    missing = [c for c in REQUIRED_COLUMNS[kind] if c not in figure.columns]
    if missing:
        raise FigureError(
            f"figure {figure.spec.name!r} ({kind}): its table lacks the columns {missing} "
            f"(has {figure.columns}); study.figure_data.figure_data must fill the {kind} columns"
        )
    return builder(figure)


# ----- helpers ---------------------------------------------------------------------------------------


def title_of(figure: FigureData) -> str:
    return figure.spec.title or figure.spec.name


def finite(value: Any) -> bool:
    """A number that can be drawn: not None, not NaN, not +-inf (a diverged arm's loss)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def empty_figure(figure: FigureData) -> Figure:
    """One blank panel with the figure's title and "no finished runs yet"."""
    fig = Figure(figsize=(6.4, 3.0), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title_of(figure))
    ax.text(0.5, 0.5, NO_DATA, ha="center", va="center", fontsize=14, color="0.4", transform=ax.transAxes)
    return fig


def is_power_of_two(value: Any) -> bool:
    return finite(value) and value > 0 and float(value).is_integer() and (int(value) & (int(value) - 1)) == 0


def axis_label(key: str | None) -> str:
    """The last part of a dotted config key, as words: train.global_batch -> "global batch"."""
    if not key:
        return "x"
    return key.rsplit(".", 1)[-1].replace("_", " ")


Color = tuple[float, float, float, float]
# An entry's arms in one figure share its colour and differ in line style (curves) or by their annotation
# (pareto).
LINESTYLES = ("-", "--", ":", "-.")


def color_cycle(n: int) -> list[Color]:
    """n colours, ten distinct hues first: tab20's dark shades (tab10's colours), then its light shades in the
    same hue order, so that the first ten entries of a study never share a hue (tab20 in its own order pairs
    each dark shade with its light one: neighbouring entries would differ in shade only); past 20 they repeat."""
    from matplotlib import colormaps

    cmap = colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [cmap(order[i % 20]) for i in range(n)]


def entry_colors(figure: FigureData, drawn: list[str]) -> dict[str, Color]:
    """Each entry's colour, by its place in the study's entries (figure.entries), so that an optimizer has
    one colour in every figure of a study whichever entries a figure selects; entries not in that list (a
    figure built by hand) follow it in the order drawn."""
    order = unique([*figure.entries, *drawn])
    return dict(zip(order, color_cycle(len(order)), strict=True))


def unique(values: list[Any]) -> list[Any]:
    """The values in first-appearance order, without repeats."""
    seen: list[Any] = []
    for v in values:
        if v not in seen:
            seen.append(v)
    return seen


# ----- line: the paper's Figures 1-3 -----------------------------------------------------------------


def build_line(figure: FigureData) -> Figure:
    """Final val loss vs spec.x: markers + line per series in row order, error bars min..max over seeds
    where seeds > 1, references as dashed horizontal lines (labelled in the legend); colours by entry."""
    spec = figure.spec
    points = [r for r in figure.rows if r["role"] == "line" and finite(r["loss_mean"]) and r["x"] is not None]
    if spec.logx:
        # A log axis cannot place x <= 0: left out here (the module docstring says so) instead of matplotlib
        # dropping it with only a warning on the console.
        points = [r for r in points if finite(r["x"]) and r["x"] > 0]
    references = [r for r in figure.rows if r["role"] == "reference" and finite(r["loss_mean"])]
    if not points and not references:
        return empty_figure(figure)

    series = unique([r["series"] for r in points])
    colors = entry_colors(figure, [r["entry"] for r in points + references])
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    for name in series:
        rows = [r for r in points if r["series"] == name]
        color = colors[rows[0]["entry"]]
        xs = [r["x"] for r in rows]
        ys = [r["loss_mean"] for r in rows]
        ax.plot(xs, ys, marker="o", linestyle="-", color=color, label=name)
        spread = [r for r in rows if (r["seeds"] or 0) > 1 and finite(r["loss_min"]) and finite(r["loss_max"])]
        if spread:
            ax.errorbar(
                [r["x"] for r in spread],
                [r["loss_mean"] for r in spread],
                yerr=[
                    [r["loss_mean"] - r["loss_min"] for r in spread],
                    [r["loss_max"] - r["loss_mean"] for r in spread],
                ],
                fmt="none",
                ecolor=color,
                capsize=3,
                elinewidth=1,
            )
    for ref in references:
        # Coloured by the entry of the reference's best arm: "Adamw(factor)" takes the colour of whichever entry won.
        ax.axhline(ref["loss_mean"], linestyle="--", color=colors[ref["entry"]], linewidth=1.4, label=ref["series"])

    if spec.logx and points:
        xs_all = sorted({float(r["x"]) for r in points})
        if all(is_power_of_two(x) for x in xs_all):
            # Ranks and batch sizes are powers of two: base-2 spacing with the values themselves as ticks,
            # as the paper's figures label them (128, 256, 512 rather than 2^7 ...).
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(xs_all))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([f"{int(x)}" for x in xs_all])
        else:
            ax.set_xscale("log")
    elif spec.logx:
        ax.set_xscale("log")  # only references: the axis is empty, but the figure still says it is log
    ax.set_xlabel(axis_label(spec.x))
    ax.set_ylabel(LOSS_LABEL)
    ax.set_title(title_of(figure))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# ----- table: the paper's Table 1 --------------------------------------------------------------------


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)) and math.isinf(value):
        return "diverged"
    if isinstance(value, (int, float)) and math.isnan(value):
        return "nan"
    return f"{value:.4f}"


def column_header(column: str) -> str:
    """ "optim.beta2=0.95" -> "beta2=0.95": the section prefix says nothing a reader needs."""
    key, sep, value = column.partition("=")
    return key.rsplit(".", 1)[-1] + sep + value


def build_table(figure: FigureData) -> Figure:
    """A matplotlib table: one row per entry, one column per value; cells with 4 decimals, "-" when the
    entry has no finished arm with that value, "diverged" for +inf; the lowest loss of each column bold
    (ties all bold). An entry with no finished cell keeps its row of "-" (a reader sees it is pending);
    the figure is the "no finished runs yet" one only when no cell at all has a loss."""
    value_columns = [c for c in figure.columns if c != "entry"]
    if not any(finite(row[c]) for row in figure.rows for c in value_columns):
        return empty_figure(figure)

    cells = [[str(row["entry"])] + [format_cell(row[c]) for c in value_columns] for row in figure.rows]
    headers = ["entry"] + [column_header(c) for c in value_columns]
    # Sized to the content (9 pt text): ~0.085 inch per character of each column's widest cell plus its
    # padding, ~0.2 inch per row, and room for the title.
    widths = [max(len(headers[j]), *(len(r[j]) for r in cells)) for j in range(len(headers))]
    fig = Figure(
        figsize=(max(3.0, 0.085 * sum(widths) + 0.15 * len(widths) + 0.4), 0.2 * (len(cells) + 1) + 0.55),
        layout="constrained",
    )
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title_of(figure))
    table = ax.table(cellText=cells, colLabels=headers, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.auto_set_column_width(list(range(len(headers))))
    for (i, _), cell in table.get_celld().items():
        if i == 0:
            cell.get_text().set_fontweight("bold")
            cell.set_facecolor("0.92")
    for j, column in enumerate(value_columns, start=1):
        values = [row[column] for row in figure.rows if finite(row[column])]
        if not values:
            continue
        best = min(values)
        for i, row in enumerate(figure.rows, start=1):  # row 0 of the table is the header
            if finite(row[column]) and row[column] == best:
                table[i, j].get_text().set_fontweight("bold")
    return fig


# ----- curves: val loss against tokens and FLOPs -----------------------------------------------------


def build_curves(figure: FigureData) -> Figure:
    """Two panels, val loss vs tokens and vs FLOPs (log x), one line per (arm, seed) ordered by step:
    each arm's lowest seed in the legend, its other seeds thinner and transparent. An arm has its entry's
    colour; an entry's arms differ in line style (solid, dashed, dotted, dash-dot, in arm order)."""
    rows = [r for r in figure.rows if finite(r["val_loss"])]
    arms = unique([r["arm"] for r in rows])
    panels = (("tokens", "tokens"), ("flops", "FLOPs"))
    if not any(finite(r[key]) and r[key] > 0 for r in rows for key, _ in panels):
        return empty_figure(figure)

    entry_of = {r["arm"]: r["entry"] for r in rows}
    colors = entry_colors(figure, [entry_of[arm] for arm in arms])
    styles = {}
    for arm in arms:
        siblings = [a for a in arms if entry_of[a] == entry_of[arm]]
        styles[arm] = LINESTYLES[siblings.index(arm) % len(LINESTYLES)]
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for arm in arms:
            arm_rows = [r for r in rows if r["arm"] == arm]
            seeds = sorted(unique([r["seed"] for r in arm_rows]))
            for k, seed in enumerate(seeds):
                pts = sorted(
                    ((r["step"], r[key], r["val_loss"]) for r in arm_rows if r["seed"] == seed and finite(r[key])),
                    key=lambda p: p[0],
                )
                pts = [p for p in pts if p[1] > 0]  # log x: an evaluation at step 0 has no place on it
                if not pts:
                    continue
                primary = k == 0
                ax.plot(
                    [p[1] for p in pts],
                    [p[2] for p in pts],
                    color=colors[entry_of[arm]],
                    linestyle=styles[arm],
                    linewidth=1.6 if primary else 0.8,
                    alpha=1.0 if primary else 0.45,
                    label=arm if primary else "_nolegend_",
                )
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    fig.suptitle(title_of(figure))
    # Many arms (a study has one per optimizer x rank): the legend goes beside the panels, not over the curves.
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=7)
    return fig


# ----- pareto: loss against memory -------------------------------------------------------------------


def build_pareto(figure: FigureData) -> Figure:
    """Two panels, final val loss vs optimizer state (MiB) and vs peak memory (MiB): one marker per arm
    coloured by entry and annotated with the arm's name; the rows' frontier_* points joined by a step
    line (where="post": the best loss reachable within that much memory). Log x when every value on
    that axis is > 0 (an optimizer with no state would otherwise vanish), else linear."""
    rows = [r for r in figure.rows if finite(r["loss_mean"])]
    panels = (
        ("optimizer_state_bytes", "frontier_state", "optimizer state (MiB)"),
        ("peak_memory_bytes", "frontier_peak", "peak memory (MiB)"),
    )
    if not any(finite(r[key]) for r in rows for key, _, _ in panels):
        return empty_figure(figure)

    entries = unique([r["entry"] for r in rows])
    colors = entry_colors(figure, entries)
    fig = Figure(figsize=(12.0, 5.0), layout="constrained")
    axes = fig.subplots(1, 2, sharey=True)
    for ax, (key, frontier_key, label) in zip(axes, panels, strict=True):
        drawn = [r for r in rows if finite(r[key])]
        if not drawn:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", color="0.4", transform=ax.transAxes)
            ax.set_xlabel(label)
            continue
        for entry in entries:
            pts = [r for r in drawn if r["entry"] == entry]
            if pts:
                ax.scatter(
                    [r[key] / MIB for r in pts],
                    [r["loss_mean"] for r in pts],
                    color=colors[entry],
                    label=entry,
                    zorder=3,
                )
        for r in drawn:
            ax.annotate(
                str(r["arm"]),
                (r[key] / MIB, r["loss_mean"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=6,
                color="0.25",
            )
        frontier = sorted((r[key] / MIB, r["loss_mean"]) for r in drawn if r[frontier_key])
        if frontier:
            ax.step(
                [p[0] for p in frontier],
                [p[1] for p in frontier],
                where="post",
                color="black",
                linestyle="--",
                linewidth=1.0,
                label="frontier",
                zorder=2,
            )
        if all(r[key] > 0 for r in drawn):
            ax.set_xscale("log")
            # Plain numbers (0.1, 430) rather than 4.3x10^2: peak memory often spans less than a decade.
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(LOSS_LABEL)
    fig.suptitle(title_of(figure))
    handles, labels = unique_legend(axes)
    fig.legend(handles, labels, loc="outside right center", fontsize=8)
    return fig


def unique_legend(axes: Any) -> tuple[list[Any], list[str]]:
    """The legend entries of all panels, each label once (an entry drawn on both panels appears once)."""
    handles: list[Any] = []
    labels: list[str] = []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


BUILDERS: dict[str, Callable[[FigureData], Figure]] = {
    "line": build_line,
    "table": build_table,
    "curves": build_curves,
    "pareto": build_pareto,
}

__all__ = ["BUILDERS", "NO_DATA", "FigureError", "build", "draw"]
