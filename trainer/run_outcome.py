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


def mark_diverged(run_dir: Path, step: int, message: str) -> None:
    write_file_atomic(run_dir / DIVERGED_FILE, (json.dumps({"step": step, "message": message}) + "\n").encode())


def clear_diverged(run_dir: Path) -> None:
    (run_dir / DIVERGED_FILE).unlink(missing_ok=True)


def read_diverged(run_dir: Path) -> dict[str, Any] | None:
    """The marker's contents, or None when the run has not diverged (or was started again since)."""
    path = run_dir / DIVERGED_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"step": None, "message": f"{path} is unreadable"}
    return data if isinstance(data, dict) else {"step": None, "message": str(data)}
