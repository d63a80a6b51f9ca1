"""Applies training-time wrappers to the model, in order: torch.compile per block, then the engine's
wrapper (DDP, or FSDP2's fully_shard per block and root). The model file holds none of this
(torchtitan's split); DeepSpeed wraps model and optimizer together (trainer/deepspeed_engine.py)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model import Transformer
from trainer.config import TrainConfig
from trainer.distributed import DistInfo


def parallelize(model: Transformer, train: TrainConfig, info: DistInfo) -> nn.Module:
    """compile (train.compile) then the engine's wrapper; returns the module the loop calls. Under
    fsdp2 the parameters of `model` itself become sharded DTensors (build the optimizer after this).
    One process: no wrapper. deepspeed: nothing here (its engine wraps model and optimizer)."""
    if train.compile:
        compile_blocks(model)
    if not info.enabled or train.engine == "deepspeed":
        return model
    if train.engine == "fsdp2":
        return apply_fsdp2(model, info, resolve_precision(train.precision, info.device))
    return wrap_ddp(model, info)


def apply_fsdp2(model: Transformer, info: DistInfo, precision: str) -> nn.Module:
    """fully_shard each block, then the root; bf16 parameters for compute and fp32 gradient reduction
    under precision bf16 (MixedPrecisionPolicy)."""
    raise NotImplementedError("train.engine=fsdp2")  # built in the engine work of issue 11


def compile_blocks(model: Transformer) -> None:
    """Compile each transformer block separately: short compile times, and the compiled graph is
    reused by every block of the same shape."""
    for block in model.blocks:
        block.compile()


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    if not info.enabled:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as it applies on `device`: auto = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights stay in the model) or a no-op for fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)
