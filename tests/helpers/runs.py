"""Helpers for tests that run the trainer: the repo root and the overrides of a seconds-long run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from trainer.checkpoint import checkpoint_path, load_checkpoint
from trainer.config import Config, load_config
from trainer.dist_checkpoint import read_extras, read_full_tensors
from trainer.distributed import DistInfo
from trainer.metrics import read_metrics
from trainer.trainer import Trainer, TrainResult, train

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


def train_command(run_dir: Path, tokens: Path, **extra: Any) -> list[str]:
    """`python train.py configs/tiny.yaml` with tiny_overrides: the command line of a seconds-long run."""
    return [sys.executable, "train.py", "configs/tiny.yaml", *tiny_overrides(run_dir, tokens, **extra)]


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


def max_rel_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max over tensors of ||a - b|| / ||b||: the relative difference of each parameter."""
    return max(float(torch.linalg.vector_norm(a[k] - b[k]) / torch.linalg.vector_norm(b[k])) for k in b)


def follows_reference(run_dir: Path, reference_dir: Path, steps: int) -> float:
    """Assert that `run_dir` logged the loss of steps 1..`steps` as `reference_dir` did, to 1e-5 relative;
    return the max relative parameter difference of their step-`steps` models (max_rel_difference)."""
    got, want = losses(run_dir), losses(reference_dir)
    assert sorted(got) == sorted(want) == list(range(1, steps + 1)), run_dir.name
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), (run_dir.name, step)
    return max_rel_difference(final_model(run_dir, steps), final_model(reference_dir, steps))


def assert_identical_runs(run_dir: Path, reference_dir: Path, step: int) -> None:
    """The same losses and, bit for bit, the same step-`step` model."""
    assert losses(run_dir) == losses(reference_dir), run_dir.name
    got = final_model(run_dir, step)
    for key, value in final_model(reference_dir, step).items():
        assert torch.equal(got[key], value), (run_dir.name, key)


def train_as_rank(rank: int, world: int, store: str, overrides: list[str]) -> None:
    """The trainer (configs/tiny.yaml + `overrides`) on this rank, as torchrun would start it. Its process
    group comes from a file store (`store`, one per job), not a TCP port: a port picked in advance may be
    taken by then (gloo's own connections use ephemeral ports), and a rank that fails to bind would leave the
    other waiting. The trainer finds the group initialised, uses it, and ends it when it returns."""
    if dist.is_initialized():
        dist.destroy_process_group()
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo", store=dist.FileStore(store, world), rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    train(load_config("configs/tiny.yaml", overrides))


def train_jobs_as_rank(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> None:
    """train_as_rank for each (store, overrides) of `jobs` in turn: several runs in one spawn of the ranks."""
    for store, overrides in jobs:
        train_as_rank(rank, world, store, overrides)


def tiny_trainer(run_dir: Path, tokens: Path, **extra: Any) -> Trainer:
    """configs/tiny.yaml with tiny_overrides (plus `extra`), built in-process on the CPU and not trained yet."""
    cfg = load_config("configs/tiny.yaml", tiny_overrides(run_dir, tokens, **extra))
    return Trainer(cfg, DistInfo(0, 1, 0, torch.device("cpu")))


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
