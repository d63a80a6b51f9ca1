"""Fused in-backward updates: each parameter is updated from its post-accumulate-grad hook and its
gradient freed at once, so the full set of gradients never sits in memory (LOMO / AdaLomo style).

Built from the same OptimizerSpec as the ordinary path, as one optimizer per parameter, so the
per-parameter math is identical and the parameters match the ordinary `step()` path bit for bit
on CPU (tests/optim/test_in_backward.py checks every registered optimizer). Works for any optimizer
whose update of a tensor depends only on that tensor (AdamW, Adafactor, GaLore, AdaMeM,
AdaLomo grouped/none); its state lives in each per-parameter optimizer's `state`.

Protocol of a training step (what the trainer does):
1. set the step's learning rate on `param_groups` (the scheduler steps once per optimizer step);
2. `arm(False)` for every micro-batch but the last: the hooks let gradients accumulate as usual;
3. `arm(True)` before the last micro-batch's backward: each parameter is updated once, as soon as
   its accumulated gradient is complete, and its gradient is freed;
4. `step()` after that backward: finishes any deferred group (see below); check `nonfinite`.
The memory saving is full only without gradient accumulation: with k > 1 micro-batches every
gradient is kept from the first micro-batch to the last, as in the ordinary path; only the
last backward frees them one by one (and the optimizer step needs no second full pass).

Cross-tensor update statistics (AdaLomo `update_norm` = layerwise / global): the optimizer
exposes `norm_group_key(p)` (None = independent) and a two-phase API (`prepare`,
`shared_divisor`, `apply`). A tensor whose gradient arrives is folded into its state at once,
its gradient freed, and its fp32 direction U kept until the last tensor of its group arrives;
then the group's divisor is computed (sums taken in the optimizer's parameter order, as the
ordinary path does) and the group's updates applied. Memory: layerwise holds at most the U of
one transformer block (about 12 d^2 fp32 values) plus the gradient being processed; global
holds every U until the end of backward, i.e. one fp32 copy of all gradients: no saving over
the ordinary path (it is supported for the ablation, not for memory). No extra compute.
`peak_deferred_bytes` reports the largest deferred total seen.

Refused (see `check_fused_supported`), never silently wrong:
- gradient-norm clipping: the global norm is known only after every update has happened. A
  correct version needs a first backward that only measures the norm and a second that
  updates (2x backward compute, or keeping the graph); not built. AdaLomo's update
  normalisation replaces clipping (the paper trains without it).

Several ranks: under DDP a parameter's hook would fire before the gradient is all-reduced, so the
trainer sets `updates_from_reduced_grads` and a DDP comm hook calls `update_from_reduced` after each
bucket's all-reduce (trainer/ddp_fused.py; exact, but DDP's buckets keep a full gradient: no memory
saving). Under FSDP2 the hooks fire on the sharded parameters after the reduce-scatter, so the
updates are exact (the optimizers reduce their statistics over the shards: optim/sharding.py) and
the saving is kept. Under DeepSpeed ZeRO-3 (AdaLomo, the LOMO way) the hooks see each rank's own full
gradient on the gathered parameter: the engine sets `reduce_grad` (all-reduce to the mean first) and
`after_update` (keep this rank's slice of the updated parameter): trainer/deepspeed_engine.py.

Projected backward (GaLore with `projected_backward`, optim/projected_backward.py): a weight whose
gradient arrives projected in its carrier (optim/projected_grads.py) is updated from the carrier's
post-accumulate-grad hook instead of its own (same code path, same freeing); this class answers the
projected backward's questions (`projection_for`, `grad_carrier`) through the weight's optimizer.

Non-finite gradients, without a host sync: each gradient's squared sum stays a device tensor
(`grad_sq`, per parameter, of the armed backward) and the update is applied whatever it holds; the
trainer reads the step's norm (`grad_norm()`: inf or nan when any gradient was non-finite) with its
other metrics at its next check and stops there, without saving, naming the step
(`nonfinite_names()` lists the last armed backward's offending parameters, one sync, for diagnosis).
A non-finite gradient turns its parameter (and, for a coupled group, the group) into NaN: the last
checkpoint, saved before this step after a check that passed, is the consistent state to resume from.
A per-parameter decision on the host would stall the GPU once per parameter; a decision on the device
cannot undo an update.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import torch
from torch.utils.hooks import RemovableHandle

from optim.param_groups import group_options
from optim.projected_grads import ProjectedGradSource
from optim.registry import OptimizerSpec
from optim.sharding import local, sharding_of


def check_fused_supported(*, grad_clip: float | None) -> None:
    """Raise a clear error for combinations the fused path does not implement."""
    if grad_clip is not None and grad_clip > 0:
        raise ValueError(
            f"train.fused_update=true cannot clip the gradient norm (clip={grad_clip}): the global norm is "
            "known only after every parameter was already updated in the backward pass. Disable gradient "
            "clipping with --train.max_grad_norm=0 (AdaLomo's update normalisation replaces it) or set "
            "--train.fused_update=false."
        )


@runtime_checkable
class TwoPhaseUpdates(Protocol):
    """The API of an optimizer whose update of a tensor may need other tensors' statistics
    (optim.adalomo.AdaLomo): see "Cross-tensor update statistics" above."""

    def norm_group_key(self, p: torch.Tensor) -> str | None: ...

    def prepare(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def shared_divisor(self, sq_sums: list[torch.Tensor], numels: list[int], clip_threshold: float) -> torch.Tensor: ...

    def apply(self, p: torch.Tensor, u: torch.Tensor, divisor: torch.Tensor | None) -> None: ...


class InBackwardOptimizer:
    def __init__(self, spec: OptimizerSpec):
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._params: dict[str, torch.Tensor] = {}
        self._handles: list[RemovableHandle] = []
        self.armed = False
        self.updates_from_reduced_grads = False  # True under DDP: a comm hook calls update_from_reduced
        # Set by an engine whose hooks see each rank's own full gradient and whose parameters live elsewhere
        # between updates (DeepSpeed ZeRO-3, trainer/deepspeed_engine.py): reduce the gradient in place
        # before the update; save the updated parameter after it.
        self.reduce_grad: Callable[[torch.Tensor], None] | None = None
        self.after_update: Callable[[torch.Tensor], None] | None = None
        # name -> its gradient's squared sum in the armed backward (0-d, on the device: never read in a hook).
        self.grad_sq: dict[str, torch.Tensor] = {}
        # Coupled update statistics: key -> member names in spec order; name -> key.
        self._members: dict[str, list[str]] = {}
        self._key_of: dict[str, str] = {}
        self._two_phase: dict[str, TwoPhaseUpdates] = {}  # name -> its optimizer, for coupled members
        # key -> member name -> (U, sum U^2) from `prepare`.
        self._pending: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.deferred_bytes = 0
        self.peak_deferred_bytes = 0
        # Under DDP the updates run in comm-hook callbacks, which a process group may complete on several
        # threads at once (gloo's workers): the coupled groups' bookkeeping above is read-modify-write.
        self._lock = threading.Lock()
        for group in spec.param_groups:
            options = group_options(group)
            for name, p in zip(group["names"], group["params"], strict=True):
                opt = spec.cls([{**options, "params": [p], "names": [name]}], **spec.kwargs)
                self.optimizers[name] = opt
                self._params[name] = p
                key = opt.norm_group_key(p) if isinstance(opt, TwoPhaseUpdates) else None
                if isinstance(opt, TwoPhaseUpdates) and key is not None:
                    self._key_of[name] = key
                    self._members.setdefault(key, []).append(name)
                    self._two_phase[name] = opt
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))
                if isinstance(opt, ProjectedGradSource) and opt.projected_backward_params():
                    carrier = opt.grad_carrier(p)  # receives p's projected gradient between refreshes
                    self._handles.append(carrier.register_post_accumulate_grad_hook(self._make_hook(name)))
        self._names = {p: name for name, p in self._params.items()}

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        # `holder`: the parameter, or its projected-gradient carrier (whichever received the gradient).
        def hook(holder: torch.Tensor) -> None:
            if self.armed and not self.updates_from_reduced_grads:
                self._update(name, holder)

        return hook

    def update_from_reduced(self, p: torch.Tensor, grad: torch.Tensor) -> None:
        """Update `p` from `grad`, its gradient already reduced over ranks: the entry point of a DDP comm
        hook (trainer/ddp_fused.py), used instead of the post-accumulate-grad hooks, which under DDP fire
        before the all-reduce (`updates_from_reduced_grads` = True switches them off). Same math, same
        non-finite handling; `p.grad` is left None."""
        if not self.armed:
            return
        p.grad = grad
        self._update(self._names[p], p)

    def _update(self, name: str, holder: torch.Tensor) -> None:
        """One parameter's update from `holder.grad` (the parameter, or its projected-gradient carrier)."""
        p = self._params[name]
        grad = holder.grad
        assert grad is not None  # post-accumulate-grad hooks run once the gradient exists
        if self.reduce_grad is not None:
            self.reduce_grad(grad)
        if not grad.is_meta:  # shape-only runs (trainer/memory_accounting.py) have no values to sum
            # Under FSDP2 the squared sum of the full gradient (one scalar all-reduce, not a host sync).
            self.grad_sq[name] = sharding_of(p).sum_all(
                torch.linalg.vector_norm(local(grad), dtype=torch.float32).square()
            )
        key = self._key_of.get(name)
        full_group = None  # the coupled group this parameter completed: flushed once its gradient is freed
        if key is None:
            self.optimizers[name].step()
            if self.after_update is not None:
                self.after_update(p)
        else:
            u, usq = self._two_phase[name].prepare(p)
            with self._lock:
                pending = self._pending.setdefault(key, {})
                pending[name] = (u, usq)
                self.deferred_bytes += u.nbytes
                self.peak_deferred_bytes = max(self.peak_deferred_bytes, self.deferred_bytes)
                if len(pending) == len(self._members[key]):
                    full_group = key
        holder.grad = None  # freed (the optimizer's step already took a carrier's)
        if full_group is not None:
            self._flush(full_group)

    def _flush(self, key: str) -> None:
        with self._lock:  # one caller takes the group: the last member's, or step() for unused members
            pending = self._pending.pop(key, {})
        # The members that got a gradient, in spec order (the ordinary path's summation order).
        ready = {n: pending[n] for n in self._members[key] if n in pending}
        del pending
        if not ready:
            return
        first = next(iter(ready))
        div = self._two_phase[first].shared_divisor(
            [usq for _, usq in ready.values()],
            [self._params[n].numel() for n in ready],  # the full size (a sharded DTensor's numel is the full one)
            self.optimizers[first].param_groups[0]["clip_threshold"],
        )
        for n, (u, _) in ready.items():
            self._two_phase[n].apply(self._params[n], u, div)
            if self.after_update is not None:
                self.after_update(self._params[n])
            with self._lock:
                self.deferred_bytes -= u.nbytes
        del ready

    def grad_norm(self) -> torch.Tensor:
        """The norm of the armed backward's gradients (0-d, on the device; inf or nan if any was non-finite)."""
        if not self.grad_sq:
            return torch.zeros(())
        return torch.stack(list(self.grad_sq.values())).sum().sqrt()

    def nonfinite_names(self) -> list[str]:
        """The parameters whose gradient was non-finite in the last armed backward (one host sync: for diagnosis)."""
        if not self.grad_sq:
            return []
        finite = torch.isfinite(torch.stack(list(self.grad_sq.values()))).tolist()
        return [name for name, ok in zip(self.grad_sq, finite, strict=True) if not ok]

    def arm(self, armed: bool) -> None:
        """Arm before the backward of the last micro-batch of a step."""
        self.armed = armed
        if armed:
            if self._pending:
                raise RuntimeError(
                    f"deferred updates of {sorted(self._pending)[:3]} are still pending from the previous armed "
                    "backward (some members got no gradient): call InBackwardOptimizer.step() after each armed backward"
                )
            self.grad_sq = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        """Every independent update happened during backward. Finishes the deferred groups whose
        members did not all receive a gradient (unused parameters), as the ordinary step() would
        (it skips parameters without a gradient). Call it once after the armed backward."""
        for key in list(self._pending):
            self._flush(key)

    def projected_backward_params(self) -> list[torch.Tensor]:
        sources = [opt for opt in self.optimizers.values() if isinstance(opt, ProjectedGradSource)]
        return [p for opt in sources for p in opt.projected_backward_params()]

    def projection_for(self, p: torch.Tensor) -> dict[str, torch.Tensor] | None:
        opt = self.optimizers[self._names[p]]
        return opt.projection_for(p) if isinstance(opt, ProjectedGradSource) else None

    def grad_carrier(self, p: torch.Tensor) -> torch.Tensor:
        opt = self.optimizers[self._names[p]]
        if not isinstance(opt, ProjectedGradSource):
            raise ValueError(f"{self._names[p]}: its optimizer has no projected backward")
        return opt.grad_carrier(p)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"in_backward": {name: opt.state_dict() for name, opt in self.optimizers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
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
