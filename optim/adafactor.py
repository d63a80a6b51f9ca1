"""Adafactor (Shazeer & Stern 2018), used like Adam as in the AdaMeM paper, with HF's switches.

Per parameter with gradient G (m x n), t = number of this parameter's steps (1 on the first):

  beta2_t = beta2                         (constant, the paper: .95), bias correction c2 = 1 - beta2^t
          = 1 - t^beta2_decay              (Adafactor's schedule, e.g. beta2_decay = -0.8), c2 = 1
            (beta2_1 = 0, so the EMA is already unbiased: 1 - prod_s beta2_s = 1)
  Q = G^2 + eps1                          (eps1 as HF's eps[0], 1e-30)
  factored (2-D, default):  r = beta2_t r + (1 - beta2_t) mean_cols(Q)   (length m, one per row)
                            c = beta2_t c + (1 - beta2_t) mean_rows(Q)   (length n, one per column)
                            V_hat = r c^T / (mean(r) c2)
  one_sided (2-D):          one statistic on the larger side only: per column (length n) if
                            m <= n, else per row (length m); V_hat = c / c2 broadcast (AdaMeM's
                            Algorithm 4 applied to the whole gradient)
  1-D parameters:           full v = beta2_t v + (1 - beta2_t) Q, V_hat = v / c2
  D = 1 / (sqrt(V_hat) + eps)             (eps = 1e-8 as Adam; eps = 0 gives HF / torch exactly)

  momentum_style "adam" (the paper's "Adafactor with momentum", Adam-like; default):
      beta1 None:  u = G D
      beta1 float: m = beta1 m + (1 - beta1) G, u = (m / (1 - beta1^t)) D
      (second-moment statistics always from G^2)
      u = u / max(1, RMS(u) / clip_threshold)     (only when clip_threshold is set)
      Delta = lr_t u
  momentum_style "hf" (HF transformers / galore_torch / fairseq: momentum of the scaled update):
      u = clip(G D), Delta = m = beta1 m + (1 - beta1) lr_t u   (no bias correction), or lr_t u
      without beta1

  lr_t = rho_t * s_t, rho_t = lr, or with relative_step min(1e-2, 1/sqrt(t)) (HF; warmup_init:
  min(1e-6 t, 1/sqrt(t))), s_t = max(eps2, RMS(W)) with scale_parameter, else 1.
  W <- W - lr_t * weight_decay * W - Delta   (decoupled weight decay applied before the update, to
  the pre-update weights, scaled by lr_t, i.e. by the group lr when relative_step and
  scale_parameter are off: exactly HF's and galore_torch's weight decay).

With beta1=None, beta2_decay=-0.8, eps=0, eps1=1e-30, eps2=1e-3, clip_threshold=1,
scale_parameter=relative_step=True this is HF `Adafactor()` with its defaults and
`torch.optim.Adafactor(lr=1e-2)` (tests/optim/test_parity.py).

Sharded parameters (FSDP2 row shards, optim/sharding.py): the same update, on this rank's rows;
the column statistics and mean(r) are all-reduced over the ranks, RMS terms are scalar all-reduces;
one process gives the same bits as before.

State (fp32 whatever the parameter dtype): `step` (int), `exp_avg` (beta1), `exp_avg_sq_row`,
`exp_avg_sq_col` (factored), `exp_avg_sq_col` or `exp_avg_sq_row` alone (one_sided),
`exp_avg_sq` (1-D).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from optim import compiled_steps
from optim import factored_kernels as kernels
from optim.config import MomentumStyle, OptimConfig
from optim.fp32_state import FP32StateOptimizer
from optim.param_groups import DECAY_GROUP_KEYS, decay_split_groups
from optim.projector import ProjectorCounters
from optim.registry import OptimizerSpec, register
from optim.rms import rms
from optim.sharding import WHOLE, Sharding, local, sharding_of

MOMENTUM_STYLES: tuple[MomentumStyle, ...] = typing.get_args(MomentumStyle)
# The OptimConfig keys `adafactor_kwargs` reads.
ADAFACTOR_KEYS = (
    "lr",
    "beta1",
    "beta2",
    "beta2_decay",
    "eps",
    "eps1",
    "eps2",
    "clip_threshold",
    "scale_parameter",
    "relative_step",
    "warmup_init",
    "one_sided",
    "momentum_style",
    "compile",
)


def second_moment_mode(shape: Sequence[int], one_sided: bool) -> str:
    """'factored', 'cols' (one statistic per column), 'rows' or 'full' for a tensor of `shape`."""
    if len(shape) < 2:
        return "full"
    if not one_sided:
        return "factored"
    return "cols" if shape[-2] <= shape[-1] else "rows"


def update_second_moment(
    state: dict, prefix: str, sq: torch.Tensor, mode: str, beta2_t: float, sh: Sharding = WHOLE
) -> None:
    """EMA of the statistics of sq (= x^2 + eps1) into state[prefix + ...], created at zero. `sh`: how
    the local sq relates to the full one (optim/sharding.py): a mean over a sharded dim is all-reduced."""

    def ema(key: str, value: torch.Tensor) -> None:
        if key not in state:
            state[key] = torch.zeros_like(value)
        state[key].mul_(beta2_t).add_(value, alpha=1.0 - beta2_t)

    if mode in ("factored", "rows"):
        ema(prefix + "exp_avg_sq_row", sh.mean(sq, dim=-1))
    if mode in ("factored", "cols"):
        ema(prefix + "exp_avg_sq_col", sh.mean(sq, dim=-2))
    if mode == "full":
        ema(prefix + "exp_avg_sq", sq)


def divide_by_second_moment(
    state: dict, prefix: str, x: torch.Tensor, mode: str, bias2: float, eps: float, sh: Sharding = WHOLE
) -> torch.Tensor:
    """x / (sqrt(V_hat) + eps) with V_hat from the statistics in state (see module docstring); `sh`: x's
    sharding (mean(r) is over the full row statistic)."""
    if mode == "factored":
        row = state[prefix + "exp_avg_sq_row"]
        col = state[prefix + "exp_avg_sq_col"]
        # sqrt(r c^T / (mean(r) c2)) = sqrt(r / (mean(r) c2)) sqrt(c)^T: one m x n temporary only.
        row_mean = sh.reduced(-1, x.dim()).mean(row, dim=-1, keepdim=True)
        row_f = (row / (row_mean * bias2)).sqrt_()
        denom = row_f.unsqueeze(-1) * col.sqrt().unsqueeze(-2)
    elif mode == "cols":
        denom = (state[prefix + "exp_avg_sq_col"] / bias2).sqrt_().unsqueeze(-2).expand_as(x)
    elif mode == "rows":
        denom = (state[prefix + "exp_avg_sq_row"] / bias2).sqrt_().unsqueeze(-1).expand_as(x)
    else:
        denom = (state[prefix + "exp_avg_sq"] / bias2).sqrt_()
    if mode == "factored" or mode == "full":  # denom is a fresh temporary: reuse it for the result
        if eps:
            denom.add_(eps)
        return torch.div(x, denom, out=denom)
    if eps:
        denom = denom + eps
    return x / denom


def clip_by_rms(u: torch.Tensor, clip_threshold: float | None, sh: Sharding = WHOLE) -> torch.Tensor:
    """u / max(1, RMS(u) / clip_threshold), in place (RMS of the full u); u unchanged when clip_threshold is None."""
    if clip_threshold is None:
        return u
    return u.div_((sh.rms(u) / clip_threshold).clamp_(min=1.0))


def beta2_at(group: dict, t: int) -> tuple[float, float]:
    """(beta2_t, bias correction c2) for step t (see module docstring)."""
    if group.get("beta2_decay") is not None:
        return 1.0 - math.pow(t, group["beta2_decay"]), 1.0
    return group["beta2"], 1.0 - group["beta2"] ** t


def step_size(group: dict, t: int, param: torch.Tensor) -> float | torch.Tensor:
    """lr_t = rho_t * s_t (HF `_get_lr`). A 0-d tensor when scale_parameter (no host sync). `param`:
    the parameter itself (a DTensor under FSDP2: its RMS is the full weight's)."""
    rho = group["lr"]
    if group.get("relative_step"):
        min_step = 1e-6 * t if group.get("warmup_init") else 1e-2
        rho = min(min_step, 1.0 / math.sqrt(t))
    if group.get("scale_parameter"):
        return sharding_of(param).rms(local(param).float()).clamp(min=group["eps2"]) * rho
    return rho


class Adafactor(ProjectorCounters, FP32StateOptimizer):
    """Adafactor with the switches of the module docstring (all per parameter group).

    The projector counters (`proj_updates`, `svd_failures`) stay 0 here; they count for the
    subclasses that project (GaLoreAdafactor, AdaMeM)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        beta1: float | None = None,
        beta2: float = 0.95,
        beta2_decay: float | None = None,
        eps: float = 1e-8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float | None = None,
        scale_parameter: bool = False,
        relative_step: bool = False,
        warmup_init: bool = False,
        one_sided: bool = False,
        weight_decay: float = 0.0,
        momentum_style: str = "adam",
        fast: bool = True,
        compiled: bool = False,
    ):
        """`fast`: whole fp32 matrices with the "adam" momentum style and two-sided factored statistics take
        optim/factored_kernels.py's path (the same update in fewer passes, equal to fp32 rounding); False runs
        this module's reference code for every parameter. `compiled` (optim.compile): that path's update as
        optim/compiled_steps.py's two compiled functions (only where `fast` applies)."""
        self.fast = fast
        self.compiled = compiled
        if momentum_style not in MOMENTUM_STYLES:
            raise ValueError(f"momentum_style must be one of {MOMENTUM_STYLES}, got {momentum_style!r}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ValueError(f"beta1 must be in [0, 1) or None, got {beta1}")
        defaults = dict(
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            beta2_decay=beta2_decay,
            eps=eps,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            scale_parameter=scale_parameter,
            relative_step=relative_step,
            warmup_init=warmup_init,
            one_sided=one_sided,
            weight_decay=weight_decay,
            momentum_style=momentum_style,
        )
        super().__init__(params, defaults)

    def adafactor_delta(
        self,
        g: torch.Tensor,
        state: dict,
        group: dict,
        t: int,
        lr_t: float | torch.Tensor,
        prefix: str = "",
        sh: Sharding = WHOLE,
    ) -> torch.Tensor:
        """Delta (already scaled by lr_t) for fp32 gradient g (local, sharded as `sh`) at moment step t;
        updates state."""
        beta1 = group["beta1"]
        beta2_t, bias2 = beta2_at(group, t)
        mode = second_moment_mode(sh.full_shape(g), group["one_sided"])  # by the full shape: the same on every rank
        update_second_moment(state, prefix, (g * g).add_(group["eps1"]), mode, beta2_t, sh)
        if group["momentum_style"] == "hf":
            u = clip_by_rms(
                divide_by_second_moment(state, prefix, g, mode, bias2, group["eps"], sh), group["clip_threshold"], sh
            )
            u = u.mul_(lr_t)
            if beta1 is None:
                return u
            if prefix + "exp_avg" not in state:
                state[prefix + "exp_avg"] = torch.zeros_like(g)
            return state[prefix + "exp_avg"].mul_(beta1).add_(u, alpha=1.0 - beta1)
        if beta1 is None:
            x = g
        else:
            if prefix + "exp_avg" not in state:
                state[prefix + "exp_avg"] = torch.zeros_like(g)
            m = state[prefix + "exp_avg"].mul_(beta1).add_(g, alpha=1.0 - beta1)
            x = m / (1.0 - beta1**t)
        u = clip_by_rms(
            divide_by_second_moment(state, prefix, x, mode, bias2, group["eps"], sh), group["clip_threshold"], sh
        )
        return u.mul_(lr_t)

    @staticmethod
    def apply_delta(p: torch.Tensor, delta: torch.Tensor, lr_t: float | torch.Tensor, weight_decay: float) -> None:
        """W <- W - lr_t wd W - Delta (weight decay on the pre-update weights, as HF). `p`: the local
        tensor of the parameter (updated in place)."""
        if weight_decay != 0.0:
            if torch.is_tensor(lr_t):
                p.sub_(p * (weight_decay * lr_t).to(p.dtype))
            else:
                p.add_(p, alpha=-weight_decay * lr_t)
        p.sub_(delta.to(p.dtype))

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
        state["step"] += 1
        t = state["step"]
        lr_t = step_size(group, t, p)
        assert p.grad is not None  # step() skips parameters without a gradient
        if self._takes_fast_path(p, group):
            fast_step = self._step_factored_compiled if self.compiled else self._step_factored_fast
            fast_step(p, p.grad.float(), state, group, t, lr_t)
            return
        delta = self.adafactor_delta(local(p.grad).float(), state, group, t, lr_t, sh=sharding_of(p))
        self.apply_delta(local(p), delta, lr_t, group["weight_decay"])

    def _takes_fast_path(self, p: torch.Tensor, group: dict) -> bool:
        return (
            self.fast
            and group["momentum_style"] == "adam"
            and p.dim() == 2
            and not group["one_sided"]
            and p.dtype == torch.float32
            and sharding_of(p) is WHOLE
        )

    @staticmethod
    def _step_factored_fast(
        p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, t: int, lr_t: float | torch.Tensor
    ) -> None:
        """The "adam"-style factored update of the module docstring, through optim/factored_kernels.py:
        W <- W (1 - lr_t wd) - lr_t u, u = clip(x D) with x = G or m / (1 - beta1^t). Scalars fold: the bias
        correction and the clip divide one 0-d scale (RMS(c x) = c RMS(x)); without a clip that scale goes
        into the direction itself and the weights take one lerp (kernels.apply_folded)."""
        beta1 = group["beta1"]
        beta2_t, bias2 = beta2_at(group, t)
        u = kernels.workspace(g)
        rows, cols = kernels.mean_sq_stats(g, group["eps1"], u)
        if "exp_avg_sq_row" not in state:
            state["exp_avg_sq_row"], state["exp_avg_sq_col"] = torch.zeros_like(rows), torch.zeros_like(cols)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        kernels.ema_(row, rows, beta2_t)
        kernels.ema_(col, cols, beta2_t)
        x, bias1 = g, 1.0
        if beta1 is not None:
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(g)
            x, bias1 = state["exp_avg"].lerp_(g, 1.0 - beta1), 1.0 - beta1**t
        scale = lr_t / bias1
        decay = kernels.decay_of(lr_t, group["weight_decay"])
        # Without a clip the scale is known now: build c u directly (c from folded_scale, through the
        # denominator: x / ((sqrt(V_hat) + eps) / c)) and finish with one lerp over the weights.
        fold = group["clip_threshold"] is None and kernels.folds(group, rms_scaled=bool(group.get("scale_parameter")))
        c = kernels.folded_scale(scale, decay) if fold else 1.0
        row_f = (row / (row.mean() * bias2)).sqrt_()
        torch.outer(row_f.div_(c) if fold else row_f, col.sqrt(), out=u)  # sqrt(V_hat) / c
        if group["eps"]:
            u.add_(group["eps"] / c)  # (torch.addr(eps, ...) would fold this pass in, but runs slower on CPU)
        torch.div(x, u, out=u)  # folded: the whole update c x D; else u = x D, before the bias correction
        if fold:
            kernels.apply_folded(p, u, decay)
            return
        if group["clip_threshold"] is not None:
            scale = scale / (rms(u) / (bias1 * group["clip_threshold"])).clamp_(min=1.0)
        kernels.apply_scaled(p, u, scale, decay)

    @staticmethod
    def _step_factored_compiled(
        p: torch.Tensor, g: torch.Tensor, state: dict, group: dict, t: int, lr_t: float | torch.Tensor
    ) -> None:
        """`_step_factored_fast`'s update through optim/compiled_steps.py: the statistics and factors in one
        compiled function, the (momentum and) weight update in another. The bias correction folds into the
        scale and the clip threshold (RMS(x / c1) = RMS(x) / c1)."""
        beta1 = group["beta1"]
        beta2_t, bias2 = beta2_at(group, t)
        if "exp_avg_sq_row" not in state:
            state["exp_avg_sq_row"] = g.new_zeros(g.shape[0])
            state["exp_avg_sq_col"] = g.new_zeros(g.shape[1])
        if beta1 is not None and "exp_avg" not in state:  # also when momentum is switched on after the first step
            state["exp_avg"] = torch.zeros_like(g)
        row_f, col_f = compiled_steps.adafactor_factors(
            g, state["exp_avg_sq_row"], state["exp_avg_sq_col"], 1.0 - beta2_t, group["eps1"], bias2
        )
        bias1 = 1.0 if beta1 is None else 1.0 - beta1**t
        decay = kernels.decay_of(lr_t, group["weight_decay"])
        clip = group["clip_threshold"]
        compiled_steps.adafactor_update(
            p.detach(),  # a plain tensor: Dynamo compiles nn.Parameter shapes statically, one graph per shape
            g,
            state.get("exp_avg"),
            1.0 - (beta1 or 0.0),
            row_f,
            col_f,
            group["eps"],
            lr_t / bias1,
            0.0 if decay is None else decay,
            None if clip is None else clip * bias1,
        )

    def state_shard_dim(self, p: torch.Tensor, group: dict, key: str, full_shape: Sequence[int]) -> int | None:
        """optim.sharding.ShardedState: the moments and the row statistic follow p's rows; the column
        statistic (and a one-sided column statistic) is whole on every rank."""
        if key.endswith("exp_avg_sq_col"):
            return None
        return 0 if key in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row") else None

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                self._step_param(p, group)
        return loss


def adafactor_kwargs(cfg: OptimConfig, momentum_style: MomentumStyle) -> dict[str, Any]:
    """Adafactor's constructor keywords from ADAFACTOR_KEYS of `cfg`; `momentum_style` is the
    optimizer's reference style, used when optim.momentum_style is null."""
    return dict(
        lr=cfg.lr,
        beta1=cfg.beta1,
        beta2=cfg.beta2,
        beta2_decay=cfg.beta2_decay,
        eps=cfg.eps,
        eps1=cfg.eps1,
        eps2=cfg.eps2,
        clip_threshold=cfg.clip_threshold,
        scale_parameter=cfg.scale_parameter,
        relative_step=cfg.relative_step,
        warmup_init=cfg.warmup_init,
        one_sided=cfg.one_sided,
        momentum_style=cfg.momentum_style or momentum_style,
        compiled=cfg.compile,
    )


@register("adafactor", reads=(*ADAFACTOR_KEYS, *DECAY_GROUP_KEYS))
def build_adafactor(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    """optim.beta1 null = Adafactor without momentum, a float = the paper's Adam-like momentum."""
    return OptimizerSpec(Adafactor, decay_split_groups(model, cfg), adafactor_kwargs(cfg, momentum_style="adam"))
