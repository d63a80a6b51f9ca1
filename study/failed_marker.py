"""The runner's failed marker: a run whose process exited non-zero without the trainer's divergence marker.

The study's runner writes FAILED_FILE ({"exit_code": int, "message": str}) into the run directory
and removes it when the run starts again; study.results reads it. It lives here, not in runner.py,
because the runner reads results (which runs are left) and results read this marker: defining it in
either would make the two import each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.run_outcome import read_marker

FAILED_FILE = "failed.json"


def read_failed(run_dir: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when there is none. An unreadable marker still says the run failed
    ({"exit_code": None, "message": "<path> is unreadable"}): the runner did write one."""
    return read_marker(run_dir / FAILED_FILE, {"exit_code": None})
