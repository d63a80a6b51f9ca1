"""A Trainer is freed when its last reference goes, not at the cycle collector's next pass: nothing it builds
(checkpoint parts, hooks, fused-update and adapter bookkeeping) holds the Trainer itself. Otherwise a finished
run's weights and optimizer state stay in memory while the next one builds (sweeps in one process,
tools/bench_step.py, notebooks)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch._dynamo  # noqa: F401  (imported here, not first inside a Trainer: see below)

from tests.helpers.runs import tiny_trainer


@pytest.mark.parametrize(
    "extra",
    [
        {"optim.name": "adamw"},
        {"optim.name": "adamw", "train.fused_update": True, "train.max_grad_norm": 0},
        {"optim.name": "adalomo"},
        {"optim.name": "galore_adamw", "optim.rank": 8, "optim.projected_backward": True},
        {"optim.name": "adamw", "adapter.method": "relora", "adapter.rank": 4},
    ],
    ids=["adamw", "adamw_fused", "adalomo", "galore_projected_backward", "relora"],
)
def test_a_finished_trainer_is_freed_by_its_last_reference(tmp_path, sample_tokens, extra):
    def fit(name: str) -> tuple[weakref.ref, weakref.ref]:
        trainer = tiny_trainer(tmp_path / name, sample_tokens, **{"train.max_steps": 2, **extra})
        trainer.fit()
        return weakref.ref(trainer), weakref.ref(trainer.model)

    # torch.optim imports torch._dynamo on first use; that import leaves its frames, the caller's included, in
    # garbage that only the cycle collector frees (once per process): this module imports it up front instead.
    gc.collect()
    gc.disable()
    try:
        trainer, model = fit("run")
        assert trainer() is None and model() is None
    finally:
        gc.enable()
