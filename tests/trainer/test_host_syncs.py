"""No host syncs inside a training step: the trainer reads its metrics only at its check points (log, eval and
checkpoint steps), and the count that shows it (trainer/host_syncs.py) sees the reads it is meant to see."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.runs import tiny_trainer
from trainer.host_syncs import count_host_syncs


def test_the_count_sees_host_reads_and_nothing_else():
    t = torch.ones(3)
    with count_host_syncs() as syncs:
        _ = (t * 2).sum()  # device work only
        assert syncs.total == 0
        t.sum().item()
        float(t[0])
        if t.any():
            t.tolist()
    assert syncs.total == 4 and all("test_host_syncs.py" in site for site in syncs.sites), syncs.sites
    assert "__bool__" not in vars(torch.Tensor) and torch.Tensor.item is not None  # restored as it was


def test_each_kind_of_host_read_is_counted_at_its_line() -> None:
    t, i = torch.tensor([2.0]), torch.tensor(1)
    with count_host_syncs() as syncs:
        t.item()
        t.tolist()
        t.numpy()
        bool(t)
        float(t)
        int(t)
        [0, 1][i]  # __index__
    assert sorted(syncs.sites.values()) == [1] * 7, syncs.sites  # seven reads, each at its own line


def test_an_error_in_the_block_restores_the_tensor_methods() -> None:
    item, to_float = torch.Tensor.item, torch.Tensor.__float__
    with pytest.raises(RuntimeError, match="raised in the block"):
        with count_host_syncs():
            raise RuntimeError("raised in the block")
    assert torch.Tensor.item is item and torch.Tensor.__float__ is to_float
    assert "__float__" not in vars(torch.Tensor)  # inherited again from TensorBase, not left patched


@pytest.mark.parametrize(
    "extra",
    [
        {"optim.name": "adamw"},
        {"optim.name": "adafactor", "optim.beta1": 0.9, "optim.clip_threshold": 1.0},
        {"optim.name": "adafactor", "optim.beta1": 0.9, "optim.clip_threshold": 1.0, "optim.compile": True},
        {"optim.name": "adalomo", "train.fused_update": True, "train.max_grad_norm": 0},
        {
            "optim.name": "adalomo",
            "optim.update_norm": "layerwise",
            "train.fused_update": True,
            "train.max_grad_norm": 0,
        },
        {"optim.name": "galore_adamw", "optim.rank": 8, "optim.update_proj_gap": 200},
        {"optim.name": "adamem", "optim.rank": 8, "optim.update_proj_gap": 200},
    ],
    ids=[
        "adamw",
        "adafactor",
        "adafactor_compiled",
        "adalomo_fused",
        "adalomo_layerwise_fused",
        "galore_adamw",
        "adamem",
    ],
)
def test_a_training_step_reads_nothing_on_the_host(tmp_path, sample_tokens, extra):
    trainer = tiny_trainer(tmp_path / "run", sample_tokens, **extra)
    batches = trainer.data.batches(0)
    trainer.train_step(0, *next(batches))  # the first step builds the state (and GaLore's first projector)
    for step in (1, 2):
        with count_host_syncs() as syncs:
            out = trainer.train_step(step, *next(batches))
        assert syncs.total == 0, syncs.sites
    assert torch.isfinite(out.loss) and torch.isfinite(out.grad_norm)
