"""GaLore's gradient projector, as plain functions over tensors kept in `optimizer.state`.

The reference (`galore_torch.GaLoreProjector`) is a Python object stored in the optimizer state;
that cannot be checkpointed with `torch.load(weights_only=True)`, so here the projector is just
tensors in the parameter's state:

- `proj_left`  (m x r): top-r left singular vectors U[:, :r] of the gradient G (m x n);
  projection R = P^T G (r x n), back-projection P R.
- `proj_right` (r x n): top-r right singular vectors Vh[:r, :]; projection G Q^T (m x r),
  back-projection R Q.
- both for `full` (the "double projection" ablation): P^T G Q^T (r x r), back P R Q.

Which side (`proj_type`, same meanings as galore_torch):
- `std`: the smaller side (m >= n -> right, m < n -> left; note m == n -> right, as the reference);
- `reverse_std`: the larger side (m >= n -> left, else right);
- `left` / `right`: always that side; `full`: both.

Refresh schedule (Algorithm 2; galore_torch): with `step` = the number of completed steps
(0 on the first call), the basis is recomputed when `step % update_proj_gap == 0`, i.e. on the
first step and every T steps after.

SVD: `exact` = `torch.linalg.svd(G.float(), full_matrices=False)` (what galore_torch calls, so the
bases agree bit for bit); `randomized` = Halko et al.'s randomized range finder (the algorithm of
`torch.svd_lowrank`: q = r + 10 columns, 2 power iterations with QR re-orthonormalisation) with
a `torch.Generator` seeded from the step, so it is deterministic, resumable and does not consume
the global RNG (which `torch.svd_lowrank` would).

SVD failure (LinAlgError or non-finite output, e.g. from a NaN gradient) never raises: the previous
basis is kept (or, on the first refresh, a jittered copy of G is tried and then a seeded random
orthonormal basis is used), a warning is issued and `state["svd_failures"]` is incremented (the
optimizers expose the total as `optimizer.svd_failures` for the trainer's logs).

Host syncs: a refresh step reads each new basis's finiteness on the host (one read per matrix, every T steps).
A device-side choice would not save the wait: `torch.linalg.svd` on CUDA synchronises with the host by
itself (torch's documentation; it reads the solver's status), and the randomized method ends in one. The
steps between refreshes read nothing (tests/trainer/test_host_syncs.py).
"""

from __future__ import annotations

import typing
import warnings
import zlib
from typing import Any

import torch

from optim.config import MomentPolicy, ProjType, SvdMethod
from optim.sharding import WHOLE, Sharding

PROJ_TYPES: tuple[ProjType, ...] = typing.get_args(ProjType)
SVD_METHODS: tuple[SvdMethod, ...] = typing.get_args(SvdMethod)
MOMENT_POLICIES: tuple[MomentPolicy, ...] = typing.get_args(MomentPolicy)
# Per-group options of every optimizer that keeps a projector (GaLore's and AdaMeM's groups), with
# the defaults of a group that does not set them; `rank` None = the group is not low-rank.
PROJECTOR_DEFAULTS: dict[str, Any] = dict(
    rank=None, update_proj_gap=200, svd_method="exact", moments_on_proj_change="keep"
)
OVERSAMPLE = 10
POWER_ITERS = 2


def is_lowrank(group: dict, p: torch.Tensor) -> bool:
    """A parameter is updated through a projector when its group has a `rank` and it is a matrix."""
    return group.get("rank") is not None and p.dim() == 2


def projection_side(shape: torch.Size | tuple[int, ...], proj_type: str) -> str:
    """'left', 'right' or 'full' for a gradient of `shape` (m, n)."""
    m, n = shape[-2], shape[-1]
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("left", "right", "full"):
        return proj_type
    raise ValueError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")


def projected_shape(shape: torch.Size | tuple[int, ...], rank: int, proj_type: str) -> tuple[int, int]:
    """Shape of project(G) for a gradient of `shape` (m, n): (r, n) left, (m, r) right, (r, r) full,
    with r = min(rank, m, n) (the SVD bases have at most min(m, n) vectors)."""
    m, n = shape[-2], shape[-1]
    r = min(rank, m, n)
    side = projection_side(shape, proj_type)
    return {"left": (r, n), "right": (m, r), "full": (r, r)}[side]


def refresh_due(state: dict, group: dict) -> bool:
    """Will the next step recompute the bases? (no basis yet, or `state["step"] % update_proj_gap == 0`)."""
    has_basis = "proj_left" in state or "proj_right" in state
    return not has_basis or state["step"] % group["update_proj_gap"] == 0


def _randomized_svd(g: torch.Tensor, rank: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate (U[:, :q], Vh[:q]) with q = min(rank + OVERSAMPLE, m, n) (Halko et al. 2011)."""
    m, n = g.shape
    q = min(rank + OVERSAMPLE, m, n)
    gen = torch.Generator(device=g.device)
    gen.manual_seed(seed)
    omega = torch.randn(n, q, generator=gen, device=g.device, dtype=g.dtype)
    basis = torch.linalg.qr(g @ omega).Q
    for _ in range(POWER_ITERS):
        basis = torch.linalg.qr(g @ torch.linalg.qr(g.T @ basis).Q).Q
    u_small, _, vh = torch.linalg.svd(basis.T @ g, full_matrices=False)
    return basis @ u_small, vh


def _svd(g: torch.Tensor, rank: int, method: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "exact":
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        return u, vh
    if method == "randomized":
        return _randomized_svd(g, rank, seed)
    raise ValueError(f"svd_method must be one of {SVD_METHODS}, got {method!r}")


def _bases(g: torch.Tensor, rank: int, side: str, method: str, seed: int) -> dict[str, torch.Tensor] | None:
    """Top-`rank` bases for `side`, or None when the SVD fails or returns non-finite values."""
    try:
        u, vh = _svd(g, rank, method, seed)
    except (RuntimeError, torch.linalg.LinAlgError):  # LinAlgError subclasses RuntimeError
        return None
    out = {}
    if side in ("left", "full"):
        out["proj_left"] = u[:, :rank].contiguous()
    if side in ("right", "full"):
        out["proj_right"] = vh[:rank, :].contiguous()
    if g.is_meta:  # shape-only runs (trainer/memory_accounting.py): no values to check
        return out
    if not all(bool(torch.isfinite(t).all()) for t in out.values()):
        return None
    return out


def _random_bases(shape, rank: int, side: str, seed: int, device) -> dict[str, torch.Tensor]:
    """Seeded random orthonormal bases: last resort when no SVD basis exists yet."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    m, n = shape
    r = min(rank, m, n)  # as many vectors as an SVD basis has: the moments keep their shape at the next refresh
    out = {}
    if side in ("left", "full"):
        out["proj_left"] = torch.linalg.qr(torch.randn(m, r, generator=gen, device=device)).Q
    if side in ("right", "full"):
        out["proj_right"] = torch.linalg.qr(torch.randn(n, r, generator=gen, device=device)).Q.T.contiguous()
    return out


def compute_bases(
    grad: torch.Tensor, rank: int, side: str, method: str, seed: int, state: dict, name: str = "?"
) -> dict[str, torch.Tensor]:
    """New bases from `grad` (any dtype; the SVD runs in fp32). Counts failures in state["svd_failures"]."""
    g = grad.float()
    bases = _bases(g, rank, side, method, seed)
    if bases is not None:
        return bases
    state["svd_failures"] = state.get("svd_failures", 0) + 1
    previous = {k: state[k] for k in ("proj_left", "proj_right") if k in state}
    if previous:
        warnings.warn(
            f"GaLore/AdaMeM projector: SVD failed for {name} {tuple(g.shape)}; keeping the previous basis", stacklevel=2
        )
        return previous
    # First refresh: retry on a slightly jittered copy (helps LAPACK non-convergence), then random.
    gen = torch.Generator(device=g.device)
    gen.manual_seed(seed + 1)
    scale = 1e-3 * float(g.nan_to_num().pow(2).mean().sqrt()) + 1e-30
    bases = _bases(g + scale * torch.randn(g.shape, generator=gen, device=g.device), rank, side, method, seed)
    if bases is None:
        warnings.warn(
            f"GaLore/AdaMeM projector: SVD failed for {name} {tuple(g.shape)}; using a random basis", stacklevel=2
        )
        bases = _random_bases(g.shape, rank, side, seed, g.device)
    else:
        warnings.warn(
            f"GaLore/AdaMeM projector: SVD failed for {name} {tuple(g.shape)}; used a jittered copy", stacklevel=2
        )
    return bases


def project(grad: torch.Tensor, state: dict, sh: Sharding = WHOLE) -> torch.Tensor:
    """Low-rank gradient: P^T G, G Q^T, or P^T G Q^T (whichever bases are in `state`). Sharded G (`sh`):
    a basis on the sharded side holds this rank's rows of it, so the product that contracts the sharded
    dim is a partial sum, all-reduced (an r x n or m x r result, never the m x n gradient)."""
    out = grad
    if "proj_left" in state:
        out = state["proj_left"].T @ out
        if sh.sharded and sh.dim is not None and sh.dim % 2 == 0:
            out = sh.sum_all_into(out)
    if "proj_right" in state:
        out = out @ state["proj_right"].T
        if sh.sharded and sh.dim is not None and sh.dim % 2 == 1:
            out = sh.sum_all_into(out)
    return out


def project_back(low: torch.Tensor, bases: dict) -> torch.Tensor:
    """Back to the full shape: P X, X Q, or P X Q (unscaled)."""
    out = low
    if "proj_left" in bases:
        out = bases["proj_left"] @ out
    if "proj_right" in bases:
        out = out @ bases["proj_right"]
    return out


def add_projected_back_(
    w: torch.Tensor, low: torch.Tensor, bases: dict, beta: float | torch.Tensor, alpha: float
) -> bool:
    """w <- beta w + alpha project_back(low), in place, as one addmm_ into w (no m x n temporary: the
    back-projection, its scaling and the weights' update are one matmul pass), for a one-sided projection
    (P X or X Q) of an fp32 w; a 0-d tensor beta takes one in-place pass first. Returns False, doing nothing,
    for a two-sided projection or another dtype (the caller then uses project_back)."""
    if ("proj_left" in bases) == ("proj_right" in bases) or w.dtype != torch.float32 or low.dtype != torch.float32:
        return False
    if torch.is_tensor(beta):
        w.mul_(beta)
        beta = 1.0
    if "proj_left" in bases:
        w.addmm_(bases["proj_left"], low, beta=beta, alpha=alpha)
    else:
        w.addmm_(low, bases["proj_right"], beta=beta, alpha=alpha)
    return True


def refresh_projector(
    state: dict,
    grad: torch.Tensor,
    group: dict,
    side: str,
    first_moment_keys: tuple[str, ...],
    lowrank_moment_keys: tuple[str, ...],
    name: str = "?",
    sh: Sharding = WHOLE,
) -> bool:
    """Recompute the bases if due (`state["step"] % update_proj_gap == 0` or none yet).

    On a change of subspace the low-rank moments follow `group["moments_on_proj_change"]`:
    `keep` (galore_torch: moments carry over unchanged, though expressed in the old basis),
    `reset` (every key in `lowrank_moment_keys` zeroed and `state["moment_step"]` set to 0, so bias
    correction restarts), or `rotate` (first moments M -> new^T old M, i.e. re-expressed in the new
    basis: exact for the part of M inside the new subspace; second-moment statistics kept, as a
    factored/elementwise second moment has no exact rotation). Returns True when refreshed.

    Sharded gradient (`sh`, FSDP2): the full gradient is gathered on one owner rank (chosen from the
    parameter's name, so the SVDs of a model spread over the ranks), which runs the SVD in fp32 and
    broadcasts the bases; each rank keeps the rows of a basis on the sharded side. A failed SVD is
    decided by the owner and counted on every rank (the counters agree).
    """
    has_basis = "proj_left" in state or "proj_right" in state
    if not refresh_due(state, group):
        return False
    old = {k: state[k] for k in ("proj_left", "proj_right") if k in state}
    seed = state["step"] + 1_000_003 * state.get("proj_updates", 0)
    method = group.get("svd_method", PROJECTOR_DEFAULTS["svd_method"])
    if sh.sharded:
        new = _sharded_bases(grad, group["rank"], side, method, seed, state, name, sh)
    else:
        new = compute_bases(grad, group["rank"], side, method, seed, state, name)
    state.update(new)
    state["proj_updates"] = state.get("proj_updates", 0) + 1
    # .get: a group may lack the option (e.g. one restored from a checkpoint saved without it).
    policy = group.get("moments_on_proj_change", PROJECTOR_DEFAULTS["moments_on_proj_change"])
    if policy not in MOMENT_POLICIES:
        raise ValueError(f"moments_on_proj_change must be one of {MOMENT_POLICIES}, got {policy!r}")
    if has_basis and policy == "reset":
        for key in lowrank_moment_keys:
            if key in state:
                state[key].zero_()
        state["moment_step"] = 0
    elif has_basis and policy == "rotate":
        for key in first_moment_keys:
            if key in state:
                state[key] = project(project_back(state[key], old), new, sh).contiguous()
    return True


def projected_sharding(sh: Sharding, side: str) -> Sharding:
    """The sharding of R = project(G) (and of its moments) for G sharded as `sh`: R = P^T G (left) is
    whole when G's rows are sharded, R = G Q^T (right) keeps G's row split; and the transposes."""
    if not sh.sharded or side == "full":
        return WHOLE
    assert sh.dim is not None
    keeps_split = (side == "right") == (sh.dim % 2 == 0)
    return sh if keeps_split else WHOLE


def owner_of(name: str, world: int) -> int:
    """The rank that runs the SVD of parameter `name` (a stable hash, the same on every rank)."""
    return zlib.crc32(name.encode()) % world


def _sharded_bases(
    grad: torch.Tensor, rank: int, side: str, method: str, seed: int, state: dict, name: str, sh: Sharding
) -> dict[str, torch.Tensor]:
    """compute_bases over a sharded gradient: gather on the owner, SVD there, broadcast (see
    refresh_projector). Returns the bases as this rank keeps them."""
    assert sh.dim is not None
    owner = owner_of(name, sh.world_size)
    full = sh.gather_to(grad, owner)
    previous = {k: state[k] for k in ("proj_left", "proj_right") if k in state}
    # [failed with a previous basis to keep, failures counted, left columns, right rows]
    header = torch.zeros(4, dtype=torch.int64, device=grad.device)
    bases: dict[str, torch.Tensor] = {}
    if full is not None:
        if previous:
            found = _bases(full.float(), rank, side, method, seed)
            if found is None:
                warnings.warn(
                    f"GaLore/AdaMeM projector: SVD failed for {name} {tuple(full.shape)}; keeping the previous basis",
                    stacklevel=3,
                )
                header[0], header[1] = 1, 1
            else:
                bases = found
        else:
            probe: dict[str, Any] = {}
            bases = compute_bases(full, rank, side, method, seed, probe, name)
            header[1] = probe.get("svd_failures", 0)
        if "proj_left" in bases:
            header[2] = bases["proj_left"].shape[1]
        if "proj_right" in bases:
            header[3] = bases["proj_right"].shape[0]
    sh.broadcast(header, owner)
    if int(header[1]):
        state["svd_failures"] = state.get("svd_failures", 0) + int(header[1])
    if int(header[0]):
        return previous
    m, n = sh.full_shape(grad)
    out = {}
    if side in ("left", "full"):
        left = bases.get("proj_left", grad.new_empty(m, int(header[2]), dtype=torch.float32))
        left = sh.broadcast(left.contiguous(), owner)
        out["proj_left"] = (sh.local_rows(left, 0) if sh.dim % 2 == 0 else left).contiguous()
    if side in ("right", "full"):
        right = bases.get("proj_right", grad.new_empty(int(header[3]), n, dtype=torch.float32))
        right = sh.broadcast(right.contiguous(), owner)
        out["proj_right"] = (sh.local_rows(right, 1) if sh.dim % 2 == 1 else right).contiguous()
    return out


class ProjectorCounters(torch.optim.Optimizer):
    """Totals, over the parameters, of the counters `refresh_projector` keeps in each state:
    `proj_updates` (basis refreshes) and `svd_failures` (SVDs that fell back, see above), for the
    trainer's logs. A mixin for the optimizers whose state may hold a projector."""

    @property
    def svd_failures(self) -> int:
        return sum(int(s.get("svd_failures", 0)) for s in self.state.values())

    @property
    def proj_updates(self) -> int:
        return sum(int(s.get("proj_updates", 0)) for s in self.state.values())
