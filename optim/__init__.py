"""Optimizers and their registry. Importing this package registers every optimizer."""

from optim import adamw  # noqa: F401  (registers "adamw")
from optim import adafactor, adamem, galore  # noqa: F401  (register adafactor, adamem, galore_*)
from optim.adafactor import Adafactor
from optim.adamem import AdaMeM
from optim.galore import GaLoreAdafactor, GaLoreAdamW
from optim import adalomo  # noqa: F401  (registers "adalomo")
from optim.adalomo import AdaLomo
from optim.config import OptimConfig
from optim.registry import REGISTRY, OptimizerSpec, build_optimizer, optimizer_spec, register

__all__ = [
    "AdaLomo", "Adafactor", "AdaMeM", "GaLoreAdafactor", "GaLoreAdamW",  # memory-efficient optimizers
    "REGISTRY", "OptimConfig", "OptimizerSpec", "build_optimizer", "optimizer_spec", "register"]
