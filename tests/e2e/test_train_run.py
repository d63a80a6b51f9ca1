"""End-to-end CPU runs of the trainer on the prepared sample corpus."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers.runs import REPO, tiny_overrides
from trainer import checkpoint as ckpt
from trainer.config import ConfigError, load_config
from trainer.metrics import read_metrics
from trainer.trainer import TrainingDiverged, train


def losses(run_dir):
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def run(tmp_path, tokens, name="run", **extra):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / name, tokens, **extra))
    return cfg, train(cfg)


def test_short_run_learns_and_writes_everything(tmp_path, sample_tokens):
    cfg, result = run(tmp_path, sample_tokens, **{"train.max_steps": 12, "eval.interval": 6})
    run_dir = tmp_path / "run"
    train_losses = losses(run_dir)
    assert sorted(train_losses) == list(range(1, 13))
    assert sum(list(train_losses.values())[-3:]) / 3 < sum(list(train_losses.values())[:3]) / 3
    assert [s for s, _ in result.val_losses] == [0, 6, 12]
    assert result.val_losses[-1][1] < result.val_losses[0][1] - 0.5
    records = read_metrics(run_dir / "metrics.jsonl")
    keys = set().union(*records)
    for key in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/ppl", "throughput/tokens_per_s",
                "memory/peak_bytes", "throughput/data_wait_frac"):
        assert key in keys
    assert "throughput/mfu" not in keys  # no MFU on CPU
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert load_config(run_dir / "config.yaml") == cfg
    latest = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert latest.name == "step_00000012.pt"
    state = ckpt.load_checkpoint(latest)  # weights_only=True
    assert state["step"] == 12 and state["tokens_seen"] == 12 * 4 * 32


def test_resume_is_bit_exact(tmp_path, sample_tokens):
    """2k steps uninterrupted vs k steps, then resumed from the step-k checkpoint."""
    run(tmp_path, sample_tokens, name="straight")
    run(tmp_path, sample_tokens, name="resumed")
    resumed = tmp_path / "resumed"
    # Undo everything after step 3, as if the process had died right after that checkpoint.
    (resumed / "checkpoints" / "step_00000006.pt").unlink()
    _, result = run(tmp_path, sample_tokens, name="resumed")
    assert result.final_step == 6
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 7))
    assert all(a[s] == b[s] for s in a), (a, b)  # bit for bit
    final_a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000006.pt")
    final_b = ckpt.load_checkpoint(resumed / "checkpoints" / "step_00000006.pt")
    for name, tensor in final_a["model"].items():
        assert torch.equal(tensor, final_b["model"][name]), name


def test_rerun_of_a_finished_run_does_nothing(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 2})
    _, result = run(tmp_path, sample_tokens, **{"train.max_steps": 2})
    assert result.final_step == 2 and result.val_losses == []


def test_non_finite_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, sample_tokens, monkeypatch):
    import trainer.trainer as trainer_module

    real = trainer_module.forward_backward
    calls = []

    def poisoned(model, micro_batches, **kw):
        loss = real(model, micro_batches, **kw)
        calls.append(1)
        if len(calls) == 5:  # step 5 produces a NaN loss (and NaN gradients)
            for p in model.parameters():
                p.grad.fill_(float("nan"))
            return loss * float("nan")
        return loss

    monkeypatch.setattr(trainer_module, "forward_backward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 5 .*Last good checkpoint: .*step_00000003\.pt"):
        run(tmp_path, sample_tokens)
    latest = ckpt.latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert latest.name == "step_00000003.pt"
    state = ckpt.load_checkpoint(latest)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_fused_update_refuses_gradient_clipping(tmp_path, sample_tokens):
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / "run", sample_tokens, **{"train.fused_update": True}))
    with pytest.raises(ConfigError, match="max_grad_norm=0"):
        train(cfg)


def test_fused_update_trains_and_matches_the_ordinary_path(tmp_path, sample_tokens):
    extra = {"train.max_grad_norm": 0, "train.max_steps": 4, "optim.fused": False}
    run(tmp_path, sample_tokens, name="plain", **extra)
    run(tmp_path, sample_tokens, name="fused", **extra, **{"train.fused_update": True})
    assert losses(tmp_path / "plain") == losses(tmp_path / "fused")


def test_resume_with_the_other_fused_setting_is_a_clear_error(tmp_path, sample_tokens):
    run(tmp_path, sample_tokens, **{"train.max_steps": 3, "train.max_grad_norm": 0})
    with pytest.raises(ckpt.CheckpointError, match=r"saved with train.fused_update=False; resume with --train.fused_update=false"):
        run(tmp_path, sample_tokens, **{"train.max_steps": 3, "train.max_grad_norm": 0, "train.fused_update": True})


def test_sigterm_saves_and_exits_zero(tmp_path, sample_tokens):
    """Preemption signals the whole process group, DataLoader workers included."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "configs/tiny.yaml",
           *tiny_overrides(run_dir, sample_tokens, **{"train.max_steps": 100000, "checkpoint.interval": 100000,
                                                      "eval.interval": 0, "data.num_workers": 2})]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(losses(run_dir)) < 3:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None and "stop requested" in out
    assert ckpt.load_checkpoint(saved)["step"] == max(losses(run_dir))


def test_missing_data_is_a_clear_error(tmp_path):
    cmd = [sys.executable, "train.py", "configs/tiny.yaml", f"--run.dir={tmp_path / 'r'}",
           f"--data.prepared_dir={tmp_path / 'nothing_here'}"]
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
    out = subprocess.run([sys.executable, "tools/prepare_data.py", "--source", str(root / "corpus"), "--tokenizer",
                          str(tok), "--out", str(root / "tokens"), "--workers", "0", "--no_progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return root / "tokens", tok


def test_resume_is_bit_exact_across_epoch_boundaries(tmp_path, tiny_prepared):
    tokens, tok = tiny_prepared
    extra = {"data.tokenizer": tok, "model.vocab_size": 512, "train.global_batch": 32, "train.micro_batch": 16,
             "train.max_steps": 12, "checkpoint.interval": 5, "eval.interval": 6, "data.val_tokens": 512}
    _, straight = run(tmp_path, tokens, name="straight", **extra)
    from data import DataConfig, TrainBatches

    n_windows = TrainBatches(DataConfig(prepared_dir=str(tokens), tokenizer=str(tok), seq_len=32), global_batch=32).n_windows
    assert 12 * 32 > 2 * n_windows  # the run spans at least three epochs
    run(tmp_path, tokens, name="resumed", **extra)
    resumed = tmp_path / "resumed"
    for late in ("step_00000010.pt", "step_00000012.pt"):
        (resumed / "checkpoints" / late).unlink()
    _, result = run(tmp_path, tokens, name="resumed", **extra)  # resumes at step 5, mid-epoch
    a, b = losses(tmp_path / "straight"), losses(resumed)
    assert sorted(b) == list(range(1, 13)) and all(a[s] == b[s] for s in a), (a, b)
    assert result.val_losses == [v for v in straight.val_losses if v[0] > 5]


@pytest.mark.parametrize("name", ["adafactor", "galore_adamw", "galore_adafactor", "adamem", "adalomo"])
def test_every_optimizer_trains_and_resumes_bit_exact_from_the_cli(tmp_path, sample_tokens, name):
    """Through train(): the projector refreshes every 2 steps, so the resumed run (from step 3)
    recomputes projections from restored state."""
    extra = {"optim.name": name, "optim.rank": 8, "optim.update_proj_gap": 2, "optim.lr": 3e-3}
    run(tmp_path, sample_tokens, name="straight", **extra)
    run(tmp_path, sample_tokens, name="resumed", **extra)
    (tmp_path / "resumed" / "checkpoints" / "step_00000006.pt").unlink()
    run(tmp_path, sample_tokens, name="resumed", **extra)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 7)) and all(a[s] == b[s] for s in a), (a, b)
    assert a[6] < a[1]
    records = [r for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "train/loss" in r]
    if name in ("galore_adamw", "galore_adafactor", "adamem"):
        # 3 refreshes (steps 1, 3, 5) for each low-rank matrix: 4 per block x 2 blocks.
        assert records[-1]["optim/proj_updates"] == 3 * 8 and records[-1]["optim/svd_failures"] == 0
