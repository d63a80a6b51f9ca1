"""Training FLOPs of a run setting, and `max_steps` derived from a FLOP budget.

model/flops.py counts the model alone; this module adds what the training settings change: a
projected backward (GaLore, `optim.projected_backward`) and low-rank adapters (`adapter.method`
lora / relora). It lives in trainer/ because it reads the optimizer and adapter sections.

The FLOP model, per token (an m x n linear weight costs 2mn forward, 2mn for the input gradient and
2mn for the weight gradient):

  F_full = model.flops_per_token(model, seq_len): 6 x non-embedding params + 12 L d T attention
           + 6 d V output layer (the ordinary backward of every optimizer).
  Projected backward (GaLore with optim.projected_backward: true), for every low-rank weight, i.e.
  every 2-D weight the optimizer's builder puts in a group with a `rank` (optim.lowrank_targets:
  blocks = the 2-D weights inside the blocks, all = every 2-D weight; read from the optimizer's own
  parameter groups on a meta-device model, so it follows the architecture), except the input
  embedding (a lookup: F_full counts no matmul for it, so there is none to replace): the weight-gradient
  part 2mn becomes 2r(m+n) (P^T G computed as (P^T A) B^T, AdaMeM paper Appendix B; one side,
  left or right) or 2r(m+n) + 2r^2 when both sides are projected (proj_type: full), with
  r = min(optim.rank, m, n). That is an ordinary step's F_projected. On a projector-refresh step
  (0-based step % update_proj_gap == 0, the first step included) the full gradient is formed for
  the SVD, so it costs F_full.
  Adapters (lora / relora): every adapted linear (each 2-D weight inside the blocks) has a frozen
  base, so no weight gradient (4mn instead of 6mn), plus its rank-r adapter's 6 r (m + n)
  (forward 2r(m+n), backward 4r(m+n)), r = adapter.rank. An adapted weight is never projected.

Cumulative training FLOPs after S steps of B tokens each, with T = update_proj_gap:

  FLOPs(S) = S B F_projected + ceil(S / T) B (F_full - F_projected)

(without a projected backward F_projected = F_full and the second term is 0). Not counted: the
optimizer's own work (SVDs, projecting the gradient and the update, the moment updates). It is per
step and per weight, not per token, so it shrinks relative to the step as the batch grows.

Budgets (`resolve_max_steps`): `train.flop_budget: <FLOPs>` sets max_steps to the largest S with
FLOPs(S) <= budget. `train.match_flops_of: <optimizer>` (and no flop_budget) first sets the budget
to the FLOPs that optimizer spends in `train.max_steps` steps with the ordinary backward and no
adapter, on the same model, batch and sequence length. Those FLOPs are F_full for every optimizer
(their own per-step work is not counted), so the name documents the reference and must be a
registered optimizer. The resolution writes the budget into `train.flop_budget` (rounded up to
the next float, so the reference's own max_steps derives back unchanged) and the derived
`train.max_steps`; a set `flop_budget` always wins and `match_flops_of` then only records where it
came from. So resolving a resolved config (run_dir/config.yaml) changes nothing, and a
`train.max_steps` given next to a `flop_budget` is replaced by the derived one. Warmup stays in
steps; the cosine spans the derived max_steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model import ModelConfig, Transformer, flops_per_token
from optim import REGISTRY, OptimConfig, optimizer_spec
from optim.param_groups import describe_parameters
from optim.projector import is_lowrank, projection_side
from trainer.config_parsing import ConfigError, suggest

__all__ = [
    "BudgetResolution",
    "RunSettings",
    "TrainingFlops",
    "config_flops",
    "float_at_least",
    "meta_transformer",
    "reference_flops",
    "resolve_max_steps",
    "training_flops",
]


@dataclass(frozen=True)
class TrainingFlops:
    """The training FLOPs of one setting (see the module docstring for the model)."""

    tokens_per_step: int
    """B: global_batch x seq_len."""
    per_token: int
    """F_projected: an ordinary step's FLOPs per token (= per_token_refresh without a projected backward)."""
    per_token_refresh: int
    """F_full with the adapters' changes: a projector-refresh step's FLOPs per token."""
    refresh_interval: int | None
    """T (optim.update_proj_gap) when the projected backward is on; None otherwise."""

    def is_refresh(self, step: int) -> bool:
        """Does 0-based `step` form the full gradient (a projector refresh)?"""
        return self.refresh_interval is not None and step % self.refresh_interval == 0

    def step_flops(self, step: int) -> int:
        """FLOPs of 0-based step `step`."""
        return self.tokens_per_step * (self.per_token_refresh if self.is_refresh(step) else self.per_token)

    def cumulative(self, steps: int) -> int:
        """FLOPs of the first `steps` steps: steps B F_projected + ceil(steps / T) B (F_full - F_projected)."""
        refreshes = 0 if self.refresh_interval is None else -(-steps // self.refresh_interval)
        return self.tokens_per_step * (steps * self.per_token + refreshes * (self.per_token_refresh - self.per_token))

    def max_steps_within(self, budget: float) -> int:
        """The largest S with cumulative(S) <= budget (0 when even one step exceeds it)."""
        if not math.isfinite(budget):
            raise ValueError(f"the FLOP budget must be finite, got {budget}")
        # cumulative() grows strictly with S (every step costs > 0): double, then bisect, on exact ints.
        lo, hi = 0, 1
        while self.cumulative(hi) <= budget:
            lo, hi = hi, 2 * hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.cumulative(mid) <= budget else (lo, mid)
        return lo


_META_MODELS: dict[tuple[Any, ...], Transformer] = {}


def meta_transformer(model: ModelConfig) -> Transformer:
    """A Transformer of `model` on the meta device (shapes only, no memory), built once per distinct model config
    and shared: building one still runs every initialiser on meta tensors (~0.2 s at 210m), and validating a sweep
    or a study counts the FLOPs of hundreds of runs of a few models. Callers only read its parameters' names and
    shapes."""
    key = dataclasses.astuple(model)
    net = _META_MODELS.get(key)
    if net is None:
        with torch.device("meta"):
            net = _META_MODELS[key] = Transformer(model)
    return net


def training_flops(
    model: ModelConfig,
    optim: OptimConfig,
    *,
    seq_len: int,
    global_batch: int,
    adapter_method: str = "none",
    adapter_rank: int = 0,
) -> TrainingFlops:
    """The TrainingFlops of `model` trained by `optim` on global_batch x seq_len tokens per step, with
    adapters when `adapter_method` is lora or relora (rank `adapter_rank`)."""
    full = flops_per_token(model, seq_len)
    adapted = adapter_method in ("lora", "relora")
    projected = optim.projected_backward
    if not adapted and not projected:  # the ordinary count: no need to look at the weights
        return TrainingFlops(global_batch * seq_len, full, full, None)
    net = meta_transformer(model)
    roles = {info.name: info.role for info in describe_parameters(net)}
    adapter_change = 0  # per token, on every step
    if adapted:
        for name, p in net.named_parameters():
            if roles[name] == "block_matrix":
                m, n = p.shape
                adapter_change += -2 * m * n + 6 * adapter_rank * (m + n)
    projection_change = 0  # per token, on steps that do not refresh the projector
    interval = None
    if projected:
        for group in optimizer_spec(net, optim).param_groups:
            if not group.get("projected_backward"):
                continue
            interval = group["update_proj_gap"]
            for name, p in zip(group["names"], group["params"], strict=True):
                # Adapted weights have no weight gradient to project; the embedding is a lookup whose
                # gradient (a scatter-add of the output gradients) F_full does not count, so nothing to replace.
                if (
                    not is_lowrank(group, p)
                    or (adapted and roles[name] == "block_matrix")
                    or roles[name] == "embedding"
                ):
                    continue
                m, n = p.shape
                r = min(group["rank"], m, n)
                both_sides = projection_side(p.shape, group["proj_type"]) == "full"
                projection_change += -2 * m * n + 2 * r * (m + n) + (2 * r * r if both_sides else 0)
    refresh = full + adapter_change
    return TrainingFlops(global_batch * seq_len, refresh + projection_change, refresh, interval)


class _DataKeys(Protocol):
    @property
    def seq_len(self) -> int: ...


class _AdapterKeys(Protocol):
    @property
    def method(self) -> str: ...

    @property
    def rank(self) -> int: ...


class _TrainKeys(Protocol):
    max_steps: int
    flop_budget: float | None
    match_flops_of: str | None

    @property
    def global_batch(self) -> int: ...


class RunSettings(Protocol):
    """The parts of trainer.config.Config read here. A Protocol, not Config itself: trainer/config.py
    calls resolve_max_steps from load_config, so importing Config here would make an import cycle."""

    @property
    def model(self) -> ModelConfig: ...

    @property
    def optim(self) -> OptimConfig: ...

    @property
    def data(self) -> _DataKeys: ...

    @property
    def adapter(self) -> _AdapterKeys: ...

    @property
    def train(self) -> _TrainKeys: ...


def config_flops(cfg: RunSettings) -> TrainingFlops:
    """The TrainingFlops of a Config."""
    return training_flops(
        cfg.model,
        cfg.optim,
        seq_len=cfg.data.seq_len,
        global_batch=cfg.train.global_batch,
        adapter_method=cfg.adapter.method,
        adapter_rank=cfg.adapter.rank,
    )


def reference_flops(cfg: RunSettings, name: str) -> TrainingFlops:
    """What optimizer `name` spends with the ordinary backward and no adapter on cfg's model and batch."""
    plain = OptimConfig(name=name)  # its defaults: projected_backward off
    return training_flops(cfg.model, plain, seq_len=cfg.data.seq_len, global_batch=cfg.train.global_batch)


def float_at_least(value: int) -> float:
    """The smallest float >= `value` (float(value) rounds to nearest, which may be below it)."""
    f = float(value)
    return f if f >= value else math.nextafter(f, math.inf)


@dataclass(frozen=True)
class BudgetResolution:
    """How train.max_steps was derived (for the run header)."""

    max_steps: int
    flop_budget: float
    match_flops_of: str | None
    matched_steps: int | None
    """The steps match_flops_of's optimizer takes within the budget (its train.max_steps before resolution)."""

    def describe(self) -> str:
        """e.g. 'max_steps 10,157 from flop_budget 4.945e+18 (FLOP-matched to adamw at 8,000 steps)'."""
        text = f"max_steps {self.max_steps:,} from flop_budget {self.flop_budget:.4g}"
        if self.match_flops_of is not None:
            text += f" (FLOP-matched to {self.match_flops_of} at {self.matched_steps:,} steps)"
        return text


def resolve_max_steps(cfg: RunSettings) -> BudgetResolution | None:
    """Set cfg.train.flop_budget (from match_flops_of when unset) and derive cfg.train.max_steps from it;
    None (and cfg unchanged) when neither key is set. Idempotent: resolving again changes nothing.
    ConfigError for an unregistered match_flops_of, a budget that is not positive and finite, or one
    smaller than the first step."""
    t = cfg.train
    if t.flop_budget is None and t.match_flops_of is None:
        return None
    name = t.match_flops_of
    if name is not None and name not in REGISTRY:
        raise ConfigError(f"train.match_flops_of={name!r} is not a registered optimizer.{suggest(name, REGISTRY)}")
    if t.flop_budget is None:
        assert name is not None  # one of the two is set; validate() has checked that max_steps is positive
        t.flop_budget = float_at_least(reference_flops(cfg, name).cumulative(t.max_steps))
    budget = t.flop_budget
    if not (math.isfinite(budget) and budget > 0):
        raise ConfigError(f"train.flop_budget={budget} must be a positive number of FLOPs (e.g. 4.9e18), or null")
    flops = config_flops(cfg)
    steps = flops.max_steps_within(budget)
    if steps == 0:
        raise ConfigError(
            f"train.flop_budget={budget:.4g} is less than one step ({flops.step_flops(0):.4g} FLOPs: "
            f"{flops.tokens_per_step:,} tokens x {flops.per_token_refresh:,} FLOPs/token); raise it"
        )
    t.max_steps = steps
    matched = reference_flops(cfg, name).max_steps_within(budget) if name is not None else None
    return BudgetResolution(steps, budget, name, matched)
