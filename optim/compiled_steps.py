"""`optim.compile`: the fast path of Adafactor and AdaLomo on a whole fp32 matrix as two torch.compile'd
functions per matrix and step: the same update as optim/factored_kernels.py's eager path (and as the readable
reference code), equal to fp32 rounding (tests/optim/test_compiled_steps.py). AdaMeM's full-space matrices
(embedding, output layer) run Adafactor's.

Why: the eager fast path is six to nine separate ops per matrix (g^2, its two means, the outer product, + eps,
the division, momentum, the update of W), each a kernel launch on a GPU and a pass over memory on any device.
Inductor fuses them into two functions:
- the statistics: one read of G for both means of G^2, the EMAs of the row and column statistics, and the
  factors of the denominator (two vectors);
- the update: one pass over G (or the momentum), W and, with momentum, the EMA written back, plus one reduction
  pass first where the RMS clip needs RMS(U).
The factors are the first function's outputs, not recomputed inside the second: Inductor inlines pointwise
producers into their consumers, so a square root of a vector written inside the update would run once per
matrix entry instead of once per row or column (measured: that made a single compiled step no faster than the
eager path on CPU).

AdaMeM's low-rank matrices keep their eager fast path: compiled as one function around its three matmuls, their
step measured 10-25% slower on CPU (Inductor folded P N1 + delta N2 into an addmm with a materialised m x n bias,
and the matmuls dominate), so only a GPU measurement could justify it.

Measured on the CPU (tools/bench_optim.py, docs/speed.md); on a GPU the launches per matrix should drop from
16-27 to about four to six (Triton splits a function at each reduction), unmeasured.

Shapes are dynamic (`dynamic=True`): one graph serves every matrix shape (plus Inductor's own size classes:
1-row matrices, more than 4096 rows), and the changing scalars (bias corrections, beta2_t, the learning rate)
are graph inputs, so steps do not recompile. Python branches (momentum or not, clip or not, a tensor or a float
learning rate) give one graph each, a handful per run. Past Dynamo's recompile limit a function would run
uncompiled, still correct, on a GPU too: the cached scalars only meet CUDA tensors in binary ops, which accept a
0-d CPU tensor. Compilation takes a few seconds per graph on first use, and needs a C/C++ compiler
(as train.compile; trainer/compile_toolchain.py checks for it when a run starts).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch

P = ParamSpec("P")
R = TypeVar("R")


@functools.lru_cache(maxsize=4096)
def _scalar(position: int, value: float) -> torch.Tensor:
    """`value` as a 0-d fp32 CPU tensor, the same one for the same argument position and value (read-only). fp32,
    the updates' precision: as float64, Inductor computed the scalar terms in double and drifted further from the
    reference code's rounding. Per position: two arguments of one call never share a tensor, which Dynamo would
    guard on (and recompile when two equal values, e.g. 1 - beta2 and its bias correction on step 1, later
    differ)."""
    return torch.tensor(value, dtype=torch.float32)


def compiled_on_first_use(fn: Callable[P, R]) -> Callable[P, R]:
    """fn, torch.compile'd when first called: importing the compiler costs seconds, which runs without
    optim.compile never pay. The uncompiled function stays at `.__wrapped__`.

    Float arguments go in as 0-d CPU tensors, cached by position and value (`_scalar`). Dynamo would wrap each
    float into such a tensor on every call anyway (a float is a graph input, not a constant); the values repeat
    across a step's matrices, so the cache saves that host work: 183 -> 135 us per matrix update (both functions)
    on this project's CPU. On CUDA, Inductor passes 0-d CPU tensors to its kernels as scalar arguments."""
    compiled: Callable[..., R] | None = None

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> R:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*(_scalar(i, a) if type(a) is float else a for i, a in enumerate(args)), **kwargs)

    return call


def _ema_(stat: torch.Tensor, value: torch.Tensor, weight: float) -> torch.Tensor:
    """stat <- stat + weight (value - stat), in place; returns stat. Arithmetic, not `lerp_`: a float weight of
    `lerp_` is specialised into the graph (one recompile per value, i.e. per step), a float in arithmetic is
    a graph input."""
    return stat.add_((value - stat) * weight)


def _factored_stats_(g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, weight: float, eps1: float) -> None:
    """EMAs of mean(g^2 + eps1) over columns into `row` and over rows into `col` (weight = 1 - beta), in place
    (mean(g^2) + eps1: the eps1 is added to the two vectors, not to every entry)."""
    sq = g * g
    _ema_(row, sq.mean(dim=-1) + eps1, weight)
    _ema_(col, sq.mean(dim=-2) + eps1, weight)


@compiled_on_first_use
def adafactor_factors(
    g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, one_minus_beta2: float, eps1: float, bias2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics' EMAs (`_factored_stats_`); returns the factors of
    sqrt(V_hat) = sqrt(row / (mean(row) bias2)) sqrt(col)^T."""
    _factored_stats_(g, row, col, one_minus_beta2, eps1)
    return (row / (row.mean() * bias2)).sqrt(), col.sqrt()


@compiled_on_first_use
def adafactor_update(
    p: torch.Tensor,
    g: torch.Tensor,
    exp_avg: torch.Tensor | None,
    one_minus_beta1: float,
    row_f: torch.Tensor,
    col_f: torch.Tensor,
    eps: float,
    scale: float | torch.Tensor,
    decay: float | torch.Tensor,
    clip_threshold: float | None,
) -> None:
    """p <- p (1 - decay) - s u, u = x / (row_f col_f^T + eps), x = g or the momentum after its EMA (in place);
    s = scale, divided by max(1, RMS(u) / clip_threshold) when clip_threshold is set."""
    x = g if exp_avg is None else _ema_(exp_avg, g, one_minus_beta1)
    u = x / (row_f[:, None] * col_f[None, :] + eps)
    if clip_threshold is not None:
        scale = scale / (u.square().mean().sqrt() / clip_threshold).clamp(min=1.0)
    p.mul_(1.0 - decay).sub_(u * scale)


@compiled_on_first_use
def adalomo_factors(
    g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, one_minus_beta: float, eps1: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The statistics' EMAs (`_factored_stats_`); returns the factors of U = g a b^T, a = rsqrt(row / mean(row)),
    b = rsqrt(col)."""
    _factored_stats_(g, row, col, one_minus_beta, eps1)
    return (row / row.mean()).rsqrt(), col.rsqrt()


@compiled_on_first_use
def adalomo_update(
    p: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    lr: float,
    eps2: float,
    weight_decay: float,
    clip_threshold: float | None,
) -> None:
    """p <- p (1 - eta wd) - s U, U = g a b^T, eta = lr max(eps2, RMS(p)) (before the update); s = eta, divided
    by max(1, RMS(U) / clip_threshold) when clip_threshold is set. RMS(p) and RMS(U) are full reductions over the
    same entries, computed in one loop."""
    u = g * a[:, None] * b[None, :]
    n = p.numel()
    # Row sums first: reductions over the same (rows, columns) loop nest, which Inductor fuses into one pass.
    # maximum, not clamp(min=eps2): eps2 comes in as a 0-d CPU tensor, which binary ops take beside CUDA tensors
    # and clamp does not (it would fail on a GPU if the function ever ran uncompiled: see the module docstring).
    eta = torch.maximum((p.square().sum(dim=-1).sum() / n).sqrt(), torch.as_tensor(eps2)) * lr
    scale = eta
    if clip_threshold is not None:
        scale = eta / ((u.square().sum(dim=-1).sum() / n).sqrt() / clip_threshold).clamp(min=1.0)
    p.mul_(1.0 - eta * weight_decay).sub_(u * scale)
