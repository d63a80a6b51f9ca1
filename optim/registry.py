"""Optimizer registry: name -> builder(model, OptimConfig) -> OptimizerSpec, plus what each reads.

A builder only decides *what* to build (class, parameter groups with per-group options,
constructor keywords). The trainer then builds one optimizer over all groups (`spec.build()`),
or, for fused in-backward updates, one optimizer per parameter (`optim.in_backward`), from the
same spec, so both paths do the same per-parameter math.

Each registration declares the OptimConfig keys its builder reads (`reads`; tests check the
declaration against the keys the builder actually touches) and optionally a `check` of
cross-key constraints. `optim.validation.validate_optim_config` uses both to reject, at
config-load time, keys the chosen optimizer would silently ignore and invalid combinations;
`optimizer_spec` runs the check too, so a direct call fails with the same message.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from optim.config import OptimConfig

OPTIM_KEYS = frozenset(f.name for f in dataclasses.fields(OptimConfig))


@dataclass
class OptimizerSpec:
    cls: type[torch.optim.Optimizer]
    param_groups: list[dict[str, Any]]  # each: {"params": [...], "names": [...], <options>}
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> torch.optim.Optimizer:
        return self.cls(self.param_groups, **self.kwargs)


Builder = Callable[[nn.Module, OptimConfig], OptimizerSpec]
# Raises ValueError (naming the keys and the fix) when the keys' combination is invalid.
ConfigCheck = Callable[[OptimConfig], object]


@dataclass(frozen=True)
class Registration:
    name: str
    builder: Builder
    reads: frozenset[str]  # OptimConfig keys the builder reads (`name` is implied)
    check: ConfigCheck | None


REGISTRY: dict[str, Builder] = {}
REGISTRATIONS: dict[str, Registration] = {}


def register(name: str, *, reads: Iterable[str], check: ConfigCheck | None = None) -> Callable[[Builder], Builder]:
    """Decorator: register `builder` as optimizer `name`, reading the OptimConfig keys `reads`."""
    keys = frozenset(reads)
    unknown = keys - OPTIM_KEYS
    if unknown:
        raise ValueError(f"optimizer {name!r} declares unknown OptimConfig keys {sorted(unknown)}")

    def wrap(builder: Builder) -> Builder:
        if name in REGISTRY:
            raise ValueError(f"optimizer {name!r} registered twice")
        REGISTRY[name] = builder
        REGISTRATIONS[name] = Registration(name, builder, keys, check)
        return builder

    return wrap


def unknown_name_message(name: str) -> str:
    by_lower = {n.lower(): n for n in REGISTRY}  # ADAMW -> adamw
    close = difflib.get_close_matches(str(name).lower(), list(by_lower), n=1)
    hint = f" Did you mean {by_lower[close[0]]!r}?" if close else ""
    return f"unknown optimizer optim.name={name!r}.{hint} Registered: {sorted(REGISTRY)}"


def registration(name: str) -> Registration:
    """The registration of optimizer `name`; ValueError with the nearest registered name if none."""
    if name not in REGISTRATIONS:
        raise ValueError(unknown_name_message(name))
    return REGISTRATIONS[name]


def optimizer_keys(name: str) -> frozenset[str]:
    """The OptimConfig keys optimizer `name` reads, `name` itself included."""
    return registration(name).reads | {"name"}


def optimizer_spec(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    """What to build for `cfg` (`cfg.name`'s builder, after its cross-key check).

    Does not run the full `validate_optim_config` (keys the optimizer ignores are allowed here:
    tools and tests build several optimizers from one config)."""
    if cfg.name not in REGISTRY:
        raise ValueError(unknown_name_message(cfg.name))
    entry = REGISTRATIONS.get(cfg.name)
    if entry is not None and entry.check is not None:
        entry.check(cfg)
    return REGISTRY[cfg.name](model, cfg)
