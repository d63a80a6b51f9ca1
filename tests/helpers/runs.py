"""Helpers for tests that run the trainer: the repo root and the overrides of a seconds-long run."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(run_dir: Path, tokens: Path, **extra) -> list[str]:
    """A seconds-long CPU run: a 2-layer 64-wide model on 4 x 32-token sequences."""
    values = {
        "run.dir": run_dir,
        "data.prepared_dir": tokens,
        "data.seq_len": 32,
        "data.val_tokens": 2048,
        "model.d_model": 64,
        "model.n_layers": 2,
        "model.max_seq_len": 32,
        "train.global_batch": 4,
        "train.micro_batch": 2,
        "train.max_steps": 6,
        "train.precision": "fp32",
        "train.device": "cpu",
        "scheduler.warmup_steps": 2,
        "optim.lr": 1e-2,
        "eval.interval": 3,
        "eval.batch_size": 8,
        "log.interval": 1,
        "log.tensorboard": True,
        "checkpoint.interval": 3,
        "checkpoint.keep_last": 5,
        **extra,
    }
    return [f"--{k}={v}" for k, v in values.items()]
