"""Optimizers and their registry. Importing this package registers every optimizer."""

from optim import adamw  # noqa: F401  (registers "adamw"; the class is torch's, nothing to export)
from optim.adafactor import Adafactor
from optim.adalomo import AdaLomo
from optim.adamem import AdaMeM
from optim.config import OptimConfig
from optim.galore import GaLoreAdafactor, GaLoreAdamW
from optim.registry import REGISTRY, OptimizerSpec, optimizer_keys, optimizer_spec, register
from optim.validation import validate_optim_config

__all__ = [
    # memory-efficient optimizers (importing their modules registered them)
    "AdaLomo",
    "AdaMeM",
    "Adafactor",
    "GaLoreAdafactor",
    "GaLoreAdamW",
    # registry and config
    "REGISTRY",
    "OptimConfig",
    "OptimizerSpec",
    "optimizer_keys",
    "optimizer_spec",
    "register",
    "validate_optim_config",
]
