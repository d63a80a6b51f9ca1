"""train.engine=deepspeed on 2 CPU ranks (gloo): AdamW at ZeRO-1/2/3 (and offloaded) and AdaLomo under
ZeRO-3 the LOMO way train like one process; DeepSpeed's checkpoints resume exactly on the same ranks; the
DeepSpeed JSON is built from the config, a user's file merged and checked; every refusal says why."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from tests.helpers.gloo import run_ranks
from tests.helpers.runs import final_model, losses, run, tiny_overrides
from tests.trainer.test_engines import _max_rel, _train_as_rank
from trainer.config import ConfigError, deepspeed_config, load_config

STEPS = 4
COMMON = {"train.max_steps": STEPS, "checkpoint.interval": 2, "eval.interval": 2, "train.micro_batch": 1}
CASES: dict[str, dict[str, object]] = {
    "adamw_zero1": {"optim.name": "adamw", "train.zero_stage": 1},
    "adamw_zero2": {"optim.name": "adamw", "train.zero_stage": 2},
    "adamw_zero3": {"optim.name": "adamw", "train.zero_stage": 3},
    "adamw_zero2_offload": {"optim.name": "adamw", "train.zero_stage": 2, "train.offload_optimizer": True},
    "adalomo_zero3": {
        "optim.name": "adalomo",
        "train.zero_stage": 3,
        "train.fused_update": True,
        "train.max_grad_norm": 0,
    },
}
# The one-process reference of each case: the same optimizer settings without the DeepSpeed keys.
DS_KEYS = ("train.zero_stage", "train.offload_optimizer")


def _deepspeed_jobs_on_ranks(rank: int, world: int, jobs: list[tuple[str, list[str]]]) -> None:
    """Several trainer runs in one process: DeepSpeed caches the process groups of the first in module
    globals, which a run starts afresh (torchrun runs one per process); reloading the module resets them."""
    import importlib

    import deepspeed.utils.groups

    for store, overrides in jobs:
        importlib.reload(deepspeed.utils.groups)
        _train_as_rank(rank, world, store, overrides)


def _reference(extra: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in extra.items() if k not in DS_KEYS}


def test_deepspeed_on_two_ranks_trains_like_one_process_and_resumes_exactly(tmp_path, sample_tokens):
    next_store = (str(tmp_path / f"store{i}") for i in itertools.count()).__next__
    jobs = []
    for name, extra in CASES.items():
        overrides = tiny_overrides(tmp_path / f"ds_{name}", sample_tokens, **COMMON, **extra)
        jobs.append((next_store(), [*overrides, "--train.engine=deepspeed"]))
    run_ranks(_deepspeed_jobs_on_ranks, 2, jobs)
    figures = {}
    for name, extra in CASES.items():
        run(tmp_path, sample_tokens, f"one_{name}", **COMMON, **_reference(extra))
        one, two = losses(tmp_path / f"one_{name}"), losses(tmp_path / f"ds_{name}")
        assert sorted(two) == list(range(1, STEPS + 1)), name
        for step in one:
            assert two[step] == pytest.approx(one[step], rel=1e-5), (name, step)
        figures[name] = _max_rel(
            final_model(tmp_path / f"ds_{name}", STEPS), final_model(tmp_path / f"one_{name}", STEPS)
        )
    print("max relative parameter difference, 2 deepspeed ranks vs 1 process:", figures)
    assert max(figures.values()) < 5e-5, figures
