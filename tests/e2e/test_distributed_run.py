"""Two CPU ranks (torchrun, gloo) train exactly like one rank: same global batches, same losses."""

import subprocess
import sys

import pytest
import torch

from tests.helpers.runs import REPO, tiny_overrides
from trainer import checkpoint as ckpt
from trainer.metrics import read_metrics


def run(run_dir, tokens, nproc):
    overrides = tiny_overrides(run_dir, tokens, **{"train.max_steps": 4, "eval.interval": 2, "train.micro_batch": 1})
    if nproc == 1:
        cmd = [sys.executable, "train.py", "configs/tiny.yaml", *overrides]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "train.py",
            "configs/tiny.yaml",
            *overrides,
        ]
    out = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout + out.stderr
    records = read_metrics(run_dir / "metrics.jsonl")
    return (
        {r["step"]: r["train/loss"] for r in records if "train/loss" in r},
        {r["step"]: r["val/loss"] for r in records if "val/loss" in r},
    )


def test_two_ranks_match_one_rank(tmp_path, sample_tokens):
    train1, val1 = run(tmp_path / "one", sample_tokens, 1)
    train2, val2 = run(tmp_path / "two", sample_tokens, 2)
    assert sorted(train1) == sorted(train2) == [1, 2, 3, 4]
    for step in train1:  # same windows; only the order of floating-point sums differs
        assert train2[step] == pytest.approx(train1[step], rel=1e-5)
    for step in val1:
        assert val2[step] == pytest.approx(val1[step], rel=1e-5)
    a = ckpt.load_checkpoint(tmp_path / "one" / "checkpoints" / "step_00000004.pt")["model"]
    b = ckpt.load_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000004.pt")["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
