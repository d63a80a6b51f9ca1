"""Fused in-backward updates: each parameter is updated from its post-accumulate-grad hook and its
gradient freed at once, so the full set of gradients never sits in memory (LOMO / AdaLomo style).

Built from the same OptimizerSpec as the ordinary path, as one optimizer per parameter, so the
per-parameter math is identical. Only the last micro-batch of an optimizer step is `armed`: on the
others the hooks let gradients accumulate as usual. The learning rate for the step must be set on
`param_groups` before the armed backward. The memory saving is full only without gradient
accumulation (accumulation needs every gradient kept until the last micro-batch).

Limits, refused by the trainer with a clear error rather than silently wrong:
- gradient-norm clipping needs the global norm before any update;
- several ranks (DDP): the hook would fire before the gradient is all-reduced.
Non-finite gradients: a parameter whose gradient is non-finite is not updated and the step is
flagged (`nonfinite`); parameters updated earlier in the same backward stay updated, so after
such a failure only the last checkpoint is a consistent state.
"""

from __future__ import annotations

import torch

from optim.registry import OptimizerSpec


class InBackwardOptimizer:
    def __init__(self, spec: OptimizerSpec):
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._handles = []
        self.armed = False
        self.nonfinite: list[str] = []
        self.grad_sq_sum = 0.0  # sum of squared gradient entries of the armed backward
        for group in spec.param_groups:
            options = {k: v for k, v in group.items() if k not in ("params", "names")}
            for name, p in zip(group["names"], group["params"]):
                self.optimizers[name] = spec.cls([{**options, "params": [p], "names": [name]}], **spec.kwargs)
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))

    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            if not self.armed:
                return
            sq = p.grad.detach().float().pow(2).sum()
            if not torch.isfinite(sq):
                self.nonfinite.append(name)
            else:
                self.grad_sq_sum += float(sq)
                self.optimizers[name].step()
            p.grad = None

        return hook

    def arm(self, armed: bool) -> None:
        """Arm before the backward of the last micro-batch of a step."""
        self.armed = armed
        if armed:
            self.nonfinite = []
            self.grad_sq_sum = 0.0

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        """Nothing to do: every update happened during backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"in_backward": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict) -> None:
        if "in_backward" not in state:
            raise ValueError(
                "this checkpoint holds an ordinary optimizer state, but train.fused_update=true; "
                "resume with the setting the run was started with"
            )
        missing = set(self.optimizers) - set(state["in_backward"])
        if missing:
            raise ValueError(f"checkpoint lacks optimizer state for parameters {sorted(missing)[:5]}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["in_backward"][name])

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
