"""AdamW: torch.optim.AdamW, fused on CUDA."""

from __future__ import annotations

import torch
from torch import nn

from optim.config import OptimConfig
from optim.param_groups import decay_split_groups
from optim.registry import OptimizerSpec, register


@register("adamw")
def build_adamw(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    if cfg.beta1 is None:
        raise ValueError("adamw needs optim.beta1 (a float); null means 'no momentum' only for Adafactor")
    on_cuda = next(model.parameters()).is_cuda
    fused = on_cuda if cfg.fused is None else cfg.fused
    return OptimizerSpec(
        torch.optim.AdamW,
        decay_split_groups(model, cfg),
        dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused, foreach=None if fused else False),
    )
