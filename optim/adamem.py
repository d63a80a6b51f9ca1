"""AdaMeM (Vyas, Morwani, Kakade): Adafactor with momentum kept only in the top-r SVD subspace of the
gradient, full-rank gradients on the residual. No public code exists; this is the reference.

Groups with `rank` (not None) hold the low-rank 2-D weights; every other parameter (1-D, or groups
without `rank`: the embedding, output layer and LayerNorms in the paper's Figure 1 left/middle)
runs plain optim.Adafactor with the group's options (its `beta1` decides whether they keep
full momentum: the registry's `lowrank_base_momentum`).

For a low-rank W with gradient G (m x n): if m > n the roles are transposed (the algorithm runs on
G^T and the update is transposed back), so below m <= n. t = this parameter's step (1 first),
t_m = moment step (= t unless moments were reset on a projector change).

  1. Project (Algorithm 2): if (t - 1) % T == 0, P (m x r) = U[:, :r] of the fp32 SVD of G
     (full_matrices=False; `svd_method: randomized` for the randomized range finder). `proj_type`
     is ignored: AdaMeM always projects on the smaller side (left after the transposition).
  2. R = P^T G (r x n); S = G - P R (residual; exactly 0 when r >= m, see the code).
  3. M = b1 M + (1 - b1) R; M_hat = M / (1 - b1^t_m) (b1 = None is treated as 0).
  4. N1 (Algorithm 3, two-sided Adafactor in the low-rank space): statistics rows (r) and
     columns (n) are EMAs (beta2 / beta2_decay, as optim.Adafactor) of the row / column means of
     X^2 + eps1 with X = M_hat (`second_moment_from: momentum`, the printed Algorithm 3, default;
     M_hat rather than M so that eps keeps its meaning whatever b1) or X = R (`gradient`: "similar
     to the Adafactor variant of GaLore"); V1 = row col^T / (mean(row) c2(t_m));
     N1 = M_hat / (sqrt(V1) + eps).
  5. N2 (Algorithm 4, one-sided Adafactor on the residual): one statistic per *column* (length n,
     the side not touched by P): c = EMA of mean_rows(S^2 + eps1); N2 = S / (sqrt(c / c2(t)) + eps)
     broadcast over rows, i.e. N2 = S D3 with D3 diagonal (n x n). Then <P N1, N2> =
     Tr(N1^T P^T (I - P P^T) G D3) = 0 for any N1: Claim 3.1 (tests/optim/test_adamem.py).
     (Algorithm 4 as printed keeps a per-row statistic R_t = (S^2) 1_n of length m, which
     would multiply S from the left and break the orthogonality; we follow the claim.)
  6. U = P N1 + delta N2 (the printed line 11 omits P; the proof includes it), optional RMS
     clipping of U (clip_threshold), W <- W - lr_t wd W - lr_t U (decoupled weight decay on the
     pre-update weights, scaled by lr_t, as optim.Adafactor; lr_t = lr unless relative_step /
     scale_parameter).

Sharded parameters (FSDP2 row shards, optim/sharding.py): the SVD as GaLore's (owner rank, broadcast);
m <= n: P as this rank's rows, R = P^T G all-reduced (r x n, whole), S local, the residual's column
statistics all-reduced; m > n (transposed): g = G^T is split along its columns, so R, M and their
column statistics follow that split and only row statistics / RMS terms are all-reduced.

Variants (Figure 2), `variant`:
  - `variant1`: X = P M_hat + delta S, then ordinary two-sided Adafactor on X in the original
    space (statistics m and n from X^2 + eps1): U = X / (sqrt(V) + eps).
  - `variant2`: as AdaMeM but N2 = ordinary two-sided Adafactor on S (statistics m and n).
State per matrix (fp32 floats): P m r + M r n + (r + n) + n  = (m + n) r + r + 2n (adamem);
variant2 + m; variant1: (m + n) r + m + n. Keys: `proj_left`, `exp_avg`, `lr_exp_avg_sq_row/col`,
`res_exp_avg_sq_col` (`res_exp_avg_sq_row` for variant2), `step`, `moment_step`, `proj_updates`,
`svd_failures` (when any).
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from optim import factored_kernels as kernels
from optim.adafactor import (
    ADAFACTOR_KEYS,
    Adafactor,
    adafactor_kwargs,
    beta2_at,
    clip_by_rms,
    divide_by_second_moment,
    step_size,
    update_second_moment,
)
from optim.config import AdamemVariant, OptimConfig, SecondMomentSource
from optim.param_groups import LOWRANK_GROUP_KEYS, lowrank_split_groups, name_in_group
from optim.projector import PROJECTOR_DEFAULTS, is_lowrank, project, projected_sharding, refresh_projector
from optim.registry import OptimizerSpec, register
from optim.rms import rms
from optim.sharding import WHOLE, Sharding, local, sharding_of

VARIANTS: tuple[AdamemVariant, ...] = typing.get_args(AdamemVariant)
SECOND_MOMENT_FROM: tuple[SecondMomentSource, ...] = typing.get_args(SecondMomentSource)
ADAMEM_DEFAULTS: dict[str, Any] = {
    **PROJECTOR_DEFAULTS,
    "delta": 1.0,
    "variant": "adamem",
    "second_moment_from": "momentum",
}
# The OptimConfig keys `adamem_options` reads (besides ADAFACTOR_KEYS for every group).
ADAMEM_KEYS = (
    "rank",
    "update_proj_gap",
    "delta",
    "variant",
    "second_moment_from",
    "svd_method",
    "moments_on_proj_change",
    "lowrank_base_momentum",
)


class AdaMeM(Adafactor):
    """AdaMeM (see module docstring). Defaults are the paper's: beta1 .9, beta2 .95, eps 1e-8, T 200, delta 1."""

    def __init__(self, params, lr: float = 1e-3, beta1: float | None = 0.9, **kwargs: Any):
        extra = {k: kwargs.pop(k) for k in list(kwargs) if k in ADAMEM_DEFAULTS}
        super().__init__(params, lr=lr, beta1=beta1, **kwargs)
        for group in self.param_groups:
            for k, v in {**ADAMEM_DEFAULTS, **extra}.items():
                group.setdefault(k, v)
            if group["variant"] not in VARIANTS:
                raise ValueError(f"variant must be one of {VARIANTS}, got {group['variant']!r}")
            if group["second_moment_from"] not in SECOND_MOMENT_FROM:
                raise ValueError(f"second_moment_from must be one of {SECOND_MOMENT_FROM}")
        self.defaults.update({**ADAMEM_DEFAULTS, **extra})

    def _step_param(self, p: torch.Tensor, group: dict) -> None:
        if not is_lowrank(group, p):
            return super()._step_param(p, group)
        state = self.state[p]
        assert p.grad is not None  # step() skips parameters without a gradient
        g, sh = local(p.grad).float(), sharding_of(p)  # FSDP2: this rank's rows, and how they split the full G
        transposed = p.shape[0] > p.shape[1]  # the full shape
        if transposed:
            g, sh = g.T, sh.transposed()
        if "step" not in state:
            state["step"] = 0
            state["moment_step"] = 0
        refresh_projector(
            state,
            g,
            group,
            "left",
            ("exp_avg",),
            ("exp_avg", "lr_exp_avg_sq_row", "lr_exp_avg_sq_col"),
            name=name_in_group(group, p),
            sh=sh,
        )
        state["step"] += 1
        state["moment_step"] += 1
        t, t_m = state["step"], state["moment_step"]
        P = state["proj_left"]  # FSDP2 with g's rows split: this rank's rows of P
        if self.fast and group["variant"] == "adamem" and p.dtype == torch.float32 and sharding_of(p) is WHOLE:
            self._step_adamem_fast(p, g, P, state, group, t, t_m, transposed)
            return
        R = project(g, state, sh)  # P^T g: all-reduced when g's rows are split
        r_sh = projected_sharding(sh, "left")  # R's (and M's) split: none, or g's columns
        # rank >= min(m, n): the residual is zero in exact arithmetic; make it exactly zero, or the
        # one-sided normaliser would blow its rounding noise (~1e-7 |G|) up to O(1) updates.
        S = torch.zeros_like(g) if P.shape[1] >= sh.full_shape(g)[0] else g - P @ R
        delta = group["delta"]
        M_hat = self._momentum(state, R, group, t_m)
        eps, eps1 = group["eps"], group["eps1"]
        if group["variant"] == "variant1":
            X = P @ M_hat
            X.add_(S, alpha=delta)
            beta2_t, bias2 = beta2_at(group, t)
            update_second_moment(state, "", X * X + eps1, "factored", beta2_t, sh)
            U = divide_by_second_moment(state, "", X, "factored", bias2, eps, sh)
        else:
            N1 = self._lowrank_direction(state, R, M_hat, group, t_m, r_sh)
            mode = "cols" if group["variant"] == "adamem" else "factored"
            beta2_t, bias2 = beta2_at(group, t)
            update_second_moment(state, "res_", S * S + eps1, mode, beta2_t, sh)
            N2 = divide_by_second_moment(state, "res_", S, mode, bias2, eps, sh)
            U = P @ N1
            U.add_(N2, alpha=delta)
        U = clip_by_rms(U, group["clip_threshold"], sh)
        if transposed:
            U = U.T
        lr_t = step_size(group, t, p)
        self.apply_delta(local(p), U * lr_t, lr_t, group["weight_decay"])

    @staticmethod
    def _momentum(state: dict, R: torch.Tensor, group: dict, t_m: int) -> torch.Tensor:
        """Step 3: M = b1 M + (1 - b1) R in the state; returns M_hat."""
        beta1 = group["beta1"] or 0.0
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(R)
        M = state["exp_avg"].mul_(beta1).add_(R, alpha=1.0 - beta1)
        return M / (1.0 - beta1**t_m)

    @staticmethod
    def _lowrank_direction(
        state: dict, R: torch.Tensor, M_hat: torch.Tensor, group: dict, t_m: int, r_sh: Sharding
    ) -> torch.Tensor:
        """Step 4: N1, two-sided Adafactor on M_hat in the low-rank space (statistics of M_hat or R)."""
        src = M_hat if group["second_moment_from"] == "momentum" else R
        beta2_t, bias2 = beta2_at(group, t_m)
        update_second_moment(state, "lr_", src * src + group["eps1"], "factored", beta2_t, r_sh)
        return divide_by_second_moment(state, "lr_", M_hat, "factored", bias2, group["eps"], r_sh)

    def _step_adamem_fast(
        self,
        p: torch.Tensor,
        g: torch.Tensor,
        P: torch.Tensor,
        state: dict,
        group: dict,
        t: int,
        t_m: int,
        transposed: bool,
    ) -> None:
        """Steps 2-6 of the module docstring (variant adamem, whole fp32 matrix) in two m x n workspaces
        (optim/factored_kernels.py): S = g - P R in place, its column statistic from S^2, N2 in place over S,
        U = delta N2 + P N1 by one in-place addmm over N2, and the clip and lr folded into one scale (without
        a clip, into N1 and D3, and the weights take one lerp). The r x n part is the
        reference code's (small). Equal to the reference code to fp32 rounding
        (tests/optim/test_factored_kernels.py)."""
        R = P.T @ g
        # The workspaces A, B are laid out as W (m x n); with g = G^T they are used as a = A^T, b = B^T, so every
        # m x n pass walks memory in order and the update lands in W's layout (not a strided U^T: 2.6x slower).
        A, B = kernels.workspace(p, 0), kernels.workspace(p, 1)
        a, b = (A.T, B.T) if transposed else (A, B)
        if P.shape[1] >= g.shape[0]:  # the residual is exactly zero (see _step_param)
            a.zero_()
        else:
            torch.matmul(R.T, P.T, out=A) if transposed else torch.matmul(P, R, out=A)  # P R, as a
            torch.sub(g, a, out=a)  # S
        M_hat = self._momentum(state, R, group, t_m)
        N1 = self._lowrank_direction(state, R, M_hat, group, t_m, WHOLE)
        eps, eps1 = group["eps"], group["eps1"]
        beta2_t, bias2 = beta2_at(group, t)
        cols = torch.mul(a, a, out=b).mean(dim=-2).add_(eps1)  # mean over rows of S^2 + eps1
        if "res_exp_avg_sq_col" not in state:
            state["res_exp_avg_sq_col"] = torch.zeros_like(cols)
        col = state["res_exp_avg_sq_col"]
        kernels.ema_(col, cols, beta2_t)
        lr_t = step_size(group, t, p)  # RMS(W) before the update
        decay = kernels.decay_of(lr_t, group["weight_decay"])
        # Without a clip the scale is known now: N2 and N1 are built already multiplied by c (folded_scale;
        # for N2 through D3's vector), so addmm gives c U and one lerp over the weights finishes.
        fold = group["clip_threshold"] is None and kernels.folds(group, rms_scaled=bool(group.get("scale_parameter")))
        c = kernels.folded_scale(lr_t, decay) if fold else 1.0
        d3_inv = (col / bias2).sqrt_().add_(eps)  # 1 / D3
        a.div_(d3_inv.div_(c) if fold else d3_inv)  # (c) N2 = S D3, over S
        N1 = N1 * c if fold else N1
        # (c) (delta N2 + P N1) over N2, in W's layout: U = A (transposed: U^T = delta N2^T + N1^T P^T)
        U = A.addmm_(N1.T, P.T, beta=group["delta"]) if transposed else A.addmm_(P, N1, beta=group["delta"])
        if fold:
            kernels.apply_folded(p, U, decay)
            return
        scale = lr_t
        if group["clip_threshold"] is not None:
            scale = lr_t / (rms(U) / group["clip_threshold"]).clamp_(min=1.0)
        kernels.apply_scaled(p, U, scale, decay)

    def state_shard_dim(self, p: torch.Tensor, group: dict, key: str, full_shape: Sequence[int]) -> int | None:
        """optim.sharding.ShardedState. A low-rank W (m x n) works on g = G (m <= n) or G^T (m > n), whose
        rows (resp. columns) are W's rows: P (g's rows x r) follows them when g = G; M (r x g's columns)
        and the statistics of g's columns follow them when g = G^T; the statistics of g's rows when g = G."""
        if not is_lowrank(group, p):
            return super().state_shard_dim(p, group, key, full_shape)
        transposed = p.shape[0] > p.shape[1]
        g_rows = ("proj_left", "exp_avg_sq_row", "res_exp_avg_sq_row")  # vectors/matrices over g's rows
        g_cols = ("exp_avg_sq_col", "res_exp_avg_sq_col", "lr_exp_avg_sq_col")  # over g's columns
        if not transposed:
            return 0 if key in g_rows else None
        if key == "exp_avg":
            return 1
        return 0 if key in g_cols else None


def adamem_options(cfg: OptimConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(options of the low-rank groups, options of the other groups) from ADAMEM_KEYS of `cfg`."""
    lowrank = dict(
        rank=cfg.rank,
        update_proj_gap=cfg.update_proj_gap,
        delta=cfg.delta,
        variant=cfg.variant,
        second_moment_from=cfg.second_moment_from,
        svd_method=cfg.svd_method,
        moments_on_proj_change=cfg.moments_on_proj_change,
    )
    base: dict[str, Any] = {} if cfg.lowrank_base_momentum else {"beta1": None}
    return lowrank, base


def check_adamem(cfg: OptimConfig) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"optim.variant must be one of {VARIANTS}, got {cfg.variant!r}")


@register("adamem", reads=(*ADAFACTOR_KEYS, *ADAMEM_KEYS, *LOWRANK_GROUP_KEYS), check=check_adamem)
def build_adamem(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    """Low-rank targets: AdaMeM; the rest: Adafactor, with momentum beta1 when
    optim.lowrank_base_momentum (default) else without (beta1 None)."""
    lowrank, base = adamem_options(cfg)
    kwargs = adafactor_kwargs(cfg, momentum_style="adam")
    return OptimizerSpec(AdaMeM, lowrank_split_groups(model, cfg, lowrank, base), kwargs)
