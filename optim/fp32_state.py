"""Base class of this package's optimizers: fp32 state that stays fp32 across `load_state_dict`.

torch.optim.Optimizer.load_state_dict casts floating state tensors to the parameter's dtype
(sensible for torch's own optimizers, whose state matches the parameter). Our state (moments,
second-moment statistics and factors, projectors) is fp32 by design whatever the parameter dtype,
so a bf16 model resumed with the cast would continue from rounded state and diverge from the
uninterrupted run. Here floating state tensors are restored exactly as saved: moved to the
parameter's device, never cast. Everything else (step counters, parameter groups) is loaded by
torch's own code.
"""

from __future__ import annotations

from typing import Any

import torch


class FP32StateOptimizer(torch.optim.Optimizer):
    """A torch.optim.Optimizer whose floating state tensors keep their saved dtype on load."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        held: dict[Any, dict[str, torch.Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        for pid, s in state_dict["state"].items():
            stripped[pid] = {k: v for k, v in s.items() if not (torch.is_tensor(v) and v.is_floating_point())}
            held[pid] = {k: v for k, v in s.items() if torch.is_tensor(v) and v.is_floating_point()}
        super().load_state_dict({**state_dict, "state": stripped})
        # torch.optim's load_state_dict has just checked that the group sizes match.
        for pid, p in zip(saved_ids, params, strict=True):
            for k, v in held.get(pid, {}).items():
                self.state[p][k] = v.to(device=p.device, copy=True)
