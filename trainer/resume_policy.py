"""Which settings a resumed run may change, and the run's history of those changes.

A run directory is one run: its checkpoints hold one model shape, one optimizer state layout and
one sample order. Resuming with a setting that would make the checkpoint mean something else
(another optimizer or its hyperparameters, another model shape, another data order or global
batch, the other fused mode) fails before any work, listing every such key (old -> new).
Settings that only steer how the run goes on (the peak lr, the schedule, the step budget,
micro-batching, precision, the engine and the number of ranks, intervals, where the data lives)
may change; each resume appends one
record to `<run.dir>/resumes.jsonl` with what changed, so `config.yaml` (the config in force) never
hides the run's history.

The data's identity (manifest checksum, window order) is checked separately by the data
component when the checkpoint loads, so `data.prepared_dir` may point at a moved copy.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from trainer.config_parsing import ConfigError

# "section.key", or "section.*" for a whole section. Every other key must equal the checkpoint's.
MAY_CHANGE_ON_RESUME = (
    "run.*",
    "optim.lr",
    "optim.compile",  # the same update to fp32 rounding and the same state (optim/compiled_steps.py)
    "scheduler.*",
    "train.max_steps",
    "train.flop_budget",
    "train.match_flops_of",
    "train.micro_batch",
    "train.max_grad_norm",
    "train.precision",
    "train.device",
    "train.compile",
    "train.loss_chunk_tokens",
    "train.engine",  # ddp <-> fsdp2: checkpoints hold full tensors (trainer/full_state.py), any rank count
    # DeepSpeed's own checkpoints are tied to their engine, ranks and stage: trainer.checkpoint.check_checkpoint_fits
    # says so; AdaLomo's gathered single files and DeepSpeed's tuning keys move freely.
    "train.zero_stage",
    "train.deepspeed_config",
    "data.prepared_dir",
    "data.tokenizer",
    "data.num_workers",
    "data.verify",
    "data.val_tokens",
    "eval.*",
    "log.*",
    "checkpoint.*",
)


def listed(key: str, patterns: Sequence[str]) -> bool:
    """Whether "section.key" `key` is in `patterns` ("section.key" or "section.*" entries)."""
    return key in patterns or f"{key.split('.', 1)[0]}.*" in patterns


def may_change(key: str) -> bool:
    return listed(key, MAY_CHANGE_ON_RESUME)


def config_changes(saved: dict, now: dict) -> dict[str, tuple[Any, Any]]:
    """{"section.key": (saved value, current value)} for every key present in both that differs
    (keys that a checkpoint of an older version did not have are not compared)."""
    changes = {}
    for section, values in now.items():
        old_section = saved.get(section)
        if not isinstance(old_section, dict):
            continue
        for key, value in values.items():
            if key in old_section and old_section[key] != value:
                changes[f"{section}.{key}"] = (old_section[key], value)
    return changes


def check_resume_compatible(saved: dict, now: dict, checkpoint: Path) -> dict[str, tuple[Any, Any]]:
    """The allowed changes from `saved` (the checkpoint's config) to `now`; ConfigError listing
    every key that may not change, with the fix."""
    changes = config_changes(saved, now)
    fixed = {key: change for key, change in changes.items() if not may_change(key)}
    if fixed:
        lines = "\n".join(f"  {key}: {old!r} -> {new!r}" for key, (old, new) in fixed.items())
        raise ConfigError(
            f"cannot resume from {checkpoint} with a different setup; these settings cannot change within a run:\n"
            f"{lines}\nResume with the checkpoint's values (they are in {checkpoint.parent.parent / 'config.yaml'}), "
            f"or start a new run with another --run.dir."
        )
    return changes


def record_resume(run_dir: Path, step: int, checkpoint: Path, changes: dict[str, tuple[Any, Any]]) -> None:
    """Append one line to `<run_dir>/resumes.jsonl`: when, from which checkpoint, what changed."""
    record = {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "step": step,
        "checkpoint": checkpoint.name,
        "changed": {key: [old, new] for key, (old, new) in changes.items()},
    }
    with open(run_dir / "resumes.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
