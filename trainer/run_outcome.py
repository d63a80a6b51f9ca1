"""How a run ended, for tools that read run directories (tools/study.py): the divergence marker.

A run that stops on a non-finite loss or gradient norm writes DIVERGED_FILE ({"step", "message"})
into its run directory: that outcome is a result (the settings diverge), not an interruption to
resume. A later start of the same run directory (e.g. with a lower --optim.lr, which a resume may
change) removes it. A completed run needs no marker: its final evaluation in metrics.jsonl says so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from trainer.run_lock import write_file_atomic

DIVERGED_FILE = "diverged.json"


def write_marker(path: Path, fields: dict[str, Any]) -> None:
    """Write a JSON marker file atomically (this module's, and the study runner's failed marker)."""
    write_file_atomic(path, (json.dumps(fields) + "\n").encode())


def read_marker(path: Path, unreadable: dict[str, Any]) -> dict[str, Any] | None:
    """A JSON marker's contents, or None when there is none. An unreadable marker still says what it
    marks: `unreadable` (the marker's fields, blank) plus a message naming the file."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {**unreadable, "message": f"{path} is unreadable"}
    return data if isinstance(data, dict) else {**unreadable, "message": str(data)}


def mark_diverged(run_dir: Path, step: int, message: str) -> None:
    write_marker(run_dir / DIVERGED_FILE, {"step": step, "message": message})


def clear_diverged(run_dir: Path) -> None:
    (run_dir / DIVERGED_FILE).unlink(missing_ok=True)


def read_diverged(run_dir: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the run has not diverged (or was started again since)."""
    return read_marker(run_dir / DIVERGED_FILE, {"step": None})
