"""Optimizers and their registry. Importing this package registers every optimizer."""

from optim import adamw  # noqa: F401  (registers "adamw")
from optim.config import OptimConfig
from optim.registry import REGISTRY, OptimizerSpec, build_optimizer, optimizer_spec, register

__all__ = ["REGISTRY", "OptimConfig", "OptimizerSpec", "build_optimizer", "optimizer_spec", "register"]
