"""study.figures: FigureData rows built by hand (the contract with study.results) -> the drawn Figure's
contents (line data, references, scales, table cells, frontier) and the PNG written by draw()."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.collections import LineCollection, PathCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.image import imread
from matplotlib.lines import Line2D

from study.figure_data import FigureData
from study.figures import DPI, NO_DATA, FigureError, build, draw
from study.spec import FigureSpec

LINE = ["series", "role", "x", "loss_mean", "loss_min", "loss_max", "seeds", "arm", "entry", "best"]
CURVES = ["arm", "entry", "seed", "step", "tokens", "flops", "val_loss"]
PARETO = [
    "arm",
    "entry",
    "optimizer_state_bytes",
    "peak_memory_bytes",
    "loss_mean",
    "frontier_state",
    "frontier_peak",
]
MIB = 2**20


def data(
    spec: FigureSpec, columns: list[str], rows: list[tuple[Any, ...]], entries: list[str] | None = None
) -> FigureData:
    return FigureData(
        spec=spec, columns=columns, rows=[dict(zip(columns, r, strict=True)) for r in rows], entries=entries or []
    )


def line_row(
    series: str,
    x: Any,
    mean: float | None,
    lo: float | None = None,
    hi: float | None = None,
    seeds: int = 1,
    entry: str | None = None,
):
    role = "line" if x is not None else "reference"
    lo = mean if lo is None else lo
    hi = mean if hi is None else hi
    entry = series if entry is None else entry
    return (series, role, x, mean, lo, hi, seeds if mean is not None else 0, f"{series} x={x}", entry, "optim.lr=0.01")


def fig1(logx: bool = True) -> FigureData:
    return data(
        FigureSpec(name="fig1_rank", kind="line", x="optim.rank", logx=logx, title="Figure 1"),
        LINE,
        [
            line_row("GaLore", 8, 3.9),
            line_row("GaLore", 32, 3.7),
            line_row("GaLore", 128, 3.6),
            line_row("AdaMeM", 8, 3.5),
            line_row("AdaMeM", 32, 3.45),
            line_row("AdaMeM", 128, None),  # not finished: no point
            line_row("Broken", 8, None),  # a series with nothing finished: no line, no error
            line_row("Adafactor", None, 3.65),
            line_row("Adamw(factor)", None, 3.4, entry="AdamW"),
            line_row("Pending ref", None, None),
        ],
    )


def label(artist: Any) -> str:
    return str(artist.get_label())


def xs(line: Line2D) -> list[float]:
    return np.asarray(line.get_xdata(), dtype=float).tolist()


def ys(line: Line2D) -> list[float]:
    return np.asarray(line.get_ydata(), dtype=float).tolist()


def log_base(ax: Any) -> float:
    return float(getattr(ax.xaxis.get_transform(), "base"))  # noqa: B009 (Transform's stub lacks it)


def labelled_lines(fig: Figure) -> dict[str, Line2D]:
    return {label(line): line for line in fig.axes[0].get_lines() if not label(line).startswith("_")}


def all_texts(fig: Figure) -> list[str]:
    texts = [t.get_text() for ax in fig.axes for t in ax.texts]
    return texts + [t.get_text() for t in fig.texts]


def test_line_draws_each_series_and_reference_from_the_rows():
    fig = build(fig1())
    lines = labelled_lines(fig)
    assert set(lines) == {"GaLore", "AdaMeM", "Adafactor", "Adamw(factor)"}
    assert xs(lines["GaLore"]) == [8, 32, 128]
    assert ys(lines["GaLore"]) == [3.9, 3.7, 3.6]
    assert xs(lines["AdaMeM"]) == [8, 32]  # the unfinished rank 128 is skipped
    assert lines["GaLore"].get_marker() == "o" and lines["GaLore"].get_linestyle() == "-"
    for name, y in (("Adafactor", 3.65), ("Adamw(factor)", 3.4)):
        ref = lines[name]
        assert ref.get_linestyle() == "--"
        assert ys(ref) == [y, y]
    ax = fig.axes[0]
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["GaLore", "AdaMeM", "Adafactor", "Adamw(factor)"]
    assert ax.get_xlabel() == "rank" and ax.get_ylabel() == "final validation loss"
    assert ax.get_title() == "Figure 1"
    assert not ax.collections  # one seed each: no error bars


def test_line_logx_is_base_2_with_the_values_as_ticks_for_powers_of_two():
    ax = build(fig1()).axes[0]
    assert ax.get_xscale() == "log"
    assert log_base(ax) == 2
    assert list(ax.get_xticks()) == [8, 32, 128]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "32", "128"]
    assert build(fig1(logx=False)).axes[0].get_xscale() == "linear"


def test_line_logx_is_base_10_otherwise_and_the_label_is_the_keys_last_part():
    figure = data(
        FigureSpec(name="fig3", kind="line", x="train.global_batch", logx=True),
        LINE,
        [line_row("Adafactor", 24, 3.6), line_row("Adafactor", 96, 3.5)],
    )
    ax = build(figure).axes[0]
    assert ax.get_xscale() == "log" and log_base(ax) == 10
    assert ax.get_xlabel() == "global batch"
    assert ax.get_title() == "fig3"  # no title: the name


def test_line_error_bars_span_min_to_max_over_seeds():
    figure = data(
        FigureSpec(name="f", kind="line", x="optim.rank"),
        LINE,
        [line_row("AdaMeM", 8, 3.5, 3.4, 3.7, seeds=2), line_row("AdaMeM", 32, 3.3, seeds=1)],
    )
    ax = build(figure).axes[0]
    bars = [c for c in ax.collections if isinstance(c, LineCollection)]
    assert len(bars) == 1
    (segment,) = bars[0].get_segments()  # only the point with two seeds has a bar
    assert segment.tolist() == [[8, pytest.approx(3.4)], [8, pytest.approx(3.7)]]


def test_table_cells_have_four_decimals_and_the_best_per_column_is_bold():
    columns = ["entry", "optim.beta2=0.95", "optim.beta2=0.99", "optim.beta2=0.999"]
    figure = data(
        FigureSpec(name="table1", kind="table", rows=["AdamW", "GaLore", "AdaMeM"], columns="optim.beta2"),
        columns,
        [("AdamW", 3.5, 3.41234, math.inf), ("GaLore", 3.6, None, 3.55), ("AdaMeM", None, None, None)],
    )
    table = build(figure).axes[0].tables[0]
    cells = table.get_celld()
    text = {(i, j): cells[i, j].get_text().get_text() for i in range(4) for j in range(4)}
    assert [text[0, j] for j in range(4)] == ["entry", "beta2=0.95", "beta2=0.99", "beta2=0.999"]
    assert [text[1, j] for j in range(4)] == ["AdamW", "3.5000", "3.4123", "diverged"]
    assert [text[2, j] for j in range(4)] == ["GaLore", "3.6000", "-", "3.5500"]
    assert [text[3, j] for j in range(4)] == ["AdaMeM", "-", "-", "-"]
    bold = {(i, j) for i in range(1, 4) for j in range(1, 4) if cells[i, j].get_text().get_fontweight() == "bold"}
    assert bold == {(1, 1), (1, 2), (2, 3)}


def curves(arms: tuple[tuple[str, str, float], ...] = (("AdamW", "AdamW", 3.3), ("GaLore rank=8", "GaLore", 3.6))):
    rows = []
    for arm, entry, final in arms:
        for seed in (0, 1):
            for step in (200, 0, 100):  # out of order: drawn by step
                rows.append((arm, entry, seed, step, step * 512, step * 1e9, final + 1 / (1 + step) + 0.01 * seed))
    return data(FigureSpec(name="curves", kind="curves"), CURVES, rows)


def test_curves_two_log_panels_one_line_per_arm_and_seed():
    fig = build(curves())
    assert len(fig.axes) == 2
    for ax, key in zip(fig.axes, ("tokens", "flops"), strict=True):
        assert ax.get_xscale() == "log"
        lines = ax.get_lines()
        assert len(lines) == 4
        primary = {label(line): line for line in lines if not label(line).startswith("_")}
        assert set(primary) == {"AdamW", "GaLore rank=8"}
        scale = 512 if key == "tokens" else 1e9
        # Step 0 (x = 0) has no place on a log axis; the rest in step order.
        assert xs(primary["AdamW"]) == [100 * scale, 200 * scale]
        assert ys(primary["AdamW"]) == [3.3 + 1 / 101, 3.3 + 1 / 201]
        others = [line for line in lines if label(line).startswith("_")]
        assert len(others) == 2
        assert all(o.get_linewidth() < primary["AdamW"].get_linewidth() and (o.get_alpha() or 1) < 1 for o in others)
    assert fig.axes[0].get_xlabel() == "tokens" and fig.axes[1].get_xlabel() == "FLOPs"


def test_curves_an_entrys_arms_share_its_colour_and_differ_in_line_style():
    fig = build(curves((("GaLore rank=8", "GaLore", 3.6), ("AdamW", "AdamW", 3.3), ("GaLore rank=32", "GaLore", 3.5))))
    lines = labelled_lines(fig)
    assert lines["GaLore rank=8"].get_color() == lines["GaLore rank=32"].get_color() != lines["AdamW"].get_color()
    styles = {name: line.get_linestyle() for name, line in lines.items()}
    assert styles == {"GaLore rank=8": "-", "AdamW": "-", "GaLore rank=32": "--"}


PARETO_ENTRIES = ["AdamW", "Adafactor", "GaLore", "AdaMeM", "AdaLomo"]  # the rows of pareto(), in row order


def pareto(state_bytes_adalomo: float = 0.05 * MIB) -> FigureData:
    return data(
        FigureSpec(name="pareto", kind="pareto"),
        PARETO,
        [
            ("AdamW", "AdamW", 8 * MIB, 500 * MIB, 3.3, True, True),
            ("Adafactor", "Adafactor", 0.1 * MIB, 480 * MIB, 3.6, True, True),
            ("GaLore rank=8", "GaLore", 1 * MIB, 490 * MIB, 3.7, False, False),
            ("AdaMeM rank=8", "AdaMeM", 1.2 * MIB, 490 * MIB, 3.45, True, False),
            ("AdaMeM rank=32", "AdaMeM", 2 * MIB, 495 * MIB, None, False, False),  # not finished
            ("AdaLomo", "AdaLomo", state_bytes_adalomo, 470 * MIB, 3.9, True, True),
        ],
    )


def test_pareto_two_panels_markers_per_entry_and_the_frontier_as_a_step_line():
    fig = build(pareto())
    assert len(fig.axes) == 2
    state, peak = fig.axes
    assert state.get_xlabel() == "optimizer state (MiB)" and peak.get_xlabel() == "peak memory (MiB)"
    assert state.get_xscale() == "log" and peak.get_xscale() == "log"
    markers = {
        label(c): np.asarray(c.get_offsets()).tolist() for c in state.collections if isinstance(c, PathCollection)
    }
    assert markers == {
        "AdamW": [[8, 3.3]],
        "Adafactor": [[pytest.approx(0.1), 3.6]],
        "GaLore": [[1, 3.7]],
        "AdaMeM": [[pytest.approx(1.2), 3.45]],  # the unfinished rank 32 is skipped
        "AdaLomo": [[pytest.approx(0.05), 3.9]],
    }
    (frontier,) = [line for line in state.get_lines() if label(line) == "frontier"]
    assert frontier.get_drawstyle() == "steps-post"
    assert xs(frontier) == pytest.approx([0.05, 0.1, 1.2, 8])
    assert ys(frontier) == [3.9, 3.6, 3.45, 3.3]
    (frontier_peak,) = [line for line in peak.get_lines() if label(line) == "frontier"]
    assert xs(frontier_peak) == [470, 480, 500]
    assert {t.get_text() for t in state.texts} == {"AdamW", "Adafactor", "GaLore rank=8", "AdaMeM rank=8", "AdaLomo"}


def test_pareto_with_a_stateless_optimizer_uses_a_linear_axis():
    state, peak = build(pareto(state_bytes_adalomo=0.0)).axes
    assert state.get_xscale() == "linear" and peak.get_xscale() == "log"


def test_an_entry_has_one_colour_in_every_figure_of_a_study():
    """Colours follow the study's entry order, not each figure's: a figure that shows GaLore and AdaMeM only
    draws them in the colours the pareto figure, which shows every entry, gives them. The study's order here
    is not the pareto rows' order, and has more entries than any one figure draws (a 13-entry study: the first
    ten are tab10's hues)."""
    entries = ["AdaLomo", "Fig3 AdamW", "AdaMeM", "GaLore", "AdamW", "Adafactor", *[f"other {i}" for i in range(7)]]
    ranks = data(
        FigureSpec(name="fig1", kind="line", x="optim.rank"),
        LINE,
        [line_row("AdaMeM", 8, 3.5), line_row("GaLore", 8, 3.9), line_row("Adamw(factor)", None, 3.4, entry="AdamW")],
        entries,
    )
    pareto_fig = pareto()
    pareto_fig.entries = entries
    curves_fig = curves((("AdaLomo", "AdaLomo", 3.9), ("GaLore rank=8", "GaLore", 3.6)))
    curves_fig.entries = entries

    def colours(fig: Figure) -> dict[str, tuple[float, ...]]:
        """label -> RGBA of the lines (the frontier left out) and of the pareto markers."""
        found: dict[str, tuple[float, ...]] = {
            name: to_rgba(line.get_color()) for name, line in labelled_lines(fig).items() if name != "frontier"
        }
        for c in fig.axes[0].collections:
            if label(c) in entries:
                found[label(c)] = tuple(np.asarray(c.get_facecolor(), dtype=float).reshape(-1, 4)[0].tolist())
        return found

    line_colours, pareto_colours = colours(build(ranks)), colours(build(pareto_fig))
    curves_colours = colours(build(curves_fig))
    tab10 = colormaps["tab10"]
    assert pareto_colours == {entry: tab10(entries.index(entry)) for entry in PARETO_ENTRIES}
    assert line_colours["GaLore"] == pareto_colours["GaLore"] == curves_colours["GaLore rank=8"]
    assert line_colours["AdaMeM"] == pareto_colours["AdaMeM"]
    assert curves_colours["AdaLomo"] == pareto_colours["AdaLomo"]
    assert line_colours["Adamw(factor)"] == pareto_colours["AdamW"]  # a reference: its best arm's entry


@pytest.mark.parametrize("kind", ["line", "table", "curves", "pareto"])
def test_a_figure_with_no_finished_run_says_so(kind):
    columns = {"line": LINE, "table": ["entry", "optim.beta2=0.9"], "curves": CURVES, "pareto": PARETO}[kind]
    rows: list[tuple[Any, ...]] = {
        "line": [line_row("AdamW", 8, None), line_row("ref", None, None)],
        "table": [("AdamW", None)],
        "curves": [("AdamW", "AdamW", 0, 100, 1000, 1e9, None)],
        "pareto": [("AdamW", "AdamW", 1.0, 2.0, None, False, False)],
    }[kind]
    fig = build(data(FigureSpec(name="early", kind=kind, x="optim.rank", logx=True), columns, rows))
    assert NO_DATA in all_texts(fig)
    assert fig.axes[0].get_title() == "early"
    assert not build(data(FigureSpec(name="none", kind=kind, x="optim.rank"), columns, [])).axes[0].get_lines()


@pytest.mark.parametrize(
    "figure",
    [fig1(), curves(), pareto(), data(FigureSpec(name="empty", kind="line"), LINE, [])],
    ids=lambda f: f.spec.name,
)
def test_draw_writes_a_png_of_the_figures_size(tmp_path: Path, figure: FigureData):
    path = draw(figure, tmp_path / "figures")
    assert path == tmp_path / "figures" / f"{figure.spec.name}.png"
    width, height = build(figure).get_size_inches()
    image = imread(path)
    assert image.shape == (round(height * DPI), round(width * DPI), 4)
    assert image[..., :3].min() < 0.5  # something dark was drawn, not a blank canvas
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_redraw_interrupted_mid_write_leaves_the_previous_png(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Ctrl-C while savefig writes: the figure's PNG is still the last complete one, never a truncated file."""
    path = draw(fig1(), tmp_path)
    before = path.read_bytes()

    def interrupted(self: Figure, fname: Any, **kwargs: Any) -> None:
        Path(fname).write_bytes(before[:100])  # the first bytes are out when the interrupt arrives
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        draw(fig1(), tmp_path)
    assert path.read_bytes() == before


def test_missing_columns_and_unknown_kinds_name_the_figure():
    with pytest.raises(FigureError, match=r"'fig1'.*\['loss_mean'"):
        build(FigureData(FigureSpec(name="fig1", kind="line"), [c for c in LINE if c != "loss_mean"]))
    with pytest.raises(FigureError, match="'odd'.*unknown kind 'bar'"):
        build(FigureData(FigureSpec(name="odd", kind="bar"), []))  # type: ignore[arg-type]


def test_line_logx_leaves_out_x_0_and_takes_base_2_only_when_every_x_is_a_power_of_two():
    spec = FigureSpec(name="f", kind="line", x="optim.rank", logx=True)
    with_zero = build(data(spec, LINE, [line_row("A", 0, 3.9), line_row("A", 8, 3.7), line_row("A", 32, 3.6)]))
    ax = with_zero.axes[0]
    assert xs(labelled_lines(with_zero)["A"]) == [8, 32] and ys(labelled_lines(with_zero)["A"]) == [3.7, 3.6]
    assert log_base(ax) == 2 and list(ax.get_xticks()) == [8, 32]
    mixed = build(data(spec, LINE, [line_row("A", 24, 3.7), line_row("A", 32, 3.6), line_row("A", 96, 3.5)]))
    assert mixed.axes[0].get_xscale() == "log" and log_base(mixed.axes[0]) == 10  # 24 and 96 are not powers of 2


def test_curves_with_only_step_0_evaluations_say_no_finished_runs():
    """Step 0 (0 tokens, 0 FLOPs) has no place on the log axes: nothing drawable, the "no finished runs" figure."""
    figure = data(FigureSpec(name="early", kind="curves"), CURVES, [("AdamW", "AdamW", 0, 0, 0, 0.0, 10.0)])
    assert NO_DATA in all_texts(build(figure))
