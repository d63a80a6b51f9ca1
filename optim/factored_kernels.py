"""The fast path of the rank-1 factored optimizers (Adafactor, AdaLomo, AdaMeM's full-space part) on a whole
fp32 matrix: the same update as their readable reference code, in fewer passes over the matrix and without fresh m x n
temporaries (tested against the references to fp32 rounding: tests/optim/test_factored_kernels.py).

Why: the reference code (optim/adafactor.py, optim/adalomo.py + optim/factorization.py) states the
update op by op, as the papers and HF write it, and allocates about five m x n temporaries per matrix
per step (g^2, the outer product, the quotient, the clipped and the scaled update). On a GPU the caching
allocator makes those cheap but each is a kernel launch and a pass over memory; on CPU a fresh large
tensor also costs its page faults, which dominate (a 1024 x 4096 fp32 temporary: ~8 ms to allocate and
fill, ~1 ms for an in-place op over an existing one, 1 thread). Here:
- g^2 goes into the workspace and its two means take eps1 afterwards (mean(g^2 + eps1) = mean(g^2) + eps1);
- the direction is built in one m x n buffer (the outer product of the row and column factors, then
  the division or product by g in place); on CPU the buffer is reused across steps and parameters of the
  same shape (`workspace`), on CUDA it is a fresh tensor from the caching allocator;
- the RMS clip, the bias correction and the learning rate fold into one 0-d scale; where that scale is
  known before the direction is built (no clip, or a clip computed from the statistics), the direction is
  built already multiplied by `folded_scale`'s factor and the decayed update is one `lerp_` over the
  parameter (`apply_folded`), else a decay pass plus one `addcmul_` (`apply_scaled`).
Everything stays on the device: no host sync.
"""

from __future__ import annotations

import threading

import torch

_WORKSPACE: dict[tuple[tuple[int, ...], torch.device, int, int], torch.Tensor] = {}


def workspace(like: torch.Tensor, slot: int = 0) -> torch.Tensor:
    """An fp32 buffer shaped like `like`, for one update's direction. CPU: one per (shape, device, thread,
    slot), reused: its contents are overwritten, so the caller must be done with it before its thread's next
    update of that shape (`slot` tells apart two buffers of one update). Per thread because updates may run
    concurrently: under DDP the fused updates run in the callbacks of the buckets' all-reduce futures
    (trainer/ddp_fused.py), on gloo's threads. Elsewhere a new tensor (the caching allocator reuses the
    memory)."""
    if like.device.type != "cpu":
        return torch.empty(like.shape, dtype=torch.float32, device=like.device)
    key = (tuple(like.shape), like.device, threading.get_ident(), slot)
    buf = _WORKSPACE.get(key)
    if buf is None:
        buf = _WORKSPACE[key] = torch.empty(like.shape, dtype=torch.float32, device=like.device)
    return buf


def mean_sq_stats(g: torch.Tensor, eps1: float, buf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean over columns, mean over rows) of g^2 + eps1, with g^2 in the workspace `buf` (mean(g^2) + eps1:
    the eps1 pass over the matrix moves onto the two vectors)."""
    torch.mul(g, g, out=buf)
    return buf.mean(dim=-1).add_(eps1), buf.mean(dim=-2).add_(eps1)


def ema_(stat: torch.Tensor, value: torch.Tensor, beta: float) -> None:
    """stat <- beta stat + (1 - beta) value, as one lerp (one kernel instead of two)."""
    stat.lerp_(value, 1.0 - beta)


# Below this weight decay the update is not folded into a lerp: its factor -1/weight_decay (`folded_scale`)
# would leave the fp32 range for a large direction. Any decay a run uses is far above it.
MIN_FOLDED_WEIGHT_DECAY = 1e-12


def decay_of(rate: torch.Tensor | float, weight_decay: float) -> torch.Tensor | float | None:
    """The decoupled decay factor rate * weight_decay of one step, None without weight decay."""
    return rate * weight_decay if weight_decay else None


def folds(group: dict, rms_scaled: bool) -> bool:
    """Whether `apply_folded` may finish an update of `group`'s parameter: without weight decay always; with it, when
    the decay is at least MIN_FOLDED_WEIGHT_DECAY and the step's rate is known on the host to be non-zero, since
    `folded_scale` divides by the rate (rate * weight_decay). A rate of 0 comes from lr 0 (a schedule that ends at
    final_lr_ratio 0 sets it on the last step) or, when the rate is scaled by max(eps2, RMS(W)) (`rms_scaled`:
    Adafactor's scale_parameter, AdaLomo), from eps2 0 and a zero matrix (LoRA's B starts at 0). A tensor lr is
    not read (no host sync): the update takes the unfolded path."""
    weight_decay = group["weight_decay"]
    if weight_decay == 0.0:
        return True
    lr = group["lr"]
    lr_positive = group.get("relative_step", False) or (not torch.is_tensor(lr) and lr > 0)
    return weight_decay >= MIN_FOLDED_WEIGHT_DECAY and lr_positive and (not rms_scaled or group["eps2"] > 0)


def folded_scale(scale: torch.Tensor | float, decay: torch.Tensor | float | None) -> torch.Tensor | float:
    """The factor c to build the direction u with, as w = c u, for `apply_folded`:
    p (1 - decay) - scale u = p + decay (w - p) = lerp(p, w, decay) with c = -scale / decay, and
    p - scale u = p + w with c = -scale. Rounding: lerp's w - p is exact to one ulp of c u, and decay
    times it to one ulp of scale u: the update's own rounding, whatever the decay."""
    return -scale if decay is None else -scale / decay


def apply_folded(p: torch.Tensor, w: torch.Tensor, decay: torch.Tensor | float | None) -> None:
    """p <- lerp(p, w, decay) (p + w without decay), in place: one pass over p for a decayed update whose
    direction w was built with `folded_scale`'s factor."""
    if decay is None:
        p.add_(w)
    else:
        p.lerp_(w, decay)


def apply_scaled(
    p: torch.Tensor, u: torch.Tensor, scale: torch.Tensor | float, decay: torch.Tensor | float | None
) -> None:
    """p <- p * (1 - decay) - scale * u, in place (`decay` None: no decay)."""
    if decay is not None:
        p.mul_(1.0 - decay)
    if torch.is_tensor(scale):
        p.addcmul_(u, scale, value=-1.0)
    else:
        p.add_(u, alpha=-scale)
