"""Factored second-moment estimates for AdaLomo: O((m + n) r) state per m x n matrix.

Every variant tracks an exponential moving average of u = g^2 + eps1 without ever storing an
m x n matrix across steps. Per step, with beta = beta2_t and the previous factored estimate
V_{t-1} (m x n, formed transiently), the target is

    A_t = beta * V_{t-1} + (1 - beta) * u_t          (A_1 = u_1, since beta2_1 = 0)

and the new state is a rank-r factorization of A_t. The preconditioned direction is
U = g / sqrt(V_t) (elementwise). Variants (`factorization`, `factor_rank` = r):

- ``nmf``, r = 1: Adafactor's closed form. Rows r_t = EMA of row means of u, columns c_t = EMA
  of column means; V_t = r_t c_t^T / mean(r_t). This is the exact minimiser of the generalised
  KL (I-) divergence among rank-1 non-negative matrices (Shazeer & Stern 2018), and because
  row/column means are linear it equals factoring the EMA of the full matrix. State m + n.
  Cost O(mn), no transient m x n beyond u.
- ``nmf``, r > 1: non-negative W (m x r), H (r x n), V_t = W H. Each step runs `iters`
  Lee-Seung multiplicative updates for the same KL divergence (so r = 1 would reach the closed
  form), warm-started from the previous W, H, on A_t:
      H <- H * (W^T (A / WH)) / (W^T 1),   W <- W * ((A / WH) H^T) / (1 H^T),
  then W's columns are rescaled to sum 1 (scale moved into H) to keep fp32 in range. First step:
  W = the r columns picked by pivoted QR of A, H chosen so W H has A's column sums, and
  max(iters, 10) iterations. State (m + n) r; cost O(mnr) per iteration, two transient m x n.
- ``svd``: rank-r truncated SVD of A_t, tracked by subspace iteration warm-started from the
  previous right factor (`iters` iterations: Q = orth(A R^T), R = Q^T A), then an r x n SVD
  rotates it to singular vectors: left = Q U_s S (m x r), right = V_s^T (r x n). First step
  starts from the pivoted-QR range. V_t = clamp(left @ right, min=eps1) (a truncated SVD of a
  positive matrix may have non-positive entries). State (m + n) r; cost O(mnr) per iteration.
- ``qr``: rank-r range from a column-pivoted QR (Businger-Golub, greedy modified Gram-Schmidt)
  of the current A_t, recomputed every step without warm start: Q (m x r) spans the r columns
  of largest residual norm, B = Q^T A (r x n), V_t = clamp(Q B, min=eps1). State (m + n) r;
  cost O(mnr).

r is capped at min(m, n). All arithmetic is fp32 and deterministic (no random test matrices),
so the fused and ordinary paths and a resumed run reproduce the same bits.
"""

from __future__ import annotations

import typing

import torch

from optim.config import Factorization

FACTORIZATIONS: tuple[Factorization, ...] = typing.get_args(Factorization)
_FIRST_STEP_NMF_ITERS = 10  # no warm start on the first step: iterate longer once
_TINY = 1e-30  # floor of denominators inside the NMF iterations (same as eps1's default)


def is_closed_form(method: str, rank: int) -> bool:
    return method == "nmf" and rank == 1


def init_state(
    state: dict,
    shape: torch.Size,
    method: str,
    rank: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Allocate the factors (zeros; the first update overwrites them since beta2_1 = 0)."""
    m, n = shape
    if is_closed_form(method, rank):
        state["exp_avg_sq_row"] = torch.zeros(m, device=device, dtype=dtype)
        state["exp_avg_sq_col"] = torch.zeros(n, device=device, dtype=dtype)
    else:
        r = min(rank, m, n)
        state["factor_left"] = torch.zeros(m, r, device=device, dtype=dtype)
        state["factor_right"] = torch.zeros(r, n, device=device, dtype=dtype)


def approx(state: dict, eps1: float) -> torch.Tensor:
    """The current estimate V (m x n, transient); used by tests and the low-rank update."""
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        return (row / row.mean()).unsqueeze(-1) * col.unsqueeze(-2)
    return (state["factor_left"] @ state["factor_right"]).clamp_min_(eps1)


def update(
    state: dict, u: torch.Tensor, beta: float, first: bool, method: str, rank: int, iters: int, eps1: float
) -> None:
    """Fold u = g^2 + eps1 into the factored EMA (in place on `state`)."""
    if is_closed_form(method, rank):
        # Same ops and order as HF / fairseq Adafactor.
        state["exp_avg_sq_row"].mul_(beta).add_(u.mean(dim=-1), alpha=1.0 - beta)
        state["exp_avg_sq_col"].mul_(beta).add_(u.mean(dim=-2), alpha=1.0 - beta)
        return
    if first:
        target = u
    else:
        target = approx(state, eps1).mul_(beta).add_(u, alpha=1.0 - beta)
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
        w, h = nmf_kl(target, w, h, n_iter)
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


def divide_by_sqrt_approx(state: dict, grad: torch.Tensor, eps1: float) -> torch.Tensor:
    """U = g / sqrt(V) for the current factored V (a new fp32 tensor)."""
    if "exp_avg_sq_row" in state:
        # HF's _approx_sq_grad: rsqrt(r / mean(r)) (rows) * rsqrt(c) (columns), then * g.
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
        c_factor = col.unsqueeze(-2).rsqrt()
        return torch.mul(r_factor, c_factor).mul_(grad)
    return approx(state, eps1).rsqrt_().mul_(grad)


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


def nmf_kl(a: torch.Tensor, w: torch.Tensor, h: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`iters` Lee-Seung multiplicative updates for min KL(A || W H), W, H >= 0 (in place)."""
    for _ in range(iters):
        ratio = a / (w @ h).clamp_min_(_TINY)
        h.mul_(w.T @ ratio).div_(w.sum(0).clamp_min(_TINY).unsqueeze(-1))
        ratio = a / (w @ h).clamp_min_(_TINY)
        w.mul_(ratio @ h.T).div_(h.sum(1).clamp_min(_TINY).unsqueeze(0))
    scale = w.sum(0).clamp_min(_TINY)
    return w.div_(scale), h.mul_(scale.unsqueeze(-1))


def factored_state_bytes(shape: tuple[int, ...], method: str, rank: int, bytes_per: int = 4) -> int:
    """Optimizer-state bytes of one parameter (the step counter excluded)."""
    if len(shape) < 2:
        return shape[0] * bytes_per
    m, n = shape
    r = 1 if is_closed_form(method, rank) else min(rank, m, n)
    return (m + n) * r * bytes_per
