"""End-to-end runs as a user makes them: train.py and tools/prepare_data.py in subprocesses."""

import os
import re
import signal
import subprocess
import sys

import pytest

from tests.helpers.runs import REPO, losses, run, start_training, train_command
from trainer import checkpoint as ckpt


def test_sigterm_saves_and_exits_zero(tmp_path, sample_tokens):
    """Preemption signals the whole process group, DataLoader workers included."""
    run_dir = tmp_path / "run"
    cmd = train_command(
        run_dir,
        sample_tokens,
        **{"train.max_steps": 100000, "checkpoint.interval": 100000, "eval.interval": 0, "data.num_workers": 2},
    )
    proc = start_training(cmd, run_dir, steps=3, timeout=120, new_session=True)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None and "stop requested" in out
    assert ckpt.load_checkpoint(saved)["progress"]["step"] == max(losses(run_dir))


@pytest.mark.parametrize("stderr_to", ["own-pipe", "stdout", "closed-pipe"])
def test_a_closed_console_saves_and_stops_instead_of_crashing(tmp_path, sample_tokens, stderr_to):
    """`python train.py ... | head -3` (and `2>&1 | head -3`, and stderr's reader gone too, as when an ssh client
    dies): the reader exits, the next print meets a broken pipe. The run saves the step it reached, says so on
    stderr while stderr is read, exits 0, and the same command resumes from there."""
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, sample_tokens, **{"train.max_steps": 1000, "log.interval": 1})
    stderr = subprocess.STDOUT if stderr_to == "stdout" else subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None
    head = [proc.stdout.readline() for _ in range(3)]  # the header, then steps: what `head -3` shows
    if stderr_to == "closed-pipe":
        assert proc.stderr is not None
        proc.stderr.close()
    proc.stdout.close()
    err = proc.stderr.read() if stderr_to == "own-pipe" and proc.stderr is not None else ""
    assert proc.wait(timeout=120) == 0, err
    assert head[2].startswith("step") and "Traceback" not in err and "BrokenPipeError" not in err, err
    if stderr_to == "own-pipe":
        assert "warning: the standard output was closed" in err and "stop requested: saved" in err, err
    saved = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None
    step = ckpt.load_checkpoint(saved)["progress"]["step"]
    assert 1 <= step < 1000 and max(losses(run_dir)) == step  # every logged step is in the checkpoint
    resumed = subprocess.run(
        train_command(run_dir, sample_tokens, **{"train.max_steps": step + 2}),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert resumed.returncode == 0 and f"resumed from {saved}" in resumed.stdout + resumed.stderr, resumed
    assert max(losses(run_dir)) == step + 2
    # The summary spans the whole run, not only this start.
    assert re.search(rf"validation loss: \d+\.\d{{4}} at step 0 -> \d+\.\d{{4}} at step {step + 2}\n", resumed.stdout)


def test_ctrl_c_says_what_happens_next_and_a_ctrl_c_before_training_is_one_error_line(tmp_path, sample_tokens):
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, sample_tokens, **{"train.max_steps": 100000})
    proc = start_training(cmd, run_dir, steps=2, timeout=120)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "SIGINT: finishing this step, then saving and exiting (Ctrl-C again: exit at once, without saving)" in out
    assert out.count("stop requested: saved") == 1
    assert re.search(r"stopped at step \d+ of 100000: re-run the same command to resume", out), out
    # During the imports: no traceback, one error line, 130 as a shell reports Ctrl-C. `-X importtime` reports each
    # module as its import ends: a torch submodule's line means torch's import is under way (no sleep to guess it).
    early = subprocess.Popen(
        [sys.executable, "-X", "importtime", *cmd[1:]], cwd=REPO, stderr=subprocess.PIPE, text=True
    )
    assert early.stderr is not None
    for line in early.stderr:
        if line.startswith("import time:") and "torch." in line:
            break
    early.send_signal(signal.SIGINT)
    err = "".join(line for line in early.stderr if not line.startswith("import time:"))
    assert early.wait(timeout=120) == 130 and "Traceback" not in err, err
    assert err.strip().startswith("error: interrupted: exited at once, without saving"), err


def test_missing_data_is_a_clear_error(tmp_path):
    cmd = [
        sys.executable,
        "train.py",
        "configs/tiny.yaml",
        f"--run.dir={tmp_path / 'r'}",
        f"--data.prepared_dir={tmp_path / 'nothing_here'}",
    ]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "nothing_here" in out.stderr and "prepare_data" in out.stderr


@pytest.fixture(scope="module")
def tiny_prepared(tmp_path_factory):
    """A corpus of ~100 windows of 32 tokens, so a run crosses epoch boundaries within a few steps."""
    from tests.helpers.corpus import make_texts, tiny_tokenizer, write_corpus

    root = tmp_path_factory.mktemp("tiny_corpus")
    train_texts, val_texts = make_texts(60, seed=1), make_texts(10, seed=2)
    write_corpus(root / "corpus", train_texts, val_texts)
    tok = tiny_tokenizer(root / "tok.model", train_texts + val_texts)
    out = subprocess.run(
        [
            sys.executable,
            "tools/prepare_data.py",
            "--source",
            str(root / "corpus"),
            "--tokenizer",
            str(tok),
            "--out",
            str(root / "tokens"),
            "--workers",
            "0",
            "--no_progress",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return root / "tokens", tok


def test_resume_is_bit_exact_across_epoch_boundaries(tmp_path, tiny_prepared):
    tokens, tok = tiny_prepared
    extra = {
        "data.tokenizer": tok,
        "model.vocab_size": 512,
        "train.global_batch": 32,
        "train.micro_batch": 16,
        "train.max_steps": 12,
        "checkpoint.interval": 5,
        "eval.interval": 6,
        "data.val_tokens": 512,
    }
    _, straight = run(tmp_path, tokens, "straight", **extra)
    from data import DataConfig, TrainBatches

    n_windows = TrainBatches(
        DataConfig(prepared_dir=str(tokens), tokenizer=str(tok), seq_len=32), global_batch=32
    ).n_windows
    assert 12 * 32 > 2 * n_windows  # the run spans at least three epochs
    run(tmp_path, tokens, "resumed", **extra)
    resumed = tmp_path / "resumed"
    for late in ("step_00000010.pt", "step_00000012.pt"):
        (resumed / "checkpoints" / late).unlink()
    _, result = run(tmp_path, tokens, "resumed", **extra)  # resumes at step 5, mid-epoch
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 13)) and all(a[s] == b[s] for s in a), (a, b)
    assert result.val_losses == [v for v in straight.val_losses if v[0] > 5]


@pytest.mark.parametrize("args", [["--help"], ["configs/tiny.yaml", "--optim.lr=1e-3", "-h"]])
def test_help_lists_every_section_and_key(args):
    out = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for key in (
        "--run.dir",
        "--model.flavor",
        "--data.seq_len",
        "--optim.update_norm",
        "--train.fused_update",
        "--scheduler.warmup_steps",
        "--eval.interval",
        "--log.tensorboard",
        "--checkpoint.keep_last",
    ):
        assert key in out.stdout


@pytest.mark.parametrize(
    "override,message",
    [("--optim.name=adamww", "Did you mean 'adamw'"), ("--optim.svd_method=fast", "optim.svd_method='fast'")],
)
def test_bad_choices_are_one_error_line_before_any_work(tmp_path, override, message):
    cmd = [sys.executable, "train.py", "configs/tiny.yaml", f"--run.dir={tmp_path / 'r'}", override]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ") and message in out.stderr
    assert not (tmp_path / "r").exists()  # nothing was written


def test_a_second_trainer_on_a_busy_run_directory_stops_at_once(tmp_path, sample_tokens):
    run_dir = tmp_path / "run"
    cmd = train_command(run_dir, sample_tokens, **{"train.max_steps": 100000, "eval.interval": 0})
    first = start_training(cmd, run_dir, steps=2, timeout=120)
    try:
        metrics_before = (run_dir / "metrics.jsonl").read_text().count("\n")
        second = subprocess.run(
            cmd,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert second.returncode == 1 and second.stderr.startswith("error: "), second.stderr
        assert f"in use by another trainer: pid {first.pid}" in second.stderr and "--run.dir" in second.stderr
        assert "Traceback" not in second.stderr
        assert (run_dir / "metrics.jsonl").read_text().count("\n") >= metrics_before  # the first run goes on
    finally:
        first.send_signal(signal.SIGTERM)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out
