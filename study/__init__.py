"""Studies: from a study file (arms x grids x seeds, figures) to runs, result tables and figures.

    spec.py      the study file format -> Study (validated runs, each with its arm, seed, tuned values)
    runner.py    run what is left (locally, in parallel), print / launch commands, write a SLURM array
    results.py   each run's outcome from its run directory; each arm's best setting
    figure_data.py  the rows behind each figure (FigureData)
    orderings.py    what the figures say, in words (what beats what, and whether every seed agrees)
    report.py    the result tables (runs, arms, each figure's rows) as CSV and Markdown
    figures.py   the PNGs (matplotlib), drawn from figure_data.FigureData

`tools/study.py` is the command line.
"""
