"""What a study's figures say, in words: which arm beats which, where, and whether every seed agrees.

Orderings (`orderings`): the comparisons a reader takes away, on the means and per seed, with the
arms they rest on marked when their best lr is at the grid's edge or some of their runs are missing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from study.figure_data import best_arm, mean_loss, reference_arms, series_points, sort_key
from study.results import (
    NO_BEST_NOTE,
    ArmSummary,
    arm_notes,
)
from study.spec import FigureSpec, Study
from study.tables import (
    fmt_loss,
    fmt_value,
)


def _mean_value(arms: list[ArmSummary]) -> float | None:
    best = best_arm(arms)
    return mean_loss(best) if best is not None else None


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
    points = series_points(figure, study, arms)
    lines = []
    for series, by_x in points.items():
        xs = list(by_x)
        if not xs:
            lines.append(f"{figure.name}: {series}: no arm in this figure")
            continue
        for ref_label, ref_arms in reference_arms(figure, arms).items():
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
    points = series_points(figure, study, arms)
    xs = sorted({x for by_x in points.values() for x in by_x}, key=sort_key)
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
            if not order_s:
                text += f"; seed {seed}: no finished result"
                continue
            same = bool(mean_order) and order_s == [s for s in mean_order if s in order_s]
            text += f"; seed {seed}: " + ("same order" if same else _chain(ranked_s, with_values=False))
        lines.append(text + _caveats(a for group in at_x.values() for a in group))
    return lines


def _swaps(mean: dict[str, float], seed_values: dict[str, float]) -> list[tuple[str, str]]:
    """Pairs (a, b) with a strictly better than b on the means and strictly worse in the seed."""
    names = [n for n in mean if n in seed_values]
    return [(a, b) for a in names for b in names if mean[a] < mean[b] and seed_values[a] > seed_values[b]]


def _ranking_line(arms: list[ArmSummary], seeds: list[int]) -> str:
    means = {arm.arm: mean_loss(arm) for arm in arms}
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
        if not known:  # nothing to compare that seed with (its own results alone are not a ranking check)
            has_any = any(seed in arm.best_per_seed for arm in arms)
            text += f"; seed {seed}: " + ("no mean to compare with" if has_any else "no finished result")
            continue
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
