"""Run a study: what is left, here (one after another or N at a time), as printed or launched commands,
or as a SLURM array script.

A run is left when its results.run_result status is pending, incomplete or failed (a failed run is
tried again; a diverged one is a result and is not). Local runs start `train.py` (through
`launcher`) from the repo root with their stdout and stderr appended to <run_dir>/train.log; an
interrupted run resumes from its latest checkpoint (the trainer's resume). A run that exits
non-zero without the trainer's divergence marker gets FAILED_FILE (exit code and last error line)
in its run directory, removed when it starts again. Progress: one line per start and end (which
run, how many left, the ETA from the measured seconds per step of the runs finished so far).
"""

from __future__ import annotations

# Defined in study/failed_marker.py (study.results reads it, and this module reads results): no import cycle.
from study.failed_marker import FAILED_FILE as FAILED_FILE
