"""Applies training-time wrappers to the model: torch.compile per block, then DDP."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from model import Transformer
from trainer.distributed import DistInfo


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
