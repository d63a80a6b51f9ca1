"""GaLore (Zhao et al. 2024): AdamW / Adafactor run on the projected gradient, as `galore_torch` 1.0.

Parameter groups carry the low-rank options exactly as in galore_torch: a group with
`rank` (not None) is low-rank, with `update_proj_gap` (T, default 200), `scale` (alpha, default
1.0 as the reference projector; the paper's runs use .25 or the sweep), `proj_type` (std,
reverse_std, left, right, full; see optim/projector.py). Extra per-group switches (ours):
`svd_method` (exact | randomized) and `moments_on_proj_change` (keep = reference | reset | rotate).
1-D parameters in a low-rank group are updated full-rank (the reference would fail on them).

For a low-rank parameter, with `step` = completed steps before this one (0 first):
  if step % T == 0 (or no basis yet): new bases from the SVD of the fp32 gradient
  R = project(G) (r x n, m x r or r x r); the base optimizer runs on R with state in R's shape;
  its normalised update N is back-projected and multiplied by alpha: scale * project_back(N).

GaLoreAdamW (galore_torch.AdamW, i.e. HF's former AdamW, not torch.optim.AdamW):
  m = b1 m + (1 - b1) R, v = b2 v + (1 - b2) R^2, N = m / (sqrt(v) + eps)   (eps on the
  *uncorrected* sqrt(v)), W <- W - lr sqrt(1 - b2^t) / (1 - b1^t) * [scale *] back(N),
  then W <- W - lr wd W (decoupled, scaled by lr, applied *after* the update as the reference).
  Groups without `rank` get the same AdamW on the full gradient (the embedding, output layer and
  LayerNorms in the paper's "GaLore on blocks" runs). Defaults: betas (.9, .999), eps 1e-6 as
  the reference; the registry passes the paper's (.9, .95), 1e-8.

GaLoreAdafactor (galore_torch.Adafactor): optim.adafactor's math on R; lr_t (relative_step,
  scale_parameter with RMS of the *full* weight W) and RMS clipping in the low-rank space; the
  lr-scaled Delta (incl. momentum) is back-projected and scaled; weight decay before the update.
  `momentum_style` defaults to "hf" here (the reference: momentum of the lr-scaled update, no
  bias correction); "adam" gives the Adam-like momentum of optim.Adafactor.

Projected backward (`projected_backward=True`, optim/projected_backward.py): between refreshes the
gradient of a low-rank weight arrives already projected (R = project(G), computed in backward without
forming G) in its carrier (optim/projected_grads.py) instead of `.grad`; `step()` then uses R as is,
with the same state and math (the projector is not refreshed: the forward was told it would not be).

Sharded parameters (FSDP2 row shards, optim/sharding.py): a refresh gathers the full gradient on one
owner rank per matrix, which runs the SVD and broadcasts the bases (optim/projector.py); a left basis
P is kept as this rank's rows, so R = P^T G is a local product plus one all-reduce of r x n (R and its
moments then whole on every rank); a right projection is local (R keeps G's row split).

State (fp32): `step`, `exp_avg`, `exp_avg_sq` (AdamW) or the Adafactor statistics, and for low-rank
parameters `proj_left`/`proj_right`, `proj_updates` (refresh count), `moment_step` (bias-correction
step, restarts with `reset`), `svd_failures` (when any; `optimizer.svd_failures` sums them).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from optim.adafactor import ADAFACTOR_KEYS, Adafactor, adafactor_kwargs, step_size
from optim.config import OptimConfig
from optim.fp32_state import FP32StateOptimizer
from optim.param_groups import LOWRANK_GROUP_KEYS, lowrank_split_groups, name_in_group
from optim.projected_grads import ProjectedGrads, check_projected_step
from optim.projector import (
    PROJECTOR_DEFAULTS,
    ProjectorCounters,
    add_projected_back_,
    is_lowrank,
    project,
    project_back,
    projected_sharding,
    projection_side,
    refresh_projector,
)
from optim.registry import OptimizerSpec, register
from optim.sharding import local, sharding_of
from optim.validation import momentum_beta1

# projected_backward: the group's projected gradients are computed in backward (optim/projected_backward.py).
LOWRANK_DEFAULTS: dict[str, Any] = {**PROJECTOR_DEFAULTS, "scale": 1.0, "proj_type": "std", "projected_backward": False}
# The OptimConfig keys `galore_options` reads.
GALORE_KEYS = (
    "rank",
    "update_proj_gap",
    "scale",
    "proj_type",
    "svd_method",
    "moments_on_proj_change",
    "projected_backward",
)


def _lowrank_pre_step(
    opt: torch.optim.Optimizer,
    p: torch.Tensor,
    group: dict,
    g: torch.Tensor | None,
    first_keys: tuple[str, ...],
    moment_keys: tuple[str, ...],
    projected: torch.Tensor | None = None,
) -> torch.Tensor:
    """Refresh the projector if due, return the projected gradient. Handles state init.

    `projected`: R already computed in backward (g is then None): returned as is, after checking that
    no refresh is due (a refresh needs the full gradient)."""
    state = opt.state[p]
    if projected is not None:
        check_projected_step(state, group, name_in_group(group, p))
        return projected.float()
    assert g is not None
    if "step" not in state:
        state["step"] = 0
        state["moment_step"] = 0
    sh = sharding_of(p)  # g is p's local gradient (FSDP2: this rank's rows)
    side = projection_side(sh.full_shape(g), group["proj_type"])
    refresh_projector(state, g, group, side, first_keys, moment_keys, name=name_in_group(group, p), sh=sh)
    return project(g, state, sh)


def lowrank_state_shard_dim(shape: Sequence[int], group: dict, key: str, row_split_keys: tuple[str, ...]) -> int | None:
    """state_shard_dim of a low-rank parameter of full `shape`: a left basis (m x r) follows the rows; a
    right basis is whole; R's moments and statistics (`row_split_keys`, those of R's rows) follow the
    rows only when R = G Q^T keeps them (a right projection)."""
    if key == "proj_left":
        return 0
    side = projection_side(tuple(shape), group["proj_type"])
    return 0 if side == "right" and key in row_split_keys else None


class GaLoreAdamW(ProjectedGrads, ProjectorCounters, FP32StateOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
        **lowrank: Any,
    ):
        unknown = set(lowrank) - set(LOWRANK_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown GaLoreAdamW options {sorted(unknown)}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            correct_bias=correct_bias,
            **{**LOWRANK_DEFAULTS, **lowrank},
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.projected_grads = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                low = self.take_projected_grad(p)  # R from the projected backward, when p.grad is None
                if p.grad is None and low is None:
                    continue
                g = local(p.grad).float() if p.grad is not None else None
                state = self.state[p]
                lowrank = is_lowrank(group, p)
                if lowrank:
                    g = _lowrank_pre_step(self, p, group, g, ("exp_avg",), ("exp_avg", "exp_avg_sq"), low)
                elif "step" not in state:
                    state["step"] = 0
                assert g is not None  # only low-rank parameters receive projected gradients
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = state["step"]
                if lowrank:
                    state["moment_step"] += 1
                    t = state["moment_step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(g, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                denom = exp_avg_sq.sqrt().add_(group["eps"])
                lr_t = group["lr"]
                if group["correct_bias"]:
                    lr_t = lr_t * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                n = exp_avg / denom
                mine = local(p)  # FSDP2: this rank's rows, updated in place
                # W <- (W - lr_t scale back(N)) (1 - lr wd): for a low-rank W one addmm_ into W does all of it
                keep = 1.0 - group["lr"] * group["weight_decay"] if group["weight_decay"] > 0.0 else 1.0
                if lowrank and add_projected_back_(mine, n, state, keep, -lr_t * group["scale"] * keep):
                    continue
                if lowrank:
                    n = project_back(n, state) * group["scale"]
                mine.add_(n.to(mine.dtype), alpha=-lr_t)
                if group["weight_decay"] > 0.0:
                    mine.add_(mine, alpha=-group["lr"] * group["weight_decay"])
        return loss

    def state_shard_dim(self, p: torch.Tensor, group: dict, key: str, full_shape: Sequence[int]) -> int | None:
        """optim.sharding.ShardedState (see lowrank_state_shard_dim); full-rank parameters: the moments."""
        if is_lowrank(group, p):
            return lowrank_state_shard_dim(p.shape, group, key, ("exp_avg", "exp_avg_sq"))
        return 0 if key in ("exp_avg", "exp_avg_sq") else None


class GaLoreAdafactor(ProjectedGrads, Adafactor):
    def __init__(self, params, lr: float = 1e-3, momentum_style: str = "hf", **kwargs: Any):
        lowrank = {k: kwargs.pop(k) for k in list(kwargs) if k in LOWRANK_DEFAULTS}
        super().__init__(params, lr=lr, momentum_style=momentum_style, **kwargs)
        for group in self.param_groups:  # low-rank defaults for groups that did not set them
            for k, v in {**LOWRANK_DEFAULTS, **lowrank}.items():
                group.setdefault(k, v)
        self.defaults.update({**LOWRANK_DEFAULTS, **lowrank})

    @torch.no_grad()
    def step(self, closure=None):
        """Adafactor.step (the parameters with a full gradient; a projected one leaves p.grad None), then the
        parameters whose gradient arrived projected (optim/projected_grads.py). Each parameter's update
        depends on that parameter alone, so the order changes nothing."""
        self.projected_grads = 0
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                low = self.take_projected_grad(p)
                if low is not None:
                    self._step_lowrank(p, group, None, low)
        return loss

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        if not is_lowrank(group, p):
            return super()._step_param(p, group)
        assert p.grad is not None  # step() skips parameters without a gradient
        self._step_lowrank(p, group, local(p.grad).float(), None)

    def state_shard_dim(self, p: torch.Tensor, group: dict, key: str, full_shape: Sequence[int]) -> int | None:
        """optim.sharding.ShardedState: Adafactor's rule, on R for low-rank parameters."""
        if is_lowrank(group, p):
            return lowrank_state_shard_dim(p.shape, group, key, ("exp_avg", "exp_avg_sq", "exp_avg_sq_row"))
        return super().state_shard_dim(p, group, key, full_shape)

    def _step_lowrank(self, p: torch.Tensor, group: dict, grad: torch.Tensor | None, low: torch.Tensor | None) -> None:
        """One low-rank step from the full gradient `grad` or the projected one `low` (exactly one given)."""
        state = self.state[p]
        g = _lowrank_pre_step(
            self, p, group, grad, ("exp_avg",), ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"), low
        )
        state["step"] += 1
        state["moment_step"] += 1
        lr_t = step_size(group, state["step"], p)
        sh = sharding_of(p)
        r_sh = projected_sharding(sh, projection_side(p.shape, group["proj_type"]))  # p.shape: the full one
        delta = self.adafactor_delta(g, state, group, state["moment_step"], lr_t, sh=r_sh)
        # W <- W (1 - lr_t wd) - scale back(Delta): one addmm_ into W where the projection is one-sided
        keep = 1.0 - lr_t * group["weight_decay"] if group["weight_decay"] else 1.0
        if add_projected_back_(local(p), delta, state, keep, -group["scale"]):
            return
        delta = project_back(delta, state) * group["scale"]
        self.apply_delta(local(p), delta, lr_t, group["weight_decay"])


def galore_options(cfg: OptimConfig) -> dict[str, Any]:
    """Per-group options of the low-rank groups, from GALORE_KEYS of `cfg`."""
    return dict(
        rank=cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        scale=cfg.scale,
        proj_type=cfg.proj_type,
        svd_method=cfg.svd_method,
        moments_on_proj_change=cfg.moments_on_proj_change,
        projected_backward=cfg.projected_backward,
    )


@register(
    "galore_adamw", reads=("lr", "beta1", "beta2", "eps", *GALORE_KEYS, *LOWRANK_GROUP_KEYS), check=momentum_beta1
)
def build_galore_adamw(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    return OptimizerSpec(
        GaLoreAdamW,
        lowrank_split_groups(model, cfg, galore_options(cfg)),
        dict(lr=cfg.lr, betas=(momentum_beta1(cfg), cfg.beta2), eps=cfg.eps),
    )


@register("galore_adafactor", reads=(*ADAFACTOR_KEYS, *GALORE_KEYS, *LOWRANK_GROUP_KEYS))
def build_galore_adafactor(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    return OptimizerSpec(
        GaLoreAdafactor,
        lowrank_split_groups(model, cfg, galore_options(cfg)),
        adafactor_kwargs(cfg, momentum_style="hf"),  # galore_torch's momentum unless optim.momentum_style
    )
