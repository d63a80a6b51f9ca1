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

State (fp32): `step`, `exp_avg`, `exp_avg_sq` (AdamW) or the Adafactor statistics, and for low-rank
parameters `proj_left`/`proj_right`, `proj_updates` (refresh count), `moment_step` (bias-correction
step, restarts with `reset`), `svd_failures` (when any; `optimizer.svd_failures` sums them).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from optim.adafactor import Adafactor, step_size
from optim.fp32_state import FP32StateOptimizer
from optim.projector import ProjectorCounters, project, project_back, projection_side, refresh_projector

LOWRANK_DEFAULTS = dict(rank=None, update_proj_gap=200, scale=1.0, proj_type="std", svd_method="exact",
                        moments_on_proj_change="keep")


def is_lowrank(group: dict, p: torch.Tensor) -> bool:
    return group.get("rank") is not None and p.dim() == 2


def _lowrank_pre_step(opt, p: torch.Tensor, group: dict, g: torch.Tensor, first_keys, moment_keys) -> torch.Tensor:
    """Refresh the projector if due, return the projected gradient. Handles state init."""
    state = opt.state[p]
    if "step" not in state:
        state["step"] = 0
        state["moment_step"] = 0
    side = projection_side(g.shape, group["proj_type"])
    refresh_projector(state, g, group, side, first_keys, moment_keys, name=_name_of(group, p))
    return project(g, state)


def _name_of(group: dict, p: torch.Tensor) -> str:
    for name, q in zip(group.get("names", ()), group["params"]):
        if q is p:
            return name
    return "?"


class GaLoreAdamW(ProjectorCounters, FP32StateOptimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.0,
                 correct_bias: bool = True, **lowrank):
        unknown = set(lowrank) - set(LOWRANK_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown GaLoreAdamW options {sorted(unknown)}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, correct_bias=correct_bias,
                        **{**LOWRANK_DEFAULTS, **lowrank})
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                lowrank = is_lowrank(group, p)
                if lowrank:
                    g = _lowrank_pre_step(self, p, group, g, ("exp_avg",), ("exp_avg", "exp_avg_sq"))
                elif "step" not in state:
                    state["step"] = 0
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
                if lowrank:
                    n = project_back(n, state) * group["scale"]
                p.add_(n.to(p.dtype), alpha=-lr_t)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


class GaLoreAdafactor(Adafactor):
    def __init__(self, params, lr: float = 1e-3, momentum_style: str = "hf", **kwargs):
        lowrank = {k: kwargs.pop(k) for k in list(kwargs) if k in LOWRANK_DEFAULTS}
        super().__init__(params, lr=lr, momentum_style=momentum_style, **kwargs)
        for group in self.param_groups:  # low-rank defaults for groups that did not set them
            for k, v in {**LOWRANK_DEFAULTS, **lowrank}.items():
                group.setdefault(k, v)
        self.defaults.update({**LOWRANK_DEFAULTS, **lowrank})

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        if not is_lowrank(group, p):
            return super()._step_param(p, group)
        state = self.state[p]
        g = _lowrank_pre_step(self, p, group, p.grad.float(), ("exp_avg",),
                              ("exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"))
        state["step"] += 1
        state["moment_step"] += 1
        lr_t = step_size(group, state["step"], p)
        delta = self.adafactor_delta(g, state, group, state["moment_step"], lr_t)
        delta = project_back(delta, state) * group["scale"]
        self.apply(p, delta, lr_t, group["weight_decay"])


# --- registry ---------------------------------------------------------------------------------

from torch import nn  # noqa: E402

from optim.config import OptimConfig  # noqa: E402
from optim.param_groups import describe_parameters, weight_decay_of  # noqa: E402
from optim.registry import OptimizerSpec, register  # noqa: E402

LOWRANK_TARGETS = ("blocks", "all")


def is_lowrank_target(role: str, ndim: int, targets: str) -> bool:
    """`blocks`: 2-D weights inside transformer blocks; `all`: every 2-D weight (incl. embedding, output)."""
    if targets not in LOWRANK_TARGETS:
        raise ValueError(f"optim.lowrank_targets must be one of {LOWRANK_TARGETS}, got {targets!r}")
    if ndim != 2:
        return False
    return role == "block_matrix" if targets == "blocks" else True


def lowrank_split_groups(model: nn.Module, cfg: OptimConfig, lowrank_options: dict,
                         base_options: Optional[dict] = None) -> list[dict]:
    """Groups keyed by (low-rank?, weight decay): low-rank groups get `lowrank_options`, the others
    `base_options` (both may be empty); names travel with params for logs and per-param optimizers."""
    groups: dict[tuple, dict] = {}
    for info in describe_parameters(model):
        wd = weight_decay_of(info, cfg.weight_decay, cfg.decay_norm_weights)
        low = is_lowrank_target(info.role, info.param.dim(), cfg.lowrank_targets)
        opts = lowrank_options if low else (base_options or {})
        group = groups.setdefault((low, wd), {"params": [], "names": [], "weight_decay": wd, **opts})
        group["params"].append(info.param)
        group["names"].append(info.name)
    return list(groups.values())


def galore_options(cfg: OptimConfig) -> dict:
    return dict(rank=cfg.rank, update_proj_gap=cfg.update_proj_gap, scale=cfg.scale, proj_type=cfg.proj_type,
                svd_method=cfg.svd_method, moments_on_proj_change=cfg.moments_on_proj_change)


def adafactor_kwargs(cfg: OptimConfig, momentum_style: str) -> dict:
    return dict(lr=cfg.lr, beta1=cfg.beta1, beta2=cfg.beta2, beta2_decay=cfg.beta2_decay, eps=cfg.eps,
                eps1=cfg.eps1, eps2=cfg.eps2, clip_threshold=cfg.clip_threshold,
                scale_parameter=cfg.scale_parameter, relative_step=cfg.relative_step, warmup_init=cfg.warmup_init,
                one_sided=cfg.one_sided, momentum_style=cfg.momentum_style or momentum_style)


@register("galore_adamw")
def build_galore_adamw(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    if cfg.beta1 is None:
        raise ValueError("galore_adamw needs optim.beta1 (a float)")
    return OptimizerSpec(
        GaLoreAdamW,
        lowrank_split_groups(model, cfg, galore_options(cfg)),
        dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps),
    )


@register("galore_adafactor")
def build_galore_adafactor(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    return OptimizerSpec(
        GaLoreAdafactor,
        lowrank_split_groups(model, cfg, galore_options(cfg)),
        adafactor_kwargs(cfg, momentum_style="hf"),  # galore_torch's momentum unless optim.momentum_style
    )
