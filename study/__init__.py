"""Studies: from a study file (arms x grids x seeds, figures) to runs, result tables and figures.

    spec.py      the study file format -> Study (validated runs, each with its arm, seed, tuned values)
    runner.py    run what is left (locally, in parallel), print / launch commands, write a SLURM array
    results.py   each run's outcome from its run directory; per-arm best settings; the tables behind figures
    figures.py   the PNGs (matplotlib), drawn from results.FigureData

`tools/study.py` is the command line.
"""
