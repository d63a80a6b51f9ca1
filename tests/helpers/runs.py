"""Helpers for tests that run the trainer: the repo root and the overrides of a seconds-long run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.config import Config, load_config
from trainer.metrics import read_metrics
from trainer.trainer import TrainResult, train

REPO = Path(__file__).resolve().parents[2]


def tiny_overrides(run_dir: Path, tokens: Path, **extra: Any) -> list[str]:
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


def losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from a run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def run(tmp_path: Path, tokens: Path, name: str = "run", /, **extra: Any) -> tuple[Config, TrainResult]:
    """configs/tiny.yaml with tiny_overrides (plus `extra`), trained in-process in tmp_path / name."""
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / name, tokens, **extra))
    return cfg, train(cfg)
