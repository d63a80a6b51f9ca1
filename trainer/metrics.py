"""Metrics sinks of the main rank: a console line, TensorBoard scalars and metrics.jsonl.

metrics.jsonl holds one JSON object per logged step ({"step": s, "train/loss": ..., ...}), one line
each, written with one unbuffered write; tools and plots read it. On resume, records of steps after
the resumed checkpoint are dropped (they are about to be recomputed), and TensorBoard purges them
likewise, so each step appears once; a run that starts again at step 0 (no checkpoint to resume
from) starts the file afresh, and TensorBoard hides the earlier start's scalars (its files stay on disk).

A crash during a write can leave an incomplete last line (no newline): `read_metrics` leaves it
out and the next resume drops it with a warning. Any other line that is not a record is damage
that no crash of this writer makes: a MetricsFileError naming the file and the line. An OSError
while writing (disk full) is a RunDirError; the file keeps every complete record.

When the console's reader goes away (`python train.py ... | head`, a killed `tee`), a print raises
BrokenPipeError. A crash there would lose the steps since the last checkpoint, so the logger calls
`on_stdout_closed` instead (the trainer then saves and stops, as on SIGTERM), and its later messages go
to stderr. The metrics.jsonl and TensorBoard records are unaffected.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.console import print_to_stderr, silence_closed_stdout
from trainer.run_lock import RunDirError, os_error_fix, write_file_atomic


class MetricsFileError(RunDirError, ValueError):
    """A line of metrics.jsonl that is not a metrics record; the message names the file, the line
    and the fix. A ValueError too, as json's errors were before."""


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


@dataclass
class _Contents:
    records: list[dict]
    partial: bytes  # an incomplete last line (no newline, not a record): b"" if none
    missing_newline: bool  # the last line is a complete record without its newline


def _parse_record(path: Path, number: int, line: bytes) -> dict:
    try:
        record = json.loads(line)
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ValueError("not a JSON object with an integer step")
    except ValueError as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise MetricsFileError(
            f"{path}, line {number}: not a metrics record ({detail}): {line[:80]!r}. Only the last line can be "
            f"cut short by a crash, and it is repaired on resume; this one is damaged inside the file. Fix or "
            f"delete line {number} (or move {path.name} away to start the log afresh), then re-run."
        ) from None
    return record


def _read(path: Path) -> _Contents:
    lines = path.read_bytes().split(b"\n")
    records = [_parse_record(path, i, line) for i, line in enumerate(lines[:-1], 1) if line.strip()]
    last, partial, missing_newline = lines[-1], b"", False
    if last.strip(b" \t\r\x00"):  # text after the last newline: a complete record, or a crash artefact
        try:
            records.append(_parse_record(path, len(lines), last))
            missing_newline = True
        except MetricsFileError:
            partial = last
    elif last:  # only NUL bytes or blanks, e.g. zeros left by a power loss
        partial = last
    return _Contents(records, partial, missing_newline)


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl ([] if it does not exist). An incomplete last line (a write in
    progress, or a crash mid-write that the next resume repairs) is left out; any other line that is
    not a JSON object with an integer "step" is a MetricsFileError (a ValueError) naming the file
    and the line."""
    if not path.exists():
        return []
    return _read(path).records


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        *,
        enabled: bool,
        tensorboard: bool,
        resume_step: int,
        on_stdout_closed: Callable[[], None] | None = None,
    ):
        """The main rank's logger (`enabled`; other ranks get one that does nothing). On resume at
        `resume_step`, later records are dropped; at 0 (a fresh start), all are. A damaged
        metrics.jsonl is repaired (an incomplete last line, with a warning) or a MetricsFileError.
        `on_stdout_closed` is called once if the standard output's reader goes away."""
        self.enabled = enabled
        self.on_stdout_closed = on_stdout_closed
        self.stdout_closed = False
        self.path = run_dir / "metrics.jsonl"
        self.tb_dir = run_dir / "tensorboard"
        self.writer = None
        if not enabled:
            return
        self._repair_and_truncate(resume_step)
        try:
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                # TensorBoard hides the earlier events at steps >= purge_step, as the file drops those after
                # resume_step (the resumed checkpoint's own step keeps its records); 0: a fresh start hides all.
                self.writer = SummaryWriter(str(self.tb_dir), purge_step=resume_step + 1 if resume_step > 0 else 0)
            self._file = open(self.path, "ab", buffering=0)  # one write per record: no partial buffer to flush
        except OSError as e:
            raise RunDirError(
                f"cannot open the run's logs in {run_dir}: {e.strerror or e} ({e.filename or run_dir}). "
                f"{os_error_fix(e, run_dir)}."
            ) from None

    def _repair_and_truncate(self, step: int) -> None:
        """Drop records after `step` (all of them at step 0) and an incomplete last line."""
        if not self.path.exists():
            return
        contents = _read(self.path)
        kept = [r for r in contents.records if r["step"] <= step] if step > 0 else []
        dropped = len(contents.records) - len(kept)
        if contents.partial:
            self.print(
                f"warning: {self.path}: dropped an incomplete last line, left by a crash during a write: "
                f"{contents.partial[:80]!r}"
            )
        if step == 0 and dropped:
            self.print(
                f"warning: {self.path}: dropped {dropped} records of an earlier start: the run starts again at "
                f"step 0 (no checkpoint to resume from)"
            )
        if dropped or contents.partial or contents.missing_newline:
            write_file_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = (json.dumps({"step": step, **values}) + "\n").encode()
        fd = self._file.fileno()
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(line):
                written += os.write(fd, line[written:])
        except OSError as e:
            try:  # keep the file a sequence of whole records (a crash could still leave a partial line)
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise RunDirError(
                f"cannot append step {step}'s metrics to {self.path}: {e.strerror or e}. The records before it "
                f"are intact, and so are the checkpoints. {os_error_fix(e, self.path.parent)}."
            ) from None
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
        if not self.stdout_closed:  # step lines are not moved to stderr: the records keep them
            self._print_to_stdout(" | ".join(parts))

    def print(self, message: str) -> None:
        """A message to the console: stdout, or stderr once stdout's reader has gone away."""
        if not self.enabled:
            return
        if self.stdout_closed:
            print_to_stderr(message)
        else:
            self._print_to_stdout(message)

    def _print_to_stdout(self, text: str) -> None:
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self.stdout_closed = True
            if self.on_stdout_closed is not None:  # first: nothing below may keep the run from saving
                self.on_stdout_closed()
            silence_closed_stdout()  # later writes, and the last flush, would raise again
            print_to_stderr(
                "warning: the standard output was closed (its reader exited, e.g. `| head`): the run saves a "
                "checkpoint and stops; re-run the same command to resume"
            )

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:  # must not hide the error that ends the run (often the same full disk)
                self.print(f"warning: TensorBoard events in {self.tb_dir} may be incomplete: {e.strerror or e}")
