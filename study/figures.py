"""A study's figures as PNG files (matplotlib, no display), drawn from results.FigureData rows.

line     best final val loss per arm vs `x` (one line per series; references as horizontal lines;
         error bars = min..max over seeds)
table    the grid of best losses (rows: entries; columns: values of a config key) as a table image
curves   val loss of each arm's best run against tokens and against FLOPs (two panels)
pareto   final val loss vs optimizer state bytes and vs peak memory (two panels), frontier marked
"""

from __future__ import annotations

from pathlib import Path

from study.results import FigureData


def draw(figure: FigureData, out_dir: Path) -> Path:
    """Draw one figure to <out_dir>/<name>.png; returns the path."""
    raise NotImplementedError
