"""Classify a model's parameters so optimizer builders can pick groups by role and layer.

Builders receive the model; they use `describe_parameters` rather than parsing names themselves.
Roles: `embedding` (input table), `output` (lm head), `norm` (LayerNorm weights), `block_matrix`
(2-D weights inside transformer blocks; `layer` is the block index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn


@dataclass
class ParamInfo:
    name: str
    param: nn.Parameter
    role: str
    layer: Optional[int]


def describe_parameters(model: nn.Module) -> list[ParamInfo]:
    model = getattr(model, "module", model)  # unwrap DDP
    infos = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.replace("_orig_mod.", "")  # torch.compile wrappers
        layer = None
        if name.startswith("blocks."):
            layer = int(name.split(".")[1])
        if p.dim() < 2:
            role = "norm"
        elif layer is not None:
            role = "block_matrix"
        elif name.startswith("embed."):
            role = "embedding"
        else:
            role = "output"
        infos.append(ParamInfo(name, p, role, layer))
    return infos


def weight_decay_of(info: ParamInfo, weight_decay: float, decay_norm_weights: bool) -> float:
    return weight_decay if (info.role != "norm" or decay_norm_weights) else 0.0


def decay_split_groups(model: nn.Module, cfg) -> list[dict]:
    """Two groups: with and without weight decay (LayerNorm weights undecayed by default).
    `cfg` is an OptimConfig (reads weight_decay, decay_norm_weights)."""
    groups: dict[float, dict] = {}
    for info in describe_parameters(model):
        wd = weight_decay_of(info, cfg.weight_decay, cfg.decay_norm_weights)
        group = groups.setdefault(wd, {"params": [], "names": [], "weight_decay": wd})
        group["params"].append(info.param)
        group["names"].append(info.name)
    return list(groups.values())
