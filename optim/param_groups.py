"""Classify a model's parameters and split them into parameter groups for the optimizer builders.

Builders receive the model; they use `describe_parameters` rather than parsing names themselves.
Roles: `embedding` (input table), `output` (lm head), `norm` (LayerNorm weights), `block_matrix`
(2-D weights inside transformer blocks; `layer` is the block index).

A parameter group is a dict `{"params": [...], "names": [...], <options>}`: the names travel with
the parameters (for logs and for the per-parameter optimizers of the fused path), the options
are the optimizer's per-group settings (`group_options`).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from optim.config import LowrankTargets, OptimConfig

LOWRANK_TARGETS: tuple[LowrankTargets, ...] = typing.get_args(LowrankTargets)
# The OptimConfig keys the group helpers below read (builders list them in their `reads`).
DECAY_GROUP_KEYS = ("weight_decay", "decay_norm_weights")
LOWRANK_GROUP_KEYS = (*DECAY_GROUP_KEYS, "lowrank_targets")
_GROUP_MEMBERS = ("params", "names")


@dataclass
class ParamInfo:
    name: str
    param: nn.Parameter
    role: str
    layer: int | None


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


def decay_split_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Two groups: with and without weight decay (LayerNorm weights undecayed by default).
    Reads DECAY_GROUP_KEYS of `cfg`."""
    groups: dict[float, dict[str, Any]] = {}
    for info in describe_parameters(model):
        wd = weight_decay_of(info, cfg.weight_decay, cfg.decay_norm_weights)
        group = groups.setdefault(wd, {"params": [], "names": [], "weight_decay": wd})
        group["params"].append(info.param)
        group["names"].append(info.name)
    return list(groups.values())


def is_lowrank_target(role: str, ndim: int, targets: str) -> bool:
    """`blocks`: 2-D weights inside transformer blocks; `all`: every 2-D weight (incl. embedding, output)."""
    if targets not in LOWRANK_TARGETS:
        raise ValueError(f"optim.lowrank_targets must be one of {LOWRANK_TARGETS}, got {targets!r}")
    if ndim != 2:
        return False
    return role == "block_matrix" if targets == "blocks" else True


def lowrank_split_groups(
    model: nn.Module, cfg: OptimConfig, lowrank_options: dict[str, Any], base_options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Groups keyed by (low-rank?, weight decay): low-rank groups get `lowrank_options`, the others
    `base_options` (both may be empty). Reads LOWRANK_GROUP_KEYS of `cfg`."""
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for info in describe_parameters(model):
        wd = weight_decay_of(info, cfg.weight_decay, cfg.decay_norm_weights)
        low = is_lowrank_target(info.role, info.param.dim(), cfg.lowrank_targets)
        opts = lowrank_options if low else (base_options or {})
        group = groups.setdefault((low, wd), {"params": [], "names": [], "weight_decay": wd, **opts})
        group["params"].append(info.param)
        group["names"].append(info.name)
    return list(groups.values())


def group_options(group: dict[str, Any]) -> dict[str, Any]:
    """A parameter group's optimizer options: everything but its members (`params`, `names`)."""
    return {k: v for k, v in group.items() if k not in _GROUP_MEMBERS}


def name_in_group(group: dict[str, Any], p: torch.Tensor) -> str:
    """The name of parameter `p` in `group` (for warnings); '?' when the group carries no names."""
    names = group.get("names")
    if names:
        for name, q in zip(names, group["params"], strict=True):
            if q is p:
                return name
    return "?"
