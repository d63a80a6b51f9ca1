"""Fused in-backward updates under DDP: a comm hook that all-reduces each gradient bucket, then updates
the bucket's parameters from the reduced gradients (optim.in_backward.InBackwardOptimizer).

Why a comm hook: a parameter's post-accumulate-grad hook fires before DDP's all-reduce (each rank
would update from its own gradient: measured drift 5e-2 after a few steps), while a comm hook sees the
bucket when its gradients are complete and decides when the all-reduce is done. The all-reduce is
DDP's default one (divide by the world size, then sum: torch's `default_hooks.allreduce_hook`), so
the reduced gradients, and the updates, are bit for bit those of the ordinary DDP path
(tests/trainer/test_engines.py). DDP still keeps its full-size buckets, so unlike one process or
FSDP2 there is no gradient-memory saving: the point here is the same optimizer semantics on every
engine (AdaLomo is defined as an in-backward update), not memory.

The callback runs when the bucket's all-reduce completes, possibly on the communication thread while
autograd computes earlier layers' gradients: a parameter's update touches only that parameter and its
own optimizer state (AdaLomo's deferred group statistics, shared by a group's members, are kept under
InBackwardOptimizer's lock), and DDP waits for every bucket's future before backward returns.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations at run time
# (`bucket` must be dist.GradBucket itself, not its name).
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from optim.in_backward import InBackwardOptimizer


class FusedCommHookState:
    def __init__(self, optimizer: InBackwardOptimizer, group: dist.ProcessGroup | None = None):
        self.optimizer = optimizer
        self.group = group


def allreduce_then_update(state: FusedCommHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: the default all-reduce of the bucket, then one update per parameter in it."""
    buffer = bucket.buffer()
    buffer.div_(dist.get_world_size(state.group))
    work = dist.all_reduce(buffer, group=state.group, async_op=True)
    assert work is not None  # async_op=True

    def update(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        for p, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            state.optimizer.update_from_reduced(p, grad)  # `grad` is a view into the reduced buffer
        return reduced

    return work.get_future().then(update)


def install_fused_comm_hook(model: DistributedDataParallel, optimizer: InBackwardOptimizer) -> None:
    """Route `optimizer`'s updates through `model`'s buckets (call once, before the first backward)."""
    optimizer.updates_from_reduced_grads = True
    model.register_comm_hook(FusedCommHookState(optimizer), allreduce_then_update)
