"""metrics.jsonl: resume truncation, repair of a line cut short by a crash, damage inside the file
named with its line, and write errors (a full disk) as clear errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers.disk import fill, small_tmpfs
from trainer.metrics import MetricsFileError, MetricsLogger, read_metrics
from trainer.run_lock import RunDirError


def write_records(path: Path, steps, tail: bytes = b"") -> None:
    path.write_bytes(b"".join(json.dumps({"step": s, "train/loss": 1.0 / s}).encode() + b"\n" for s in steps) + tail)


def logger(run_dir: Path, resume_step: int, enabled: bool = True) -> MetricsLogger:
    return MetricsLogger(run_dir, enabled=enabled, tensorboard=False, resume_step=resume_step)


def steps(path: Path) -> list[int]:
    return [r["step"] for r in read_metrics(path)]


def test_resume_drops_later_records_and_appends_whole_lines(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 7))
    log = logger(tmp_path, resume_step=3)
    log.log(4, {"train/loss": 0.5})
    log.close()
    assert steps(path) == [1, 2, 3, 4] and path.read_bytes().endswith(b"\n")
    assert capsys.readouterr().out == ""  # nothing to warn about
    assert not list(tmp_path.glob("*.tmp"))


def _tensorboard_steps(run_dir: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def test_tensorboard_shows_each_step_once_as_metrics_jsonl_does(tmp_path):
    """A resume at step 3 keeps step 3's scalars and replaces those after it; a fresh start (no checkpoint) hides
    every earlier scalar, as metrics.jsonl starts afresh."""

    def run(resume_step: int, values: dict[int, float]) -> None:
        log = MetricsLogger(tmp_path, enabled=True, tensorboard=True, resume_step=resume_step)
        for step, value in values.items():
            log.log(step, {"train/loss": value})
        log.close()

    run(0, {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 5: 5.0})
    run(3, {4: 40.0, 5: 50.0})
    assert _tensorboard_steps(tmp_path) == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0)]
    assert steps(tmp_path / "metrics.jsonl") == [1, 2, 3, 4, 5]
    run(0, {1: 0.5, 2: 0.25})
    assert _tensorboard_steps(tmp_path) == [(1, 0.5), (2, 0.25)]


def test_a_line_cut_short_by_a_crash_is_dropped_with_a_warning(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 6), tail=b'{"step": 6, "train/lo')
    assert steps(path) == [1, 2, 3, 4, 5]  # readers leave the incomplete line out, without an error
    log = logger(tmp_path, resume_step=5)
    out = capsys.readouterr().out
    assert f"warning: {path}: dropped an incomplete last line, left by a crash during a write" in out
    assert "train/lo" in out
    log.log(6, {"train/loss": 0.1})
    log.close()
    assert steps(path) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("tail", [b"\0" * 37, b'{"step": 6, "train/loss": 0.1}'], ids=["zeros", "no-newline"])
def test_a_tail_without_newline_is_repaired_before_appending(tmp_path, tail):
    """Zeros left by a power loss are dropped; a complete record that lacks only its newline is kept
    (and the next record is not glued onto it)."""
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 6), tail=tail)
    log = logger(tmp_path, resume_step=6)
    log.log(7, {"train/loss": 0.1})
    log.close()
    expected = [1, 2, 3, 4, 5, 7] if tail.startswith(b"\0") else [1, 2, 3, 4, 5, 6, 7]
    assert steps(path) == expected


def test_a_damaged_line_inside_the_file_is_named_with_its_number(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 6))
    lines = path.read_bytes().split(b"\n")
    lines[2] = b'{"step": 3, "train/loss": 0.3'  # line 3 cut short, yet followed by more lines
    path.write_bytes(b"\n".join(lines))
    expected = rf"{path}, line 3: not a metrics record .* Fix or delete line 3"
    with pytest.raises(MetricsFileError, match=expected) as damaged:
        logger(tmp_path, resume_step=4)
    assert isinstance(damaged.value, RunDirError) and isinstance(damaged.value, ValueError)
    with pytest.raises(MetricsFileError, match=expected):
        read_metrics(path)
    path.write_text('{"step": 1}\n["not", "a", "record"]\n')
    with pytest.raises(MetricsFileError, match=r"line 2: not a metrics record \(not a JSON object with an integer"):
        read_metrics(path)


@pytest.mark.parametrize("step", ["true", "2.0", '"2"'])
def test_a_step_that_is_not_an_integer_is_damage(tmp_path: Path, step: str) -> None:
    """JSON's true is a Python bool, an int subclass: not a step either."""
    path = tmp_path / "metrics.jsonl"
    path.write_text(f'{{"step": 1}}\n{{"step": {step}, "train/loss": 0.5}}\n{{"step": 3}}\n')
    with pytest.raises(
        MetricsFileError, match=r"line 2: not a metrics record \(not a JSON object with an integer step"
    ):
        read_metrics(path)


def test_a_fresh_start_drops_the_records_of_an_attempt_without_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    write_records(path, range(1, 3))
    log = logger(tmp_path, resume_step=0)
    assert f"warning: {path}: dropped 2 records of an earlier start" in capsys.readouterr().out
    log.log(1, {"train/loss": 0.5})
    log.close()
    assert steps(path) == [1]


def test_a_fresh_start_drops_the_step_0_evaluation_of_the_earlier_start_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The evaluation before the first step is logged at step 0: a fresh start logs it again, once."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val/loss": 5.0}\n{"step": 1, "train/loss": 4.0}\n')
    log = logger(tmp_path, resume_step=0)
    assert f"warning: {path}: dropped 2 records of an earlier start" in capsys.readouterr().out
    log.log(0, {"val/loss": 5.5})
    log.close()
    assert path.read_text() == '{"step": 0, "val/loss": 5.5}\n'


def test_a_disabled_logger_reads_and_writes_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\nnot json\n{"step": 2')
    log = logger(tmp_path, resume_step=1, enabled=False)
    log.log(2, {"train/loss": 0.5})
    log.close()
    assert path.read_bytes() == b'{"step": 1}\nnot json\n{"step": 2'


@pytest.fixture
def small_disk(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        yield disk


def test_a_full_disk_on_resume_and_while_logging_is_a_clear_error(small_disk):
    """The probe: the re-run failed writing metrics.jsonl.tmp. Now a RunDirError, no temporary file
    left, the log unchanged; and while logging, the file keeps whole records only."""
    path = small_disk / "metrics.jsonl"
    write_records(path, range(1, 6), tail=b'{"step": 6, "tr')
    before = path.read_bytes()
    filler = small_disk / "filler"
    fill(filler)
    with pytest.raises(RunDirError, match=rf"cannot write {path} .*No space left on device\. It is unchanged\. Free"):
        logger(small_disk, resume_step=3)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "metrics.jsonl"]
    assert path.read_bytes() == before
    filler.unlink()

    log = logger(small_disk, resume_step=3)
    fill(filler)
    with pytest.raises(RunDirError, match=rf"cannot append step 4's metrics to {path}: No space left on device"):
        log.log(4, {f"pad/{i}": 0.0 for i in range(1000)})  # 15 KB: more than the slack of its last page
    log.close()
    assert steps(path) == [1, 2, 3] and path.read_bytes().endswith(b"\n")
    filler.unlink()
    log = logger(small_disk, resume_step=3)
    log.log(4, {"train/loss": 0.5})
    log.close()
    assert steps(path) == [1, 2, 3, 4]


def test_the_console_line_shows_each_value_and_the_times(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Elapsed and ETA as [h:]mm:ss (hours only from one hour on), an ETA of 0 at the last step shown too, and a
    value that is missing, None or NaN left out."""
    log = logger(tmp_path, resume_step=0)
    values = {
        "train/loss": 2.5,
        "train/lr": 3e-4,
        "train/grad_norm": 1.25,
        "throughput/tokens_per_s": 12345.6,
        "throughput/mfu": 0.4321,
        "tokens_seen": 7.0,
    }
    log.console(7, 100, values, elapsed=3725.9, eta=59.0)
    ended: dict[str, float] = {"train/loss": float("nan"), "train/grad_norm": None}  # type: ignore[dict-item]
    log.console(100, 100, ended, elapsed=7199.0, eta=0.0)
    log.console(3, 100, {}, elapsed=61.0, eta=None)
    log.close()
    assert capsys.readouterr().out.splitlines() == [
        "step      7/100 | loss 2.5000 | lr 3.00e-04 | gnorm 1.250 | tok/s 12,346 | mfu 43.2% | elapsed 1:02:05 "
        "| eta 00:59",
        "step    100/100 | elapsed 1:59:59 | eta 00:00",
        "step      3/100 | elapsed 01:01",
    ]


class ClosedPipe:
    """A standard output whose reader has gone away (`| head` exited): every write is a BrokenPipeError."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_closed_console_calls_back_once_and_later_messages_go_to_stderr(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first print that meets the closed pipe calls on_stdout_closed (the trainer saves and stops), once;
    later step lines are dropped (the records keep them), other messages go to stderr, the records go on."""
    calls: list[int] = []
    log = MetricsLogger(
        tmp_path, enabled=True, tensorboard=False, resume_step=0, on_stdout_closed=lambda: calls.append(1)
    )
    stdout = ClosedPipe()
    monkeypatch.setattr(sys, "stdout", stdout)
    log.console(1, 10, {"train/loss": 2.0}, elapsed=1.0, eta=9.0)
    assert calls == [1] and stdout.writes == 1
    log.console(2, 10, {"train/loss": 1.5}, elapsed=2.0, eta=8.0)
    log.print("step      2/10 | val loss 1.4000 | val ppl 4.06")
    log.log(2, {"train/loss": 1.5})
    log.close()
    assert calls == [1] and stdout.writes == 1  # nothing more tried the closed pipe
    err = capsys.readouterr().err
    assert err.count("warning: the standard output was closed (its reader exited") == 1
    assert "val loss 1.4000" in err and "loss 1.5000" not in err
    assert steps(tmp_path / "metrics.jsonl") == [2]
