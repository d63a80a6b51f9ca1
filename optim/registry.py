"""Optimizer registry: name -> builder(model, OptimConfig) -> OptimizerSpec.

A builder only decides *what* to build (class, parameter groups with per-group options,
constructor keywords). The trainer then builds one optimizer over all groups (`spec.build()`),
or, for fused in-backward updates, one optimizer per parameter (`optim.in_backward`), from the
same spec, so both paths do the same per-parameter math.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from optim.config import OptimConfig


@dataclass
class OptimizerSpec:
    cls: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]  # each: {"params": [...], "names": [...], <options>}
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.optim.Optimizer:
        return self.cls(self.param_groups, **self.kwargs)


Builder = Callable[[nn.Module, OptimConfig], OptimizerSpec]
REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"optimizer {name!r} registered twice")
        REGISTRY[name] = builder
        return builder

    return wrap


def optimizer_spec(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    if cfg.name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(cfg.name, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown optimizer optim.name={cfg.name!r}.{hint} Registered: {sorted(REGISTRY)}")
    return REGISTRY[cfg.name](model, cfg)

