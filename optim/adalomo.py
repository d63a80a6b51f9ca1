"""AdaLomo (Lv et al. 2023, arXiv 2310.10195): Adafactor without momentum, with grouped update
normalisation and a parameter-scaled step, designed to be applied in the backward pass.

Per parameter theta with gradient g (fp32), global step t = 1, 2, ...:

    beta2_t = 1 - t^decay_rate                         (decay_rate = -0.8; beta2_1 = 0)
    u       = g^2 + eps1                               (eps1 = 1e-30)
    matrix: row r <- beta2_t r + (1 - beta2_t) mean_cols(u); column c likewise over rows;
            U = g * rsqrt(r / mean(r)) * rsqrt(c)      (factorization nmf, factor_rank 1;
            other factorizations: see optim/factorization.py)
    vector: v <- beta2_t v + (1 - beta2_t) u;  U = g / sqrt(v)
    update normalisation (update_norm):
        grouped   U <- U / max(1, RMS(U) / clip_threshold)            per tensor (default)
        none      U unchanged
        layerwise one RMS over all U of a transformer block (blocks.{i}.*); a parameter outside
                  the blocks (embedding, final norm, lm head) is its own group
        global    one RMS over all U of the optimizer
      where RMS over a group = sqrt(sum of U^2 / number of entries).
    eta   = lr * max(eps2, RMS(theta))                 (eps2 = 1e-3; RMS before the update)
    theta <- theta * (1 - eta * weight_decay)          (decoupled decay)
    theta <- theta - eta * U                           (fp32, written back in theta's dtype)

With nmf-1 and grouped normalisation one step equals HF transformers' Adafactor(lr,
eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None, weight_decay=wd,
scale_parameter=True, relative_step=False) and lomo_optim.AdaLomo (tests/optim/test_adalomo.py).

State (all in `optimizer.state`, fp32 whatever the parameter dtype and kept fp32 on
`load_state_dict` (optim.fp32_state), so checkpoints resume exactly): `step` and the factors,
m + n floats per m x n matrix (nmf-1), (m + n)(r + 1) for the other factorizations of rank r
(the factors plus nmf-1's statistics, which floor the estimate), n per vector.

Floored entries: the factored estimates (every factorization but nmf-1) are floored at a fraction
of the rank-1 estimate (optim/factorization.py). `floored_fraction` is the number of floored
entries over the number of entries of all factored matrices, in each parameter's last step
(0.0 when there is none); `floored_stats()` gives the numerator (a device tensor, summed only
when read: no host sync per parameter) and the denominator, so that the fused path's
one-optimizer-per-parameter totals combine exactly (trainer/update.py).
Cost per m x n matrix: O(mn) elementwise (nmf-1), plus O(mnr) per factorisation iteration.

Sharded parameters (FSDP2 row shards, optim/sharding.py; nmf-1 only, the rank-r factorizations
need the whole matrix): the same update on this rank's rows; the column statistics and mean(r)
are all-reduced, RMS(theta), RMS(U) and a group's sum of U^2 are scalar all-reduces.

Two-phase API (used by optim.in_backward for layerwise / global normalisation, where a tensor's
update needs statistics of tensors whose gradients arrive later in the backward):
`prepare(p)` folds p.grad into the state and returns (U, sum U^2); `shared_divisor(...)` turns
a group's sums into one divisor; `apply(p, U, divisor)` does the parameter update.
The ordinary `step()` computes the same values in the same order, so both paths agree bit for
bit. Memory of `step()` with layerwise / global: two passes over the gradients (pass 1 updates
the state and keeps only sum U^2, pass 2 recomputes U from the new state), so no U is kept;
the extra cost is one more preconditioning (O(mn), or O(mnr) for r > 1 factorisations is not
repeated: only the cheap U = g / sqrt(V) is recomputed).
"""

from __future__ import annotations

import math
import re
import typing
from collections.abc import Sequence

import torch
from torch import nn

from optim import compiled_steps
from optim import factored_kernels as kernels
from optim import factorization as fac
from optim.config import OptimConfig, UpdateNorm
from optim.fp32_state import FP32StateOptimizer
from optim.param_groups import DECAY_GROUP_KEYS, decay_split_groups
from optim.registry import OptimizerSpec, register
from optim.rms import rms
from optim.sharding import WHOLE, Sharding, local, sharding_of

UPDATE_NORMS: tuple[UpdateNorm, ...] = typing.get_args(UpdateNorm)
DEFAULT_CLIP_THRESHOLD = 1.0  # optim.clip_threshold null
DEFAULT_DECAY_RATE = -0.8  # optim.beta2_decay null
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class AdaLomo(FP32StateOptimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-3,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float = DEFAULT_CLIP_THRESHOLD,
        decay_rate: float = DEFAULT_DECAY_RATE,
        weight_decay: float = 0.0,
        update_norm: str = "grouped",
        factorization: str = "nmf",
        factor_rank: int = 1,
        factor_iters: int = 1,
        fast: bool = True,
        compiled: bool = False,
    ):
        """`fast`: whole fp32 matrices with nmf-1 and a per-tensor normalisation (grouped / none) take
        optim/factored_kernels.py's path (the same update in fewer passes, equal to fp32 rounding); False runs
        this module's reference code for every parameter. `compiled` (optim.compile): that path's update as
        optim/compiled_steps.py's two compiled functions (only where `fast` applies)."""
        self.fast = fast
        self.compiled = compiled
        if update_norm not in UPDATE_NORMS:
            raise ValueError(f"optim.update_norm={update_norm!r}: expected one of {UPDATE_NORMS}")
        if factorization not in fac.FACTORIZATIONS:
            raise ValueError(f"optim.factorization={factorization!r}: expected one of {fac.FACTORIZATIONS}")
        if factor_rank < 1 or factor_iters < 1:
            raise ValueError(
                f"optim.factor_rank and optim.factor_iters must be >= 1, got {factor_rank}, {factor_iters}"
            )
        if clip_threshold is None or clip_threshold <= 0:
            raise ValueError(
                f"AdaLomo needs clip_threshold > 0 (use update_norm=none to disable), got {clip_threshold}"
            )
        if decay_rate >= 0:
            raise ValueError(f"AdaLomo needs decay_rate < 0 (beta2_t = 1 - t^decay_rate), got {decay_rate}")
        defaults = dict(
            lr=lr,
            eps1=eps1,
            eps2=eps2,
            clip_threshold=clip_threshold,
            decay_rate=decay_rate,
            weight_decay=weight_decay,
            update_norm=update_norm,
            factorization=factorization,
            factor_rank=factor_rank,
            factor_iters=factor_iters,
        )
        super().__init__(params, defaults)
        # Per factored parameter: (number of floored entries in its last step, 0-d device tensor; numel).
        self._floored: dict[torch.Tensor, tuple[torch.Tensor, int]] = {}

    def state_shard_dim(self, p: torch.Tensor, group: dict, key: str, full_shape: Sequence[int]) -> int | None:
        """optim.sharding.ShardedState: row statistic, a vector's statistic and the left factor (m x r)
        follow p's rows; the column statistic and the right factor are whole on every rank."""
        return 0 if key in ("exp_avg_sq_row", "exp_avg_sq", "factor_left") else None

    # ----- which tensors share one normalisation statistic ---------------------------------
    def norm_group_key(self, p: torch.Tensor) -> str | None:
        """None when p's update needs no other tensor (grouped / none), else its group's key."""
        for group in self.param_groups:
            for i, q in enumerate(group["params"]):
                if q is p:
                    return self._key(group, i)
        raise KeyError("parameter not in this optimizer")

    @staticmethod
    def _key(group: dict, i: int) -> str | None:
        mode = group["update_norm"]
        if mode in ("grouped", "none"):
            return None
        if mode == "global":
            return "global"
        names = group.get("names")
        name = names[i] if names else f"param{id(group['params'][i])}"
        m = _BLOCK.match(name)
        return f"blocks.{m.group(1)}" if m else name

    # ----- the two phases ----------------------------------------------------------------
    def _group_of(self, p: torch.Tensor) -> dict:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError("parameter not in this optimizer")

    @torch.no_grad()
    def _fold(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Update p's second-moment state with p.grad; return the fp32 gradient."""
        assert p.grad is not None  # callers skip parameters without a gradient
        grad = local(p.grad).float()
        state = self.state[p]
        first = len(state) == 0
        if first:
            state["step"] = 0
            if grad.dim() >= 2:
                fac.init_state(state, grad.shape, group["factorization"], group["factor_rank"], grad.device)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        beta = 1.0 - math.pow(state["step"], group["decay_rate"])
        u = grad.square().add_(group["eps1"])
        if grad.dim() >= 2:
            if grad.dim() > 2:
                raise ValueError("AdaLomo handles 1-D and 2-D parameters only")
            fac.update(
                state,
                u,
                beta,
                state["step"] == 1,
                group["factorization"],
                group["factor_rank"],
                group["factor_iters"],
                sharding_of(p),
            )
        else:
            state["exp_avg_sq"].mul_(beta).add_(u, alpha=1.0 - beta)
        return grad

    @torch.no_grad()
    def _direction(self, p: torch.Tensor, grad: torch.Tensor, record: bool = True) -> torch.Tensor:
        """U = g / sqrt(V) from the (already updated) state. `record`: count the floored entries
        (the first direction after a fold; step()'s second pass recomputes U and passes False)."""
        state = self.state[p]
        if grad.dim() >= 2:
            u, floored = fac.divide_by_sqrt_approx(state, grad, count=record, sh=sharding_of(p))
            if floored is not None:
                self._floored[p] = (floored, u.numel())
            return u
        return state["exp_avg_sq"].rsqrt().mul_(grad)

    def floored_stats(self) -> tuple[torch.Tensor, int]:
        """(floored entries, entries) over the factored matrices' last steps; see the module docstring."""
        if not self._floored:
            return torch.zeros((), dtype=torch.int64), 0
        counts = [c for c, _ in self._floored.values()]
        return torch.stack(counts).sum(), sum(n for _, n in self._floored.values())

    @property
    def floored_fraction(self) -> float:
        """Fraction of floored entries of the factored matrices in the last step (one host sync)."""
        floored, total = self.floored_stats()
        return float(floored) / total if total else 0.0

    @torch.no_grad()
    def prepare(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 1: fold p.grad into the state; return U (fp32, local) and sum(U^2) over the full tensor
        (0-d fp32; one scalar all-reduce under FSDP2)."""
        group = self._group_of(p)
        u = self._direction(p, self._fold(p, group))
        return u, sharding_of(p).sum_all(u.square())

    @staticmethod
    def shared_divisor(sq_sums: list[torch.Tensor], numels: list[int], clip_threshold: float) -> torch.Tensor:
        """max(1, RMS / clip_threshold) with RMS = sqrt(sum of sq_sums / sum of numels).
        Callers pass the sums in the optimizer's parameter order, so the result is bitwise the
        same whichever path (ordinary or in-backward) computed it."""
        total = torch.stack(sq_sums).sum()
        return (total / sum(numels)).sqrt_().div_(clip_threshold).clamp_(min=1.0)

    @torch.no_grad()
    def apply(self, p: torch.Tensor, u: torch.Tensor, divisor: torch.Tensor | None) -> None:
        """Phase 2: theta <- theta (1 - eta wd) - eta U / divisor, eta = lr max(eps2, RMS(theta))."""
        group = self._group_of(p)
        self._apply(p, u, divisor, group)

    @staticmethod
    def _apply(p: torch.Tensor, u: torch.Tensor, divisor: torch.Tensor | None, group: dict) -> None:
        if divisor is not None:
            u.div_(divisor)
        sh, mine = sharding_of(p), local(p)  # under FSDP2: this rank's rows, updated in place
        theta = mine if mine.dtype == torch.float32 else mine.float()
        # Tensors throughout (no .item()): no host sync per parameter on GPU.
        eta = sh.rms(theta).clamp_(min=group["eps2"]).mul_(group["lr"])
        if group["weight_decay"] != 0:
            theta.mul_(1.0 - eta * group["weight_decay"])
        theta.addcmul_(u, eta, value=-1.0)
        if theta is not mine:
            mine.copy_(theta)

    @staticmethod
    def _own_divisor(u: torch.Tensor, group: dict, sh: Sharding) -> torch.Tensor | None:
        if group["update_norm"] == "none":
            return None
        # HF's form: (||U|| / sqrt(numel)) / clip_threshold, clamped at 1 (over the full U).
        return sh.rms(u).div_(group["clip_threshold"]).clamp_(min=1.0)

    def _step_alone(self, p: torch.Tensor, group: dict) -> None:
        if self._takes_fast_path(p, group):
            if self.compiled:
                self._step_compiled(p, group)
            else:
                self._step_fast(p, group)
            return
        u = self._direction(p, self._fold(p, group))
        self._apply(p, u, self._own_divisor(u, group, sharding_of(p)), group)

    def _takes_fast_path(self, p: torch.Tensor, group: dict) -> bool:
        return (
            self.fast
            and p.dim() == 2
            and group["factorization"] == "nmf"
            and group["factor_rank"] == 1
            and p.dtype == torch.float32
            and sharding_of(p) is WHOLE
        )

    def _nmf1_step(self, p: torch.Tensor, g: torch.Tensor, group: dict) -> tuple[dict, float]:
        """The fast paths' bookkeeping: p's state (the nmf-1 statistics created at zero on its first step) with
        its step counted, and this step's beta2_t = 1 - t^decay_rate."""
        state = self.state[p]
        if len(state) == 0:
            state["step"] = 0
            fac.init_state(state, tuple(g.shape), "nmf", 1, g.device)
        state["step"] += 1
        return state, 1.0 - math.pow(state["step"], group["decay_rate"])

    @torch.no_grad()
    def _step_fast(self, p: torch.Tensor, group: dict) -> None:
        """_fold + _direction + _apply for nmf-1 (grouped / none), through optim/factored_kernels.py:
        theta <- theta (1 - eta wd) - (eta / divisor) U, U = g rsqrt(r / mean(r)) rsqrt(c). The divisor comes from
        the statistics before U is built, so U is built already scaled and the weights take one lerp."""
        assert p.grad is not None
        g = p.grad.float()
        state, beta = self._nmf1_step(p, g, group)
        u = kernels.workspace(g)
        rows, cols = kernels.mean_sq_stats(g, group["eps1"], u)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        kernels.ema_(row, rows, beta)
        kernels.ema_(col, cols, beta)
        a, b = (row / row.mean()).rsqrt_(), col.rsqrt()  # U = g a b^T
        eta = rms(p).clamp_(min=group["eps2"]).mul_(group["lr"])  # RMS(theta) before the update
        scale = eta
        if group["update_norm"] == "grouped":
            # RMS(U) before U exists: sum U^2 = sum_ij g_ij^2 a_i^2 b_j^2 = (a^2) . (g^2 b^2), with g^2 still in
            # the workspace (one read instead of building U first), so the scale is known when U is built.
            u_rms = torch.mv(u, b * b).dot(a * a).div_(g.numel()).sqrt_()
            scale = eta / u_rms.div_(group["clip_threshold"]).clamp_(min=1.0)
        decay = kernels.decay_of(eta, group["weight_decay"])
        if kernels.folds(group, rms_scaled=True):  # c U built at once, and one lerp over the weights
            torch.outer(a.mul_(kernels.folded_scale(scale, decay)), b, out=u).mul_(g)
            kernels.apply_folded(p, u, decay)
        else:
            torch.outer(a, b, out=u).mul_(g)
            kernels.apply_scaled(p, u, scale, decay)

    @torch.no_grad()
    def _step_compiled(self, p: torch.Tensor, group: dict) -> None:
        """`_step_fast`'s update through optim/compiled_steps.py: the statistics and factors in one compiled
        function, RMS(theta), the normalisation and the decayed update in another."""
        assert p.grad is not None
        g = p.grad.float()
        w = p.detach()  # a plain tensor: Dynamo compiles nn.Parameter shapes statically, one graph per shape
        state, beta = self._nmf1_step(p, g, group)
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        a, b = compiled_steps.adalomo_factors(g, row, col, 1.0 - beta, group["eps1"])
        clip = group["clip_threshold"] if group["update_norm"] == "grouped" else None
        compiled_steps.adalomo_update(w, g, a, b, group["lr"], group["eps2"], group["weight_decay"], clip)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Pass 1: per-tensor updates, or (coupled modes) fold the state and keep sum U^2 only.
        coupled: dict[str, list] = {}
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                key = self._key(group, i)
                if key is None:
                    self._step_alone(p, group)
                    continue
                u = self._direction(p, self._fold(p, group))
                # The full tensor's sum and size (p.numel() of a DTensor is the full one).
                coupled.setdefault(key, []).append((p, group, sharding_of(p).sum_all(u.square()), p.numel()))
                del u  # recomputed in pass 2: keeps no U alive across tensors
        # Pass 2: one divisor per group, then recompute U (same ops, same bits) and apply.
        for members in coupled.values():
            div = self.shared_divisor([m[2] for m in members], [m[3] for m in members], members[0][1]["clip_threshold"])
            for p, group, _, _ in members:
                u = self._direction(p, local(p.grad).float(), record=False)
                self._apply(p, u, div, group)
        return loss


ADALOMO_KEYS = (
    "lr",
    "eps1",
    "eps2",
    "clip_threshold",
    "beta2_decay",
    "update_norm",
    "factorization",
    "factor_rank",
    "factor_iters",
    "compile",
)


def check_adalomo(cfg: OptimConfig) -> None:
    if cfg.clip_threshold is not None and not cfg.clip_threshold > 0:
        raise ValueError(
            f"optim.clip_threshold={cfg.clip_threshold}: AdaLomo needs clip_threshold > 0 or null "
            f"(= {DEFAULT_CLIP_THRESHOLD}); to turn the update normalisation off use --optim.update_norm=none"
        )
    if cfg.beta2_decay is not None and not cfg.beta2_decay < 0:
        raise ValueError(
            f"optim.beta2_decay={cfg.beta2_decay}: AdaLomo needs beta2_decay < 0 (beta2_t = 1 - t^beta2_decay) "
            f"or null (= {DEFAULT_DECAY_RATE})"
        )


@register("adalomo", reads=(*ADALOMO_KEYS, *DECAY_GROUP_KEYS), check=check_adalomo)
def build_adalomo(model: nn.Module, cfg: OptimConfig) -> OptimizerSpec:
    """Reads ADALOMO_KEYS (clip_threshold null -> 1.0, beta2_decay null -> -0.8) and the weight-decay
    split. Ignores beta1/beta2/eps (no momentum, no AdamW eps), scale_parameter/relative_step (AdaLomo
    always scales the step by max(eps2, RMS(theta)))."""
    kwargs = dict(
        lr=cfg.lr,
        eps1=cfg.eps1,
        eps2=cfg.eps2,
        clip_threshold=DEFAULT_CLIP_THRESHOLD if cfg.clip_threshold is None else cfg.clip_threshold,
        decay_rate=DEFAULT_DECAY_RATE if cfg.beta2_decay is None else cfg.beta2_decay,
        update_norm=cfg.update_norm,
        factorization=cfg.factorization,
        factor_rank=cfg.factor_rank,
        factor_iters=cfg.factor_iters,
        compiled=cfg.compile,
    )
    return OptimizerSpec(AdaLomo, decay_split_groups(model, cfg), kwargs)
