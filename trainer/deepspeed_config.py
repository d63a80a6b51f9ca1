"""The DeepSpeed JSON of a run (train.engine=deepspeed): built from the config, optionally merged with a
user's file (train.deepspeed_config), checked when the config loads.

What this config owns, so every engine trains the same thing (the comparison's point):
- the batch: train_batch_size = train.global_batch, train_micro_batch_size_per_gpu = the rank's
  micro-batch, gradient_accumulation_steps = the rest. Accumulation is the trainer's
  (`managed_gradient_accumulation: false`: backward only accumulates, `engine.step()` is the boundary);
- gradient_clipping = train.max_grad_norm; zero_optimization.stage = train.zero_stage and its
  offload_optimizer = train.offload_optimizer;
- the optimizer and the schedule: the client optimizer is the one optim/ builds, its learning rate set
  by the trainer every step; a file's "optimizer" or "scheduler" block is refused;
- precision: parameters stay fp32 and train.precision=bf16 is the trainer's autocast, as under ddp and
  fsdp2; a file's "bf16" / "fp16" / "torch_autocast" block is refused (DeepSpeed's bf16 mode would
  train bf16 weights with another master-weight scheme).

A file's other keys (bucket sizes, overlap_comm, stage3 prefetch and persistence thresholds, ...) are
merged in; a key that the built config also sets must have the same value, or the load fails naming it.
Three zero_optimization keys that the built config may leave out are checked too: offload_optimizer
(only with train.offload_optimizer=true, or with device "none"), compute_grad_norm=false (refused: the
trainer reads the norm every step) and overlap_comm=true at stage 1 (refused: DeepSpeed supports it with
the trainer's accumulation only at stages 2 and 3).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Top-level blocks a user's file may not set (see the module docstring).
_OWNED_BLOCKS = {
    "optimizer": "the optimizer is optim.name's (its client optimizer is built by optim/)",
    "scheduler": "the learning-rate schedule is the trainer's (scheduler.*)",
    "bf16": "parameters stay fp32; bf16 compute is --train.precision=bf16 (the trainer's autocast)",
    "fp16": "parameters stay fp32; bf16 compute is --train.precision=bf16 (the trainer's autocast)",
    "torch_autocast": "bf16 compute is --train.precision=bf16 (the trainer's autocast)",
}


def build_deepspeed_config(
    *,
    global_batch: int,
    micro_batch: int,
    world_size: int,
    max_grad_norm: float,
    zero_stage: int,
    offload_optimizer: bool,
    user_file: str | None = None,
) -> dict[str, Any]:
    """The DeepSpeed config dict; ValueError naming the key and the fix when `user_file` is unreadable or
    disagrees with the built keys."""
    per_rank = global_batch // world_size
    zero: dict[str, Any] = {"stage": zero_stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    built: dict[str, Any] = {
        "train_batch_size": global_batch,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": per_rank // micro_batch,
        "managed_gradient_accumulation": False,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        # The client optimizer is torch's AdamW (the same one every engine runs), not one of DeepSpeed's.
        "zero_allow_untested_optimizer": True,
        # ZeRO-Offload with that client optimizer: torch AdamW steps the CPU partitions (DeepSpeedCPUAdam is a C++
        # op built on first use, with its own Adam arithmetic; see docs/engines.md).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,  # the trainer logs
        "wall_clock_breakdown": False,
    }
    if user_file is None:
        return built
    return merge_user_config(built, read_user_config(user_file), user_file)


def read_user_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"train.deepspeed_config={path}: no such file; give the path of a DeepSpeed JSON, or null")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"train.deepspeed_config={path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(data, dict):
        raise ValueError(f"train.deepspeed_config={path}: expected a JSON object at the top, got {type(data).__name__}")
    return data


def merge_user_config(built: dict[str, Any], user: dict[str, Any], path: str) -> dict[str, Any]:
    for block, why in _OWNED_BLOCKS.items():
        if block in user:
            raise ValueError(f"train.deepspeed_config={path} sets {block!r}: {why}. Remove that block from the file")
    merged = _merge(built, user, path, prefix="")
    _check_zero_keys(merged, built, path)
    return merged


def _check_zero_keys(merged: dict[str, Any], built: dict[str, Any], path: str) -> None:
    """zero_optimization keys of a file that the built config leaves out but that it cannot take: each would
    pass the merge and then change the run behind the config, or fail inside deepspeed.initialize."""
    zero, stage = merged["zero_optimization"], built["zero_optimization"]["stage"]
    offload = zero.get("offload_optimizer")
    if "offload_optimizer" not in built["zero_optimization"] and offload not in (None, {}, {"device": "none"}):
        raise ValueError(
            f"train.deepspeed_config={path} sets zero_optimization.offload_optimizer={offload!r}, but this run has "
            "train.offload_optimizer=false (the config owns it: run headers, memory tables and the resume checks "
            "read it); remove the block from the file and set --train.offload_optimizer=true instead"
        )
    if zero.get("compute_grad_norm") is False:
        raise ValueError(
            f"train.deepspeed_config={path} sets zero_optimization.compute_grad_norm=false: the trainer logs and "
            "checks the gradient norm every step; remove that key"
        )
    if stage == 1 and zero.get("overlap_comm") is True:
        raise ValueError(
            f"train.deepspeed_config={path} sets zero_optimization.overlap_comm=true, which DeepSpeed supports with "
            "the trainer's accumulation (managed_gradient_accumulation=false) only at ZeRO stage 2 or 3; remove "
            "it from the file or set --train.zero_stage=2"
        )


def _merge(built: dict[str, Any], user: dict[str, Any], path: str, prefix: str) -> dict[str, Any]:
    out = dict(built)
    for key, value in user.items():
        where = f"{prefix}{key}"
        if key not in built:
            out[key] = value
        elif isinstance(built[key], dict) and isinstance(value, dict):
            out[key] = _merge(built[key], value, path, prefix=f"{where}.")
        elif value != built[key]:
            raise ValueError(
                f"train.deepspeed_config={path} sets {where}={value!r}, but this run's config gives {built[key]!r} "
                f"({_SOURCE.get(where, 'from the train section')}); remove {where} from the file or change the config"
            )
    return out


_SOURCE = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch, capped at the rank's share",
    "gradient_accumulation_steps": "the rank's share of train.global_batch / micro-batch",
    "gradient_clipping": "train.max_grad_norm",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer": "train.offload_optimizer",
}
