"""Factored second-moment estimates for AdaLomo: O((m + n) r) state per m x n matrix.

Every variant tracks an exponential moving average of u = g^2 + eps1 without ever storing an
m x n matrix across steps. Every variant keeps Adafactor's rank-1 statistics: rows r_t = EMA of
the row means of u, columns c_t = EMA of the column means (`exp_avg_sq_row`, `exp_avg_sq_col`,
with beta = beta2_t; r_1, c_1 are the means of u_1 since beta2_1 = 0), which define the rank-1
(Adafactor) estimate

    R_t = r_t c_t^T / mean(r_t)                      (everywhere > 0, since u >= eps1 > 0)

The preconditioned direction is U = g / sqrt(V_t) (elementwise). Variants (`factorization`,
`factor_rank` = r):

- ``nmf``, r = 1: Adafactor's closed form, V_t = R_t. This is the exact minimiser of the
  generalised KL (I-) divergence among rank-1 non-negative matrices (Shazeer & Stern 2018), and
  because row/column means are linear it equals factoring the EMA of the full matrix. State
  m + n. Cost O(mn), no transient m x n beyond u.
- every other variant ("factored" below) also keeps a rank-r factorization F_t = left @ right
  (left m x r, right r x n) of the target

      A_t = beta * V_{t-1} + (1 - beta) * u_t          (A_1 = u_1, since beta2_1 = 0)

  (V_{t-1} formed transiently from the previous state) and reads the estimate as

      V_t = max(F_t, FLOOR_RATIO * R_t)                 (elementwise; FLOOR_RATIO = 0.1)

  The floor is relative to the rank-1 estimate, not absolute: a truncated SVD / QR of a positive
  matrix fits it in the Frobenius norm, i.e. to the absolute accuracy of its *largest* entries,
  so where the row and column scales are small F_t is routinely zero or negative. An absolute
  floor (eps1 = 1e-30, as before) then made U = g / sqrt(1e-30) ~ 1e15 g on those entries, and
  the grouped normalisation U / max(1, RMS(U)) put the whole update of the tensor on them
  (every other entry stopped moving). With the relative floor, elementwise
  |U_ij| <= |U^Adafactor_ij| / sqrt(FLOOR_RATIO) ~ 3.2 |U^Adafactor_ij|, so a factored variant can
  deviate from Adafactor by lowering its step where the rank-r estimate is larger than R_t
  (unbounded), but raise it by at most sqrt(10) x. Why 0.1: where the rank-r estimate is more than
  10 x below the rank-1 one it is below the resolution of a Frobenius fit (its error there is set
  by the large entries), and 3.2 x keeps the factored arms' largest update within a small factor
  of nmf-1's (tests/optim/test_factorization.py); a lower ratio lets U grow as FLOOR_RATIO^-1/2.
  How ambiguous points were read: R_t comes from the EMA of u's own row/column means (nmf-1's
  state, independent of F's errors), not from the means of A_t; the floored V_t (not F_t) is what
  the next target A_{t+1} is built from, so a clipped entry never feeds back as a non-positive
  one; an entry counts as floored when F_t < FLOOR_RATIO * R_t (`estimate(count=True)`).

  The variants of F_t:
  - ``nmf``, r > 1: non-negative W (m x r), H (r x n), F_t = W H. Each step runs `iters`
    Lee-Seung multiplicative updates for the same KL divergence (so r = 1 would reach the closed
    form), warm-started from the previous W, H, on A_t:
        H <- H * (W^T (A / WH)) / (W^T 1),   W <- W * ((A / WH) H^T) / (1 H^T),
    then W's columns are rescaled to sum 1 (scale moved into H) to keep fp32 in range. First
    step: W = the r columns picked by pivoted QR of A, H chosen so W H has A's column sums, and
    max(iters, 10) iterations. Cost O(mnr) per iteration, two transient m x n.
  - ``svd``: rank-r truncated SVD of A_t, tracked by subspace iteration warm-started from the
    previous right factor (`iters` iterations: Q = orth(A R^T), R = Q^T A), then an r x n SVD
    rotates it to singular vectors: left = Q U_s S (m x r), right = V_s^T (r x n). First step
    starts from the pivoted-QR range. Cost O(mnr) per iteration.
  - ``qr``: rank-r range from a column-pivoted QR (Businger-Golub, greedy modified Gram-Schmidt)
    of the current A_t, recomputed every step without warm start: Q (m x r) spans the r columns
    of largest residual norm, left = Q, right = Q^T A (r x n). Cost O(mnr).
  State (m + n)(r + 1) floats (the factors and the rank-1 reference); transient: V_t and the
  floor (two m x n) when V is formed.

r is capped at min(m, n). All arithmetic is fp32 and deterministic (no random test matrices),
so the fused and ordinary paths and a resumed run reproduce the same bits.
"""

from __future__ import annotations

import typing

import torch

from optim.config import Factorization
from optim.sharding import WHOLE, Sharding

FACTORIZATIONS: tuple[Factorization, ...] = typing.get_args(Factorization)
FLOOR_RATIO = 0.1  # V >= FLOOR_RATIO x the rank-1 estimate: |U| <= 3.2 x Adafactor's (see above)
_FIRST_STEP_NMF_ITERS = 10  # no warm start on the first step: iterate longer once
_TINY = 1e-30  # floor of denominators inside the NMF iterations (same as eps1's default)


def is_closed_form(method: str, rank: int) -> bool:
    return method == "nmf" and rank == 1


def init_state(
    state: dict,
    shape: tuple[int, ...],
    method: str,
    rank: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Allocate the rank-1 statistics and, unless closed form, the factors (zeros; the first
    update overwrites them since beta2_1 = 0)."""
    m, n = shape
    state["exp_avg_sq_row"] = torch.zeros(m, device=device, dtype=dtype)
    state["exp_avg_sq_col"] = torch.zeros(n, device=device, dtype=dtype)
    if not is_closed_form(method, rank):
        r = min(rank, m, n)
        state["factor_left"] = torch.zeros(m, r, device=device, dtype=dtype)
        state["factor_right"] = torch.zeros(r, n, device=device, dtype=dtype)


def rank1(state: dict, scale: float = 1.0) -> torch.Tensor:
    """scale x R_t = scale x r c^T / mean(r) (m x n, a new tensor)."""
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    return (row / row.mean()).mul_(scale).unsqueeze(-1) * col.unsqueeze(-2)


def estimate(state: dict, count: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """V_t (m x n, a new tensor) and, when `count` and the variant is factored, the number of
    floored entries (a 0-d int64 tensor on V's device: no host sync); else None."""
    if "factor_left" not in state:
        return rank1(state), None
    v = state["factor_left"] @ state["factor_right"]
    floor = rank1(state, FLOOR_RATIO)
    floored = (v < floor).sum() if count else None
    return torch.maximum(v, floor, out=v), floored


def approx(state: dict) -> torch.Tensor:
    """The current estimate V_t (m x n, transient); used by tests and the next update's target."""
    return estimate(state)[0]


def update(
    state: dict, u: torch.Tensor, beta: float, first: bool, method: str, rank: int, iters: int, sh: Sharding = WHOLE
) -> None:
    """Fold u = g^2 + eps1 into the factored EMA (in place on `state`). `sh`: u's row sharding under FSDP2
    (optim/sharding.py); only nmf-1 runs sharded (the factors of the others need the whole matrix)."""
    if not is_closed_form(method, rank) and "exp_avg_sq_row" not in state:
        raise ValueError(
            "this AdaLomo state has low-rank factors but no rank-1 statistics (exp_avg_sq_row/col): it was saved "
            "before the relative floor of optim/factorization.py; such runs cannot be resumed, start them again"
        )
    target = None
    if not first and not is_closed_form(method, rank):
        target = approx(state).mul_(beta).add_(u, alpha=1.0 - beta)  # from the floored V_{t-1}
    # Same ops and order as HF / fairseq Adafactor.
    state["exp_avg_sq_row"].mul_(beta).add_(sh.mean(u, dim=-1), alpha=1.0 - beta)
    state["exp_avg_sq_col"].mul_(beta).add_(sh.mean(u, dim=-2), alpha=1.0 - beta)
    if is_closed_form(method, rank):
        return
    if target is None:
        target = u
    r = state["factor_left"].shape[1]
    if method == "nmf":
        if first:
            q, piv = pivoted_qr(target, r)
            w = target.index_select(1, piv).clone()
            h = target.sum(0, keepdim=True) / (r * w.sum(0).clamp_min(_TINY)).unsqueeze(-1)
            n_iter = max(iters, _FIRST_STEP_NMF_ITERS)
        else:
            w, h = state["factor_left"].clone(), state["factor_right"].clone()
            n_iter = iters
        # The model W H is read through the same floor as V (see nmf_kl): without it a row whose
        # gradient was zero (an embedding row of a token absent from the batch: u = eps1) has W
        # ~ 1e-35, and when that token returns A / W H ~ 1e34 overflows to inf -> NaN.
        w, h = nmf_kl(target, w, h, n_iter, floor=rank1(state, FLOOR_RATIO))
        state["factor_left"].copy_(w)
        state["factor_right"].copy_(h)
    elif method == "svd":
        if first:
            q, _ = pivoted_qr(target, r)
            right = q.T @ target
        else:
            right = state["factor_right"]
        for _ in range(iters):
            q = torch.linalg.qr(target @ right.T).Q
            right = q.T @ target
        us, s, vt = torch.linalg.svd(right, full_matrices=False)
        state["factor_left"].copy_(q @ (us * s))
        state["factor_right"].copy_(vt)
    elif method == "qr":
        q, _ = pivoted_qr(target, r)
        state["factor_left"].copy_(q)
        state["factor_right"].copy_(q.T @ target)
    else:
        raise ValueError(f"unknown factorization {method!r}; expected one of {FACTORIZATIONS}")


def divide_by_sqrt_approx(
    state: dict, grad: torch.Tensor, count: bool = False, sh: Sharding = WHOLE
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """U = g / sqrt(V_t) for the current estimate (a new fp32 tensor), and the number of floored
    entries as `estimate` returns it."""
    if "factor_left" not in state:
        # HF's _approx_sq_grad: rsqrt(r / mean(r)) (rows) * rsqrt(c) (columns), then * g.
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        r_factor = (row / sh.reduced(-1, grad.dim()).mean(row, dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        return torch.mul(r_factor, c_factor).mul_(grad), None
    v, floored = estimate(state, count)
    return v.rsqrt_().mul_(grad), floored


def pivoted_qr(a: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First r steps of column-pivoted QR (greedy MGS): Q (m x r) orthonormal, pivot indices (r).

    Picks, r times, the column with the largest norm after projecting out the columns already
    picked; norms are downdated (|a_j|^2 -= (q^T a_j)^2), so the cost is O(mnr) and no residual
    matrix is formed. Index tensors stay on the device (no host sync).
    """
    m, n = a.shape
    norms = a.square().sum(0)
    qs: list[torch.Tensor] = []
    pivs: list[torch.Tensor] = []
    for _ in range(r):
        j = norms.argmax().view(1)
        col = a.index_select(1, j).squeeze(1)
        for q in qs:  # twice-is-enough re-orthogonalisation is unnecessary at r <= 8
            col = col - (q @ col) * q
        col = col / col.norm().clamp_min(_TINY)
        qs.append(col)
        pivs.append(j)
        norms = (norms - (col @ a).square()).clamp_min_(0.0).index_fill_(0, j, -1.0)
    return torch.stack(qs, dim=1), torch.cat(pivs)


def nmf_kl(
    a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, iters: int, floor: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` Lee-Seung multiplicative updates for min KL(A || W H), W, H >= 0 (in place).
    `floor` (m x n, > 0): the ratio A / W H is taken as A / max(W H, floor), i.e. the model is read
    as the estimate V = max(W H, floor) that AdaLomo uses; this bounds the ratio by A / floor
    (no overflow where W H underflows). Without it, denominators are clamped at 1e-30."""

    def ratio() -> torch.Tensor:
        wh = w @ h
        return a / (wh.clamp_min_(_TINY) if floor is None else torch.maximum(wh, floor, out=wh))

    for _ in range(iters):
        h.mul_(w.T @ ratio()).div_(w.sum(0).clamp_min(_TINY).unsqueeze(-1))
        w.mul_(ratio() @ h.T).div_(h.sum(1).clamp_min(_TINY).unsqueeze(0))
    scale = w.sum(0).clamp_min(_TINY)
    return w.div_(scale), h.mul_(scale.unsqueeze(-1))


def factored_state_bytes(shape: tuple[int, ...], method: str, rank: int, bytes_per: int = 4) -> int:
    """Optimizer-state bytes of one parameter (the step counter excluded): n for a vector, m + n
    for nmf-1, (m + n)(r + 1) for a factored variant (the factors and the rank-1 statistics)."""
    if len(shape) < 2:
        return shape[0] * bytes_per
    m, n = shape
    r = 0 if is_closed_form(method, rank) else min(rank, m, n)
    return (m + n) * (r + 1) * bytes_per
