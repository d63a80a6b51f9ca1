"""Helpers for tests that run the trainer: the repo root and the overrides of a seconds-long run."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.config import Config, load_config
from trainer.dist_checkpoint import read_extras, read_full_tensors
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


def final_model(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    """The model of `step`'s checkpoint in `run_dir`: a single file (one process) or a sharded directory
    (several ranks: trainer/dist_checkpoint.py), read whole."""
    sharded = run_dir / "checkpoints" / f"step_{step:08d}"
    if sharded.is_dir() and read_extras(sharded).get("layout") == "deepspeed":
        # DeepSpeed's own converter: the fp32 weights from every rank's ZeRO partitions (stage 1, 2 or 3).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(str(sharded.parent), tag=sharded.name))
    if sharded.is_dir():
        return {k.removeprefix("model."): v for k, v in read_full_tensors(sharded, "model.").items()}
    return load_checkpoint(checkpoint_path(run_dir / "checkpoints", step))["model"]


def losses(run_dir: Path) -> dict[int, float]:
    """{step: train loss} from a run's metrics.jsonl."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in r}


def run(tmp_path: Path, tokens: Path, name: str = "run", /, **extra: Any) -> tuple[Config, TrainResult]:
    """configs/tiny.yaml with tiny_overrides (plus `extra`), trained in-process in tmp_path / name."""
    cfg = load_config("configs/tiny.yaml", tiny_overrides(tmp_path / name, tokens, **extra))
    return cfg, train(cfg)


def start_training(
    cmd: list[str], run_dir: Path, *, steps: int, timeout: float = 180.0, new_session: bool = False
) -> subprocess.Popen[str]:
    """Start `cmd` (train.py, torchrun or trainer.launch) in the repo, one OpenMP thread per process,
    stdout and stderr captured together, in its own process group if `new_session` (so a test can
    signal the whole job as a scheduler does); return once `steps` training steps are logged in
    `run_dir`, the process has ended, or `timeout` seconds have passed."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=new_session,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + timeout
    while time.time() < deadline and len(losses(run_dir)) < steps and proc.poll() is None:
        time.sleep(0.2)
    return proc
