"""study/runner.py: command lines, setup steps, the SLURM script, the failed marker, local runs with fake
trainers (seconds), progress and ETA arithmetic; and the trainer's outcome files the study reads
(diverged.json, memory/optimizer_state_bytes)."""

from __future__ import annotations

import io
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from study import runner
from study.runner import (
    FAILED_FILE,
    REPO,
    StudyRunError,
    child_env,
    command,
    eta_seconds,
    format_duration,
    mark_failed,
    run_local,
    run_setup,
    runs_left,
    setup_left,
    write_slurm,
)
from study.spec import SetupStep, Study, StudyRun
from tests.helpers.runs import run as train_tiny
from trainer.config import load_config
from trainer.run_outcome import DIVERGED_FILE

TINY = REPO / "configs" / "tiny.yaml"


def make_run(run_dir: Path, lr: float = 0.01, seed: int = 0, max_steps: int = 6, entry: str = "AdamW") -> StudyRun:
    overrides = [f"--optim.lr={lr}", f"--train.max_steps={max_steps}", f"--run.dir={run_dir}"]
    return StudyRun(
        entry=entry,
        arm=entry,
        seed=seed,
        tuned={"optim.lr": lr},
        config_path=TINY,
        overrides=overrides,
        config=load_config(TINY, overrides),
        run_dir=run_dir,
    )


def make_study(tmp_path: Path, runs: list[StudyRun], setup: list[SetupStep] | None = None) -> Study:
    return Study(
        path=tmp_path / "s.yaml",
        name="s",
        out=tmp_path / "out",
        runs=runs,
        figures=[],
        setup=setup or [],
        seeds=[],
        entries=sorted({r.entry for r in runs}),
    )


def fake_launcher(code: str) -> str:
    """A launcher that runs `code` with this Python instead of the trainer (train.py and the rest of the
    command become ignored arguments); `RUN_DIR` in `code` is the run directory (the last argument)."""
    prelude = "import sys, pathlib; RUN_DIR = pathlib.Path(sys.argv[-1].split('=', 1)[1]); "
    return shlex.join([sys.executable, "-c", prelude + code])


def complete_run_code(max_steps: int = 6) -> str:
    """Python that writes a metrics.jsonl with the final evaluation, as a finished trainer does."""
    records = [{"step": s, "train/loss": 5.0} for s in range(1, max_steps + 1)] + [{"step": max_steps, "val/loss": 4.0}]
    text = "".join(json.dumps(r) + "\n" for r in records)
    return f"(RUN_DIR / 'metrics.jsonl').write_text({text!r}); print('trained')"


# ----- command lines, setup, SLURM ------------------------------------------------------------------------


def test_command_is_the_launcher_then_train_py_with_a_repo_relative_config(tmp_path):
    run = make_run(tmp_path / "r")
    cmd = command(run, "torchrun --nproc_per_node=8 --master_port='29 500'")
    assert cmd == [
        "torchrun",
        "--nproc_per_node=8",
        "--master_port=29 500",
        "train.py",
        "configs/tiny.yaml",
        "--optim.lr=0.01",
        "--train.max_steps=6",
        f"--run.dir={tmp_path / 'r'}",
    ]
    outside = tmp_path / "own.yaml"
    outside.write_text(TINY.read_text())
    run = StudyRun(**{**run.__dict__, "config_path": outside})
    assert command(run, "python")[:3] == ["python", "train.py", str(outside)]


def test_setup_runs_each_step_once_and_skips_what_exists(tmp_path):
    made, skipped = tmp_path / "made", tmp_path / "exists"
    skipped.write_text("")
    sentinel = tmp_path / "should_not_run"
    study = make_study(
        tmp_path,
        [],
        [SetupStep(f"touch {sentinel}", creates=str(skipped)), SetupStep(f"touch {made}", creates=str(made))],
    )
    out = io.StringIO()
    run_setup(study, out)
    assert made.exists() and not sentinel.exists()
    assert f"setup: {skipped} exists, skipping" in out.getvalue()
    made.unlink()
    run_setup(study, io.StringIO())  # runs again only because its output is gone
    assert made.exists()
    # `python` in a step is the interpreter of the study, not whatever python is first on PATH.
    which = tmp_path / "which"
    run_setup(make_study(tmp_path, [], [SetupStep(f"python -c 'import sys; print(sys.prefix)' > {which}")]))
    assert which.read_text().strip() == sys.prefix


def test_a_creates_path_under_the_cache_follows_memopt_cache(tmp_path, monkeypatch):
    """The data tools write `.cache/...` into MEMOPT_CACHE (data.paths.resolve_path): the step's check looks there."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("MEMOPT_CACHE", str(cache))
    step = SetupStep(
        f"mkdir -p {cache}/tokens/x && touch {cache}/tokens/x/manifest.json", creates=".cache/tokens/x/manifest.json"
    )
    study = make_study(tmp_path, [], [step])
    assert setup_left(study) == [step]
    run_setup(study, io.StringIO())  # no "did not create": it looks where the command wrote
    assert setup_left(study) == [] and (cache / "tokens" / "x" / "manifest.json").exists()


def test_a_failing_setup_step_is_an_error_naming_it(tmp_path):
    study = make_study(tmp_path, [], [SetupStep("exit 3")])
    with pytest.raises(StudyRunError, match=r"exited with 3: 'exit 3'; fix the command"):
        run_setup(study, io.StringIO())
    study = make_study(tmp_path, [], [SetupStep("true", creates=str(tmp_path / "nothing"))])
    with pytest.raises(StudyRunError, match=r"did not create .*nothing: 'true'; fix its `creates:` path"):
        run_setup(study, io.StringIO())


def test_slurm_script_is_an_array_of_the_runs_that_bash_accepts_and_runs(tmp_path):
    runs = [make_run(tmp_path / f"lr{lr}", lr) for lr in (0.001, 0.01, 0.1)]
    study = make_study(tmp_path, runs)
    script = tmp_path / "jobs" / "study.sbatch"
    out = io.StringIO()
    launcher = fake_launcher("print('task ran', sys.argv[1:])")
    write_slurm(study, runs, launcher, script, ["--gres=gpu:8", "--time=24:00:00"], max_parallel=2, out=out)
    text = script.read_text()
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    assert "#SBATCH --array=0-2%2" in lines
    assert "#SBATCH --gres=gpu:8" in lines and "#SBATCH --time=24:00:00" in lines
    assert "#SBATCH --job-name=study-s" in lines
    assert f"cd {REPO}" in lines
    slurm_dir = (tmp_path / "out" / "slurm").resolve()
    assert f"#SBATCH --output={slurm_dir}/%A_%a.out" in lines and slurm_dir.is_dir()  # sbatch does not create it
    assert all(shlex.quote(shlex.join(command(r, launcher))) in text for r in runs)
    assert os.access(script, os.X_OK)
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert f"submit with: sbatch {script}" in out.getvalue()
    # Task 1 runs the second command, from the repo root, its output appended to that run's train.log.
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "1"}
    assert subprocess.run(["bash", str(script)], env=env, cwd=tmp_path).returncode == 0
    log = (tmp_path / "lr0.01" / "train.log").read_text()
    assert "task ran" in log and "--optim.lr=0.01" in log
    assert not (tmp_path / "lr0.001" / "train.log").exists()


def test_slurm_refuses_no_runs_and_options_that_are_not_sbatch_options(tmp_path):
    run = make_run(tmp_path / "r")
    with pytest.raises(StudyRunError, match="nothing is left to run"):
        write_slurm(make_study(tmp_path, []), [], "python", tmp_path / "x.sbatch")
    with pytest.raises(StudyRunError, match=r"'gres=gpu:8' is not an sbatch option.*--gres=gpu:8"):
        write_slurm(make_study(tmp_path, [run]), [run], "python", tmp_path / "x.sbatch", ["gres=gpu:8"])


# ----- markers, progress, environment -----------------------------------------------------------------------


def test_failed_marker_keeps_the_exit_code_and_last_error_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("step 1\nerror: data dir missing: run make data\nTraceback...\n  last line\n")
    mark_failed(tmp_path, 1, log)
    assert json.loads((tmp_path / FAILED_FILE).read_text()) == {
        "exit_code": 1,
        "message": "error: data dir missing: run make data",
    }
    log.write_text("Killed\n")
    mark_failed(tmp_path, -9, log)
    assert json.loads((tmp_path / FAILED_FILE).read_text()) == {"exit_code": -9, "message": "Killed"}


def test_failed_marker_message_is_the_last_error_line_else_the_last_line_else_the_exit_code(tmp_path: Path) -> None:
    log = tmp_path / "train.log"
    log.write_text("error: a warning-like first error\nstep 2\nerror: out of memory: lower the batch\n  detail\n\n")
    mark_failed(tmp_path, 1, log)
    assert json.loads((tmp_path / FAILED_FILE).read_text())["message"] == "error: out of memory: lower the batch"
    log.write_text("starting\nstep 1\nSegmentation fault\n\n")
    mark_failed(tmp_path, -11, log)
    assert json.loads((tmp_path / FAILED_FILE).read_text())["message"] == "Segmentation fault"
    log.unlink()
    mark_failed(tmp_path, -9, log)
    assert json.loads((tmp_path / FAILED_FILE).read_text()) == {
        "exit_code": -9,
        "message": "exited with -9, nothing logged",
    }


def test_eta_is_remaining_steps_times_measured_seconds_per_step_over_jobs():
    assert eta_seconds(finished_seconds=30.0, finished_steps=10, remaining_steps=20, jobs=1) == 60.0
    assert eta_seconds(finished_seconds=30.0, finished_steps=10, remaining_steps=20, jobs=2) == 30.0
    assert eta_seconds(finished_seconds=30.0, finished_steps=0, remaining_steps=20, jobs=2) is None
    assert eta_seconds(finished_seconds=30.0, finished_steps=10, remaining_steps=-3, jobs=1) == 0.0
    assert format_duration(65.4) == "01:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "--:--"
    assert format_duration(59.6) == "01:00" and format_duration(3599.6) == "1:00:00"  # rounded, not cut


def test_children_get_cores_divided_by_jobs_openmp_threads_unless_set(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert child_env(4)["OMP_NUM_THREADS"] == "4"
    assert child_env(32)["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert child_env(4)["OMP_NUM_THREADS"] == "3"


# ----- local runs (fake trainers: seconds) ------------------------------------------------------------------


def test_run_local_marks_failed_and_diverged_runs_and_goes_on(tmp_path):
    # lr picks the behaviour: 0.1 exits 2 with an error; 1.0 diverges (the trainer's marker, exit 1); else trains.
    code = (
        "lr = float(sys.argv[sys.argv.index('train.py') + 2].split('=')[1]); RUN_DIR.mkdir(exist_ok=True)\n"
        "if lr == 0.1: print('error: boom'); sys.exit(2)\n"
        'if lr == 1.0: (RUN_DIR / \'diverged.json\').write_text(\'{"step": 3, "message": "nan"}\'); sys.exit(1)\n'
        + complete_run_code()
    )
    runs = [make_run(tmp_path / f"lr{lr}", lr) for lr in (0.01, 0.1, 1.0)]
    study = make_study(tmp_path, runs)
    assert runs_left(study) == runs
    out = io.StringIO()
    summary = run_local(study, runs, fake_launcher(code), jobs=2, out=out)
    assert summary.stopped_by is None and summary.exit_code == 0
    assert {k: [r.tuned["optim.lr"] for r in v] for k, v in summary.outcomes.items()} == {
        "done": [0.01],
        "failed": [0.1],
        "diverged": [1.0],
    }
    assert json.loads((tmp_path / "lr0.1" / FAILED_FILE).read_text()) == {"exit_code": 2, "message": "error: boom"}
    assert not (tmp_path / "lr1.0" / FAILED_FILE).exists()  # diverged: the trainer's marker says so
    text = out.getvalue()
    assert "[1/3] start AdamW optim.lr=0.01 seed 0 -> " in text
    assert "done AdamW optim.lr=0.01 seed 0 in " in text and "failed AdamW optim.lr=0.1 seed 0" in text
    assert "left 0 | ETA 00:00" in text
    assert "trained" in (tmp_path / "lr0.01" / "train.log").read_text()
    # Only the failed run is left; starting it again removes its marker (here it fails the same way again).
    assert runs_left(study) == [runs[1]]
    (tmp_path / "lr0.1" / FAILED_FILE).write_text("stale")
    summary = run_local(study, [runs[1]], fake_launcher(complete_run_code()), out=io.StringIO())
    assert list(summary.outcomes) == ["done"] and not (tmp_path / "lr0.1" / FAILED_FILE).exists()
    assert runs_left(study) == []


def test_run_local_refuses_fewer_than_one_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def wait(seconds: float) -> None:
        raise AssertionError("run_local waits for runs it can never start")

    monkeypatch.setattr(runner, "time", SimpleNamespace(sleep=wait, monotonic=time.monotonic))
    run = make_run(tmp_path / "r")
    with pytest.raises(StudyRunError, match=r"^--jobs must be at least 1, got 0$"):
        run_local(make_study(tmp_path, [run]), [run], fake_launcher(complete_run_code()), jobs=0, out=io.StringIO())
    assert not (tmp_path / "r").exists()


def test_an_interrupted_run_is_left_resumes_with_its_log_kept_and_the_eta_counts_this_sessions_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resumed, new, diverged = (make_run(tmp_path / f"lr{lr}", lr) for lr in (0.01, 0.1, 1.0))
    resumed.run_dir.mkdir()
    (resumed.run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "train/loss": 5.0}) + "\n" for s in (1, 2, 3))
    )
    (resumed.run_dir / "train.log").write_text("the first attempt\n")
    diverged.run_dir.mkdir()
    (diverged.run_dir / DIVERGED_FILE).write_text('{"step": 2, "message": "nan"}')
    study = make_study(tmp_path, [resumed, new, diverged])
    assert runs_left(study) == [resumed, new]  # incomplete and pending; a diverged run is a result
    clock = itertools.count(0.0, 30.0)  # each reading of the clock: 30 s later
    monkeypatch.setattr(runner, "time", SimpleNamespace(sleep=time.sleep, monotonic=lambda: next(clock)))
    monkeypatch.setattr(runner, "POLL_SECONDS", 0.01)
    out = io.StringIO()
    run_local(study, [resumed, new], fake_launcher(complete_run_code()), jobs=1, out=out)
    # The resumed run did steps 4-6 in 30 s (10 s a step): the new run's 6 steps take 60 s.
    assert [line for line in out.getvalue().splitlines() if " done " in line] == [
        "[1/2] done AdamW optim.lr=0.01 seed 0 in 30.0 s | left 1 | ETA 01:00",
        "[2/2] done AdamW optim.lr=0.1 seed 0 in 30.0 s | left 0 | ETA 00:00",
    ]
    log = (resumed.run_dir / "train.log").read_text()
    assert log.startswith("the first attempt\n# ") and "trained" in log  # appended to, not replaced
    assert runs_left(study) == []


def test_a_stopped_study_starts_nothing_more_keeps_the_first_signal_and_marks_no_interrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # lr 0.01 exits 1 on SIGTERM (interrupted, not failed); 0.1 ignores SIGTERM and exits once the test
    # creates `release`; 1.0, were it started, trains at once.
    code = (
        "import signal, time; lr = float(sys.argv[sys.argv.index('train.py') + 2].split('=')[1]); "
        "RUN_DIR.mkdir(exist_ok=True)\n"
        "if lr == 1.0: " + complete_run_code() + "; sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, (lambda *a: sys.exit(1)) if lr == 0.01 else signal.SIG_IGN)\n"
        "(RUN_DIR / 'ready').write_text(''); t0 = time.time()\n"
        "while not (RUN_DIR.parent / 'release').exists() and time.time() - t0 < 30: time.sleep(0.01)\n"
    )
    runs = [make_run(tmp_path / f"lr{lr}", lr) for lr in (0.01, 0.1, 1.0)]
    out = io.StringIO()
    signalled = False

    def poll(seconds: float) -> None:
        """The study's wait between polls: Ctrl-C then SIGTERM once both runs are up; `release` once the
        study reported the end of the first run (so it has been through its start loop since)."""
        nonlocal signalled
        time.sleep(0.01)
        if not signalled and all((tmp_path / f"lr{lr}" / "ready").exists() for lr in (0.01, 0.1)):
            signalled = True
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)
        if any(line.startswith("[1/3] ") and " start " not in line for line in out.getvalue().splitlines()):
            (tmp_path / "release").touch()

    monkeypatch.setattr(runner, "time", SimpleNamespace(sleep=poll, monotonic=time.monotonic))
    summary = run_local(make_study(tmp_path, runs), runs, fake_launcher(code), jobs=2, out=out)
    assert summary.stopped_by == signal.SIGINT and summary.exit_code == 130  # the first signal
    assert {k: [r.tuned["optim.lr"] for r in v] for k, v in summary.outcomes.items()} == {"stopped": [0.01, 0.1]}
    assert not (tmp_path / "lr1.0").exists()  # never started, though a slot was free after the first run ended
    assert not (tmp_path / "lr0.01" / FAILED_FILE).exists()  # exit code 1 while stopping: interrupted
    assert out.getvalue().count("study: got ") == 1 and "study: got SIGINT;" in out.getvalue()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_stops_the_study_after_forwarding_it_to_the_running_runs(tmp_path):
    # The fake trainer saves "a checkpoint" and exits 0 on SIGTERM, as the trainer does.
    code = (
        "import signal, time; RUN_DIR.mkdir(exist_ok=True)\n"
        "signal.signal(signal.SIGTERM, lambda *a: ((RUN_DIR / 'got_sigterm').write_text(''), sys.exit(0)))\n"
        "(RUN_DIR / 'metrics.jsonl').write_text('{\"step\": 1, \"train/loss\": 5.0}\\n')\n"
        "time.sleep(60)\n"
    )
    runs = [make_run(tmp_path / f"lr{lr}", lr) for lr in (0.01, 0.1)]
    study = make_study(tmp_path, runs)

    def stop_soon() -> None:
        deadline = time.time() + 30
        while not (tmp_path / "lr0.01" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_soon, daemon=True).start()
    out = io.StringIO()
    t0 = time.monotonic()
    summary = run_local(study, runs, fake_launcher(code), jobs=1, out=out)
    assert time.monotonic() - t0 < 30
    assert summary.stopped_by == signal.SIGTERM and summary.exit_code == 143
    assert (tmp_path / "lr0.01" / "got_sigterm").exists()
    assert not (tmp_path / "lr0.1").exists()  # never started
    assert not (tmp_path / "lr0.01" / FAILED_FILE).exists()
    assert "got SIGTERM; asking 1 running run(s) to save and stop" in out.getvalue()
    assert "[1/2] stopped AdamW optim.lr=0.01 seed 0" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the study's handler is gone


# ----- what the trainer writes for the study ----------------------------------------------------------------


def test_a_diverging_run_writes_diverged_json_and_a_restart_removes_it(tmp_path, sample_tokens):
    from trainer.trainer import TrainingDiverged

    with pytest.raises(TrainingDiverged, match="non-finite"):
        train_tiny(tmp_path, sample_tokens, **{"optim.lr": 1e3, "train.max_steps": 4})
    marker = json.loads((tmp_path / "run" / DIVERGED_FILE).read_text())
    assert isinstance(marker["step"], int) and 1 <= marker["step"] <= 4
    assert marker["message"].startswith("non-finite") and "optim.lr=1000 is too high" in marker["message"]
    train_tiny(tmp_path, sample_tokens, **{"optim.lr": 1e-3, "train.max_steps": 4})  # started again, lower lr
    assert not (tmp_path / "run" / DIVERGED_FILE).exists()


def test_metrics_log_the_measured_optimizer_state_bytes(tmp_path, sample_tokens):
    from model import Transformer
    from optim.state_bytes import formula_state_bytes
    from trainer.metrics import read_metrics

    cfg, _ = train_tiny(tmp_path, sample_tokens, **{"train.max_steps": 2, "eval.interval": 0})
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    logged = [r["memory/optimizer_state_bytes"] for r in records if "memory/optimizer_state_bytes" in r]
    model = Transformer(cfg.model)
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW: exp_avg and exp_avg_sq in fp32 (8 bytes per weight) + a 4-byte step tensor per parameter.
    expected = 8 * sum(p.numel() for p in params) + 4 * len(params)
    assert logged and all(v == expected for v in logged)
    assert expected == formula_state_bytes(model, cfg.optim)
