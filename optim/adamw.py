"""AdamW: torch.optim.AdamW, fused on CUDA."""

from __future__ import annotations

import torch
from torch import nn

from optim.config import OptimConfig
from optim.param_groups import DECAY_GROUP_KEYS, decay_split_groups
from optim.registry import OptimizerSpec, register
from optim.validation import momentum_beta1


@register("adamw", reads=("lr", "beta1", "beta2", "eps", "fused", *DECAY_GROUP_KEYS), check=momentum_beta1)
def build_adamw(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    on_cuda = next(model.parameters()).is_cuda
    fused = on_cuda if cfg.fused is None else cfg.fused
    return OptimizerSpec(
        torch.optim.AdamW,
        decay_split_groups(model, cfg),
        dict(
            lr=cfg.lr,
            betas=(momentum_beta1(cfg), cfg.beta2),
            eps=cfg.eps,
            fused=fused,
            foreach=None,  # torch's choice where not fused: foreach on CUDA, its single-tensor loop on CPU
        ),
    )
