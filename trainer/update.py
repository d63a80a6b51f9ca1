"""How a training step turns gradients into a parameter update: one interface, two strategies.

The loop is the same for both (in the spirit of torchtitan's optimizers-in-backward container,
whose `step()` is a no-op):

    updater.set_lr_factor(f)                      the schedule's multiplier of each peak lr
    for each micro-batch: updater.before_backward(is_last); updater.backward(loss)
    norm = updater.finish_backward()              global gradient norm (0-d tensor, inf if non-finite)
    updater.commit()
    ... at its next check (log, eval, checkpoint steps) the loop reads the losses and norms of the steps
    since the last one, in one host sync; a non-finite one stops the run there, without saving ...

- `StepAfterBackward` (the ordinary path): gradients accumulate in `.grad`; `finish_backward`
  measures their global norm and clips them to `max_grad_norm`; `commit` runs the optimizer's
  `step()` and frees the gradients.
- `UpdateInBackward` (`train.fused_update`): optim.in_backward.InBackwardOptimizer updates every
  parameter from its post-accumulate-grad hook during the last micro-batch's backward (armed by
  `before_backward(True)`); `finish_backward` completes the updates it had to defer and returns
  the norm of the gradients it saw; `commit` has nothing left to do. Clipping is refused when the
  config loads (the global norm is known only after the updates): see check_fused_supported.

DeepSpeed's AdamW (trainer/deepspeed_engine.StepInDeepSpeed) is a third: backward through its engine,
and ZeRO's step in `finish_backward`.

The first two own `state_dict` / `load_state_dict` (the optimizer's state as the checkpoint stores it) and
`counters()` (cumulative optimizer counters for the logs), and `state_of(p)` (one parameter's
optimizer state, which ReLoRA's restarts prune: trainer/relora.py). The peak learning rates come from the
config, never from a checkpoint, so `--optim.lr` may change on resume.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from optim import OptimizerSpec
from optim.in_backward import InBackwardOptimizer
from optim.projected_grads import gradient_holders
from trainer.full_state import local_optimizer_state

# Cumulative counters some optimizers keep (GaLore / AdaMeM projector refreshes and SVD failures), and
# GaLore's gauge of the weights whose gradient entered the last step projected (optim/projected_backward.py).
COUNTERS = ("proj_updates", "svd_failures", "projected_grads")


class UpdateStrategy(ABC):
    optimizer: Any  # a torch.optim.Optimizer, or InBackwardOptimizer (fused)

    def __init__(self, optimizers: list[Any]):
        self._optimizers = optimizers  # the objects that may carry COUNTERS
        self._peak_lrs = [group["lr"] for group in self.param_groups]

    @property
    @abstractmethod
    def param_groups(self) -> list[dict]: ...

    def set_lr_factor(self, factor: float) -> None:
        for group, peak in zip(self.param_groups, self._peak_lrs, strict=True):
            group["lr"] = peak * factor

    def before_backward(self, last_micro_batch: bool) -> None:  # noqa: B027  (an optional hook, not abstract)
        """Called before each micro-batch's backward; the ordinary strategy needs nothing here."""

    def backward(self, loss: torch.Tensor) -> None:
        """One micro-batch's backward; an engine that owns it (DeepSpeed) overrides this."""
        loss.backward()

    @abstractmethod
    def finish_backward(self) -> torch.Tensor:
        """After the last backward: the global gradient norm before clipping (0-d tensor)."""

    @abstractmethod
    def commit(self) -> None:
        """Apply whatever part of the update has not happened yet; gradients are freed."""

    @abstractmethod
    def state_dict(self) -> dict: ...

    @abstractmethod
    def load_state_dict(self, state: dict) -> None:
        """Restore the optimizer state; ValueError if `state` has another layout."""

    def state_of(self, p: torch.Tensor) -> dict[str, Any]:
        """The optimizer state of parameter `p`, the live dict (edits change the optimizer; empty
        before p's first update): for schedules that reset part of it (trainer/relora.py)."""
        for opt in self._optimizers:
            if p in opt.state:
                return opt.state[p]
        return {}

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The torch optimizers that hold the state (one, or one per parameter when fused), each group
        with its parameters' names: what a sharded checkpoint saves per parameter name."""
        return list(self._optimizers)

    def counters(self) -> dict[str, float]:
        out = {
            f"optim/{name}": float(sum(getattr(opt, name, 0) for opt in self._optimizers))
            for name in COUNTERS
            if any(hasattr(opt, name) for opt in self._optimizers)
        }
        # AdaLomo's floored fraction (last step, not cumulative): sum numerators and denominators
        # so the fused path's one optimizer per parameter gives the same fraction; one host sync.
        stats = [opt.floored_stats() for opt in self._optimizers if hasattr(opt, "floored_stats")]
        if stats := [(c, n) for c, n in stats if n]:  # optimizers with factored matrices only
            out["optim/floored_frac"] = float(torch.stack([c for c, _ in stats]).sum()) / sum(n for _, n in stats)
        return out


class StepAfterBackward(UpdateStrategy):
    """clip -> step -> zero_grad, after the whole backward (see the module docstring)."""

    def __init__(
        self,
        spec: OptimizerSpec,
        params: Sequence[torch.Tensor],
        max_grad_norm: float,
        average_over_ranks: Callable[[list[torch.Tensor]], None] | None = None,
        averaged: Sequence[torch.Tensor] = (),
    ):
        self.optimizer = spec.build()
        self.max_grad_norm = max_grad_norm
        self._params = params  # in the model's order: the norm's summation order is part of the numerics
        # Under DDP, the parameters DDP leaves alone (the projected-backward weights) have their gradient, a carrier's
        # R or their own G, averaged over the ranks here, by `average_over_ranks` (in place, one collective).
        self.average_over_ranks = average_over_ranks
        self._averaged = {id(p) for p in averaged}
        super().__init__([self.optimizer])

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def finish_backward(self) -> torch.Tensor:
        # A weight whose gradient was projected in backward holds it in a carrier: its R enters the
        # norm and is clipped in the weight's place (the rule: optim/projected_backward.py).
        holders = gradient_holders(self.optimizer, self._params)
        if self.average_over_ranks is not None:  # the same parameters have gradients on every rank, in this order
            self.average_over_ranks(
                [
                    h.grad
                    for h, p in zip(holders, self._params, strict=True)
                    if id(p) in self._averaged and h.grad is not None
                ]
            )
        grads = [h.grad for h in holders if h.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if isinstance(norm, DTensor):  # FSDP2's sharded gradients: the norm of the full gradient, on every rank
            norm = norm.full_tensor()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(holders, self.max_grad_norm, norm)
        return norm

    def commit(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "in_backward" in state:
            raise ValueError(
                "it was saved with train.fused_update=true (one optimizer state per parameter); resume with "
                "--train.fused_update=true"
            )
        self.optimizer.load_state_dict(with_built_options(self.optimizer, local_optimizer_state(self.optimizer, state)))


class UpdateInBackward(UpdateStrategy):
    """arm -> backward (updates happen in the hooks) -> finish (see the module docstring)."""

    def __init__(self, spec: OptimizerSpec):
        self.optimizer = InBackwardOptimizer(spec)
        super().__init__(list(self.optimizer.optimizers.values()))

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def before_backward(self, last_micro_batch: bool) -> None:
        self.optimizer.arm(last_micro_batch)

    def finish_backward(self) -> torch.Tensor:
        self.optimizer.step()  # the updates deferred to the end of backward (AdaLomo layerwise / global)
        # DDP writes its reduced buckets back into .grad after the comm hook has used them
        # (trainer/ddp_fused.py): drop them, or the next step would accumulate onto them.
        self.optimizer.zero_grad(set_to_none=True)
        return self.optimizer.grad_norm()  # on the device: inf / nan when a gradient was not finite

    def commit(self) -> None:
        pass  # every parameter was updated, and its gradient freed, inside backward

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if "in_backward" not in state:
            raise ValueError(
                "it was saved with train.fused_update=false (one optimizer over all parameters); resume with "
                "--train.fused_update=false"
            )
        saved = state["in_backward"]
        local = {
            n: with_built_options(opt, local_optimizer_state(opt, saved[n]))
            for n, opt in self.optimizer.optimizers.items()
            if n in saved
        }
        self.optimizer.load_state_dict({"in_backward": {**saved, **local}})


def with_built_options(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """`state` (an optimizer state dict) with its param groups' options replaced by those `optimizer` was built with.
    torch's load_state_dict takes the saved groups' options, and some follow the machine, not the config: the
    default `optim.fused` (null) is AdamW's fused kernel on CUDA only, so a run started on the CPU and resumed on a
    GPU would keep the CPU's implementation. The resume policy (trainer/resume_policy.py) holds the config's other
    options equal to the checkpoint's. Applied before loading, so that torch places the state as these options
    need (fused AdamW's step counters on the parameters' device). Group counts that differ are left to torch's
    own error."""
    saved = state["param_groups"]
    if len(saved) != len(optimizer.param_groups):
        return state
    groups = [
        {**old, **{k: v for k, v in built.items() if k != "params"}}
        for old, built in zip(saved, optimizer.param_groups, strict=True)
    ]
    return {**state, "param_groups": groups}


def build_update_strategy(
    spec: OptimizerSpec,
    params: Sequence[torch.Tensor],
    *,
    fused: bool,
    max_grad_norm: float,
    average_over_ranks: Callable[[list[torch.Tensor]], None] | None = None,
    averaged: Sequence[torch.Tensor] = (),
) -> UpdateStrategy:
    """`params`: the trainable parameters in the model's order (those of `spec`). `average_over_ranks` and
    `averaged`: see StepAfterBackward (the fused update on several ranks is refused with the projected backward)."""
    if fused:
        return UpdateInBackward(spec)
    return StepAfterBackward(spec, params, max_grad_norm, average_over_ranks, averaged)
