"""Metrics sinks of the main rank: a console line, TensorBoard scalars and metrics.jsonl.

metrics.jsonl holds one JSON object per logged step ({"step": s, "train/loss": ..., ...}); tools
and plots read it. On resume, records of steps after the resumed checkpoint are dropped (they are
about to be recomputed), and TensorBoard purges them likewise, so each step appears once.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self.writer = None
        if not enabled:
            return
        if resume_step > 0:
            self._truncate_after(resume_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step if resume_step > 0 else None)
        self._file = open(self.path, "a")

    def _truncate_after(self, step: int) -> None:
        kept = [r for r in read_metrics(self.path) if r["step"] <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps({"step": step, **values}) + "\n")
        self._file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def console(self, step: int, max_steps: int, values: dict[str, float], elapsed: float, eta: float | None) -> None:
        if not self.enabled:
            return
        parts = [f"step {step:>6}/{max_steps}"]
        for key, label, fmt in (
            ("train/loss", "loss", "{:.4f}"),
            ("train/lr", "lr", "{:.2e}"),
            ("train/grad_norm", "gnorm", "{:.3f}"),
            ("throughput/tokens_per_s", "tok/s", "{:,.0f}"),
            ("throughput/mfu", "mfu", "{:.1%}"),
        ):
            if key in values and values[key] is not None and not math.isnan(values[key]):
                parts.append(f"{label} {fmt.format(values[key])}")
        parts.append(f"elapsed {_fmt_duration(elapsed)}")
        if eta is not None:
            parts.append(f"eta {_fmt_duration(eta)}")
        print(" | ".join(parts), flush=True)

    def print(self, message: str) -> None:
        if self.enabled:
            print(message, flush=True)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            self.writer.close()
