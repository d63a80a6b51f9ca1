"""The optimizer side of GaLore's projected backward (optim/projected_backward.py has the autograd side).

A low-rank weight W (m x n) of a group with `projected_backward=True` can receive, instead of its
full gradient G in `W.grad`, the projected gradient R = project(G) (P^T G, G Q^T or P^T G Q^T,
optim/projector.py) computed directly in backward. R needs a tensor to accumulate into over the
micro-batches of a step and a post-accumulate-grad hook for the fused path; W.grad cannot hold it
(autograd requires a parameter's gradient to have the parameter's shape). So each such weight gets
a *carrier*: a leaf tensor of R's shape that requires grad and is an input of the projected
backward's autograd Function. Autograd accumulates R into `carrier.grad` exactly as it accumulates G
into `W.grad`, and fires the carrier's post-accumulate-grad hooks. The carrier's own values are never
read: it is a zero-stride expansion of one fp32 scalar, so it costs no memory; `carrier.grad` is fp32
(the dtype the optimizers project in) and contiguous.

Protocol, per optimizer step and weight (`ProjectedGradSource`, implemented by `ProjectedGrads` below
and by optim.in_backward.InBackwardOptimizer, which delegates to its per-parameter optimizers):
- before the forward, `projection_for(W)`: the bases the next `step()` will project with, or None when
  that step refreshes them (it needs the full G for the SVD; optim.projector.refresh_due) or W is not a
  projected-backward weight. None -> the layer runs the ordinary backward and fills `W.grad`.
- `grad_carrier(W)`: the carrier (created on first use; its shape is optim.projector.projected_shape).
- `step()` consumes `carrier.grad` as R when `W.grad` is None, skipping the projection (the projector
  is not refreshed: `projection_for` said it would not be), then frees it as it would free `W.grad`
  (`zero_grad` frees both). The state, its checkpoint format and the update math are unchanged: only
  where R comes from differs, so parameters match the ordinary path to fp32 rounding (R is summed in
  another order).
A step that finds both `W.grad` and `carrier.grad`, or a projected gradient when a refresh is due,
raises: that means the forward and the optimizer disagreed about the step, never something to paper over.

`gradient_holders(source, params)` gives, for each parameter, the tensor whose `.grad` holds the
gradient the optimizer will consume this step (the carrier or the parameter): the trainer's clipping
uses it (trainer/update.py; the clipping rule is in optim/projected_backward.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from optim.projector import is_lowrank, projected_shape, refresh_due


@runtime_checkable
class ProjectedGradSource(Protocol):
    """What the projected backward asks of an optimizer (see the module docstring)."""

    def projected_backward_params(self) -> list[torch.Tensor]: ...

    def projection_for(self, p: torch.Tensor) -> dict[str, torch.Tensor] | None: ...

    def grad_carrier(self, p: torch.Tensor) -> torch.Tensor: ...


class ProjectedGrads(torch.optim.Optimizer):
    """Mixin for the GaLore optimizers: carriers, `projection_for` and `take_projected_grad`.

    `projected_grads` is the number of parameters whose last `step()` consumed a projected gradient
    (a gauge, logged as optim/projected_grads: it says what train/grad_norm is made of)."""

    projected_grads: int = 0

    def _group_of(self, p: torch.Tensor) -> dict | None:
        # Looked up each time: load_state_dict replaces the group dicts, so a cached one goes stale.
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        return None

    def _is_projected(self, p: torch.Tensor, group: dict | None) -> bool:
        return group is not None and bool(group.get("projected_backward")) and is_lowrank(group, p)

    def projected_backward_params(self) -> list[torch.Tensor]:
        """The low-rank parameters of groups with `projected_backward=True`, in group order."""
        return [p for g in self.param_groups for p in g["params"] if self._is_projected(p, g)]

    def projection_for(self, p: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """{'proj_left'/'proj_right': basis} the next step projects with; None when that step refreshes
        the bases (or none exist yet) or `p` is not a projected-backward parameter."""
        group = self._group_of(p)
        if not self._is_projected(p, group) or p not in self.state:
            return None
        state = self.state[p]
        assert group is not None  # _is_projected checked it
        if refresh_due(state, group):
            return None
        return {k: state[k] for k in ("proj_left", "proj_right") if k in state}

    def grad_carrier(self, p: torch.Tensor) -> torch.Tensor:
        """The leaf tensor whose `.grad` accumulates p's projected gradient (created on first use)."""
        carriers: dict[torch.Tensor, torch.Tensor] = self.__dict__.setdefault("_carriers", {})
        if p not in carriers:
            group = self._group_of(p)
            if group is None or not self._is_projected(p, group):
                raise ValueError("grad_carrier: the parameter is not in a low-rank group with projected_backward=True")
            shape = projected_shape(p.shape, group["rank"], group["proj_type"])
            # Zero-stride: the values are never read, only the .grad autograd accumulates (fp32, contiguous).
            carriers[p] = torch.zeros((), dtype=torch.float32, device=p.device).expand(shape).requires_grad_()
        return carriers[p]

    def take_projected_grad(self, p: torch.Tensor) -> torch.Tensor | None:
        """p's accumulated projected gradient (fp32), freed from its carrier; None when there is none."""
        carrier = self.__dict__.get("_carriers", {}).get(p)
        if carrier is None or carrier.grad is None:
            return None
        if p.grad is not None:
            raise RuntimeError(
                "a GaLore weight has both a full gradient and a projected one in the same step: the forward "
                "passes of this step disagreed about the projector refresh (optim/projected_grads.py)"
            )
        low = carrier.grad
        carrier.grad = None
        self.projected_grads += 1
        return low

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        for carrier in self.__dict__.get("_carriers", {}).values():
            if carrier.grad is not None:
                if set_to_none:
                    carrier.grad = None
                else:
                    carrier.grad.zero_()


def check_projected_step(state: dict, group: dict, name: str) -> None:
    """Raise when a projected gradient arrives for a step that must refresh the bases from the full G."""
    if "step" not in state or refresh_due(state, group):
        raise RuntimeError(
            f"{name}: a projected gradient arrived for a step that refreshes the projector (it needs the full "
            "gradient): the forward asked projection_for() under another optimizer state (optim/projected_grads.py)"
        )


def gradient_holders(source: object, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """For each of `params`, the tensor whose `.grad` holds the gradient the optimizer consumes this step:
    its carrier when its gradient was projected in backward (`.grad` of the parameter is None and the
    carrier's is set), else the parameter itself. Any optimizer that is not a ProjectedGradSource: `params`."""
    if not isinstance(source, ProjectedGradSource):
        return list(params)
    projected = {p for p in source.projected_backward_params()}
    out = []
    for p in params:
        if p.grad is None and p in projected:
            carrier = source.grad_carrier(p)
            out.append(carrier if carrier.grad is not None else p)
        else:
            out.append(p)
    return out
