"""GaLore's projected backward (AdaMeM paper, Appendix B): the low-rank gradient without forming G.

For a linear layer y = x W^T with W (m x n) = (out x in), flattened inputs X (z x n, z = tokens) and
output gradients Y' (z x m), the weight gradient is G = Y'^T X (m x n, 2 z m n FLOPs). GaLore only
ever uses its projection, so between projector refreshes the backward computes that directly:

    right  (Q: r x n):  G Q^T     = Y'^T (X Q^T)         2 z r n + 2 z m r       = 2 z r (m + n)
    left   (P: m x r):  P^T G     = (Y' P)^T X           2 z m r + 2 z r n       = 2 z r (m + n)
    full   (both):      P^T G Q^T = (Y' P)^T (X Q^T)     2 z r (m + n) + 2 z r^2

instead of 2 z m n (+ the optimizer's projection of G, 2 r m n, which is skipped too). The input
gradient Y' W (2 z m n) is computed exactly as the ordinary backward does, so everything upstream of
the layer is unchanged. `backward_flops` gives these closed forms (tools/bench_projected_backward.py
checks them against torch's FlopCounterMode).

When: the bases and the refresh schedule live in the optimizer's state; before each forward the layer
asks `projection_for(W)` (optim/projected_grads.py). On a step that refreshes the bases (the first,
and every update_proj_gap steps) the answer is None and the layer runs the ordinary backward (the SVD
needs G); otherwise the projected gradient R goes to the weight's carrier (a leaf of R's shape,
accumulated by autograd over micro-batches; `W.grad` stays None) and the optimizer consumes it.

Precision: under autocast the layer computes in the autocast dtype (as nn.Linear would: x and W are
cast, the products run in bf16, the result goes out in bf16) and the bases are cast to it too; R is
accumulated in fp32 in the carrier. In fp32 the parameters equal the ordinary path's to rounding (R is
summed in another order); in bf16 the rounding differs more (the ordinary path rounds G to bf16 and
projects it in fp32; this one rounds the z x r intermediate), of the order of bf16's 2^-8.

Gradient clipping (train.max_grad_norm; trainer/update.py). Rule: the clip norm is the norm of the
gradients the optimizer consumes: ||R|| for the weights whose gradient arrived projected, ||G|| for
every other parameter (and for all of them on refresh steps, where nothing is projected):
    c = min(1, max_grad_norm / (N + 1e-6)),  N^2 = sum_projected ||R_i||^2 + sum_rest ||G_j||^2,
and every consumed gradient (R or G) is multiplied by c. Why this rule: the GaLore update depends on
G only through R, and projection is linear, so scaling R by c is exactly clipping G by c and then
projecting; only the norm that picks c differs. ||G|| itself cannot be had without forming G (or
z x z Gram matrices, dearer than G for z > mn/(m+n)). Since the bases are orthonormal, ||R|| <= ||G||:
N is at most the ordinary norm, so this clips no more often than ordinary GaLore, and it never
skips clipping. train/grad_norm logs N (the norm before clipping) and optim/projected_grads how many
weights entered it projected (0 on a refresh step: then N is the ordinary ||G||).

Several ranks: DDP leaves the projected weights alone (they are in its ignore list:
`projected_linear_weight_names`), and the trainer averages their gradients over the ranks itself, in one
all-reduce after the last micro-batch's backward: the carriers' R between refreshes, W's G on a refresh
step. Projection is linear and every rank holds the same bases (each refresh's SVD sees the averaged G),
so the mean of the ranks' R is the projection of the mean gradient: the ordinary GaLore step. Why not
DDP's find_unused_parameters: it walks the graph after every forward, all-reduces full-size zero
buckets for the absent weights, and waits for a device-to-host copy of its used-parameter map in every
step that has one (a host stall on CUDA).
Not supported (refused when the config loads, `check_projected_backward_supported`): the sharding
engines (fsdp2, deepspeed: the projected layer would need the whole weight and its carrier sharded
alike), the fused update on several ranks (each rank would apply its own R before any average), and
train.compile: tried with torch 2.13 (blocks compiled, aot_eager backend), the question to the optimizer
breaks the graph, dynamo guards on each weight's identity and recompiles until its cache limit, and the
projected gradients did not reach the optimizer (parameters off by 3e-3 after 5 steps).
Weights that are not an nn.Linear's (the embedding under lowrank_targets=all) keep the ordinary
backward: the optimizer then finds their full G in `.grad` and projects it as usual.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from optim.projected_grads import ProjectedGradSource


def check_projected_backward_supported(*, world_size: int, compile: bool, engine: str, fused: bool) -> None:
    """Raise a clear ValueError for the settings optim.projected_backward=true does not support."""
    if world_size > 1 and engine != "ddp":
        raise ValueError(
            f"optim.projected_backward=true is not supported with train.engine={engine} on {world_size} ranks: "
            "it runs in one process or under DDP (which averages the projected gradients over the ranks), while "
            f"{engine} shards the weights it projects. Use --train.engine=ddp or --optim.projected_backward=false"
        )
    if world_size > 1 and fused:
        raise ValueError(
            f"optim.projected_backward=true does not work with train.fused_update=true on {world_size} ranks: the "
            "fused update would apply each rank's own projected gradient before the ranks average it. "
            "Use --train.fused_update=false or --optim.projected_backward=false"
        )
    if compile:
        raise ValueError(
            "optim.projected_backward=true does not work with train.compile=true (the projected layers break the "
            "compiled graphs and their projected gradients are lost). "
            "Set --train.compile=false or --optim.projected_backward=false"
        )


def backward_flops(tokens: int, out_features: int, in_features: int, rank: int | None, side: str | None) -> int:
    """Closed-form matmul FLOPs of one linear layer's backward (2 per multiply-add): the input gradient
    2 z m n plus the weight's gradient, 2 z m n when `rank` is None (ordinary), else the projected
    forms of the module docstring for `side` (left, right, full) with r = min(rank, m, n)."""
    z, m, n = tokens, out_features, in_features
    if rank is None:
        return 4 * z * m * n
    r = min(rank, m, n)
    extra = 2 * z * r * r if side == "full" else 0
    return 2 * z * m * n + 2 * z * r * (m + n) + extra


class ProjectedLinear(torch.autograd.Function):
    """y = x W^T whose backward returns the exact input gradient and, for W, only R = project(G),
    as the gradient of `carrier` (W gets none). `proj_left` (m x r) / `proj_right` (r x n): the bases
    of optim/projector.py (either may be None, not both)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        carrier: torch.Tensor,
        proj_left: torch.Tensor | None,
        proj_right: torch.Tensor | None,
    ) -> torch.Tensor:
        device = x.device.type
        # Under autocast, compute as autocast would for a linear (F.linear below runs with autocast
        # off, so the casts are explicit and the backward, which runs outside autocast, sees them).
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        ctx.save_for_backward(xc, wc, proj_left, proj_right)
        ctx.x_dtype = x.dtype
        with torch.autocast(device_type=device, enabled=False):
            return F.linear(xc, wc)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        xc, wc, proj_left, proj_right = ctx.saved_tensors
        dtype = wc.dtype
        gy = grad_y.to(dtype).reshape(-1, wc.shape[0])  # z x m
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gy.mm(wc).view(xc.shape).to(ctx.x_dtype)  # exact: the ordinary backward's product
        xf = xc.reshape(-1, wc.shape[1])  # z x n
        if proj_left is not None:
            gy = gy.mm(proj_left.to(dtype))  # Y' P: z x r
        if proj_right is not None:
            xf = xf.mm(proj_right.to(dtype).t())  # X Q^T: z x r
        low = gy.t().mm(xf)  # (Y' P)^T X, Y'^T (X Q^T) or (Y' P)^T (X Q^T)
        return grad_x, None, low.float(), None, None


def projected_linear(
    x: torch.Tensor, weight: torch.Tensor, carrier: torch.Tensor, bases: dict[str, torch.Tensor]
) -> torch.Tensor:
    """x W^T with the projected backward into `carrier` (checked against the bases' shape)."""
    left, right = bases.get("proj_left"), bases.get("proj_right")
    if left is None and right is None:
        raise ValueError("projected_linear needs proj_left and/or proj_right")
    m, n = weight.shape
    shape = (left.shape[1] if left is not None else m, right.shape[0] if right is not None else n)
    if tuple(carrier.shape) != shape:
        raise ValueError(f"carrier of shape {tuple(carrier.shape)} for a projected gradient of shape {shape}")
    # The weight enters detached: its gradient flows only to the carrier, and W's own AccumulateGrad node is
    # not in the graph at all (attached, it would still run, with no gradient, and fire W's post-accumulate
    # hooks: the fused path would see a hook without a gradient).
    return ProjectedLinear.apply(x, weight.detach(), carrier, left, right)


def _forward(module: nn.Linear, source: ProjectedGradSource, x: torch.Tensor) -> torch.Tensor:
    weight = module.weight
    # No graph (evaluation), or a step that refreshes the projector: the ordinary linear.
    bases = source.projection_for(weight) if torch.is_grad_enabled() and weight.requires_grad else None
    if bases is None:
        return F.linear(x, weight, module.bias)
    y = projected_linear(x, weight, source.grad_carrier(weight), bases)
    # The bias in y's dtype: under bf16 autocast nn.Linear's output is bf16, and an fp32 bias would promote it.
    return y if module.bias is None else y + module.bias.to(y.dtype)


@dataclass
class ProjectedBackwardHandle:
    """What `install_projected_backward` did: the modules it switched (by name) and the projected-backward
    weights it found no nn.Linear for (they keep the ordinary backward). `remove()` undoes it."""

    installed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    modules: list[nn.Linear] = field(default_factory=list, repr=False)

    def remove(self) -> None:
        for module in self.modules:
            del module.forward  # the instance attribute: back to nn.Linear.forward
        self.modules = []


def projected_linear_weight_names(model: nn.Module, param_groups: list[dict]) -> list[str]:
    """The names (model.named_parameters()) of the weights `install_projected_backward` will switch, from an
    optimizer spec's param groups: the nn.Linear weights of the groups with projected_backward. Known before
    the optimizer is built, for DDP, which must leave them to the trainer (trainer/parallelize.py)."""
    wanted = {id(p) for g in param_groups if g.get("projected_backward") for p in g["params"]}
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and id(module.weight) in wanted
    ]


def install_projected_backward(model: nn.Module, source: object) -> ProjectedBackwardHandle:
    """Make every nn.Linear of `model` whose weight is a projected-backward parameter of `source` (a GaLore
    optimizer, or the fused path's InBackwardOptimizer) compute its weight gradient projected, as above.

    Only the modules' `forward` is replaced (an instance attribute): parameters, their objects and the
    state_dict keys stay as they were."""
    if not isinstance(source, ProjectedGradSource):
        raise TypeError(
            f"install_projected_backward needs a GaLore optimizer (or InBackwardOptimizer over one), got "
            f"{type(source).__name__}"
        )
    wanted = {id(p) for p in source.projected_backward_params()}
    handle = ProjectedBackwardHandle()
    found: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in wanted:
            # Set on the instance: nn.Module.__call__ calls self.forward, so this one runs instead.
            module.forward = functools.partial(_forward, module, source)  # type: ignore[method-assign]
            handle.installed.append(name)
            handle.modules.append(module)
            found.add(id(module.weight))
    handle.skipped = [n for n, p in model.named_parameters() if id(p) in wanted and id(p) not in found]
    return handle
