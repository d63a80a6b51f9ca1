"""Applies training-time wrappers to the model, in order: torch.compile per block, then the engine's
wrapper (DDP, or FSDP2's fully_shard per block and root). The model file holds none of this
(torchtitan's split)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel

from model import Transformer
from trainer.config import TrainConfig
from trainer.distributed import DistInfo


def parallelize(
    model: Transformer, train: TrainConfig, info: DistInfo, *, ddp_ignored: Sequence[str] = ()
) -> nn.Module:
    """compile (train.compile) then the engine's wrapper; returns the module the loop calls. Under
    fsdp2 the parameters of `model` itself become sharded DTensors (build the optimizer after this).
    One process, or deepspeed (deepspeed.initialize wraps the model later: trainer/deepspeed_engine.py): no
    wrapper here. `ddp_ignored`: parameters (by name) whose gradients DDP must leave to the caller: the
    projected-backward weights, absent from the graph between projector refreshes (optim/projected_backward.py)."""
    if train.compile:
        compile_blocks(model)
    if not info.enabled or train.engine == "deepspeed":
        return model
    if train.engine == "fsdp2":
        return apply_fsdp2(model, info, resolve_precision(train.precision, info.device))
    return wrap_ddp(model, info, ignored=ddp_ignored)


def apply_fsdp2(model: Transformer, info: DistInfo, precision: str) -> nn.Module:
    """fully_shard each block, then the root; bf16 parameters for compute and fp32 gradient reduction
    under precision bf16 (MixedPrecisionPolicy)."""
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    mp = MixedPrecisionPolicy()  # fp32 compute and reduction
    if precision == "bf16":
        # bf16 copies of the parameters for compute, gradients reduced in fp32 into the fp32 shards.
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)  # the root: embedding, final norm, output layer
    return model


@contextlib.contextmanager
def grad_sync(model: nn.Module, last_micro_batch: bool) -> Iterator[None]:
    """Gradient accumulation over micro-batches: reduce gradients over ranks only on the last one.
    DDP: `no_sync()` on the others; FSDP2: `set_requires_gradient_sync(False)` (no reduce-scatter,
    unsharded gradients accumulate); one process: nothing to do."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(last_micro_batch)
        yield
    elif isinstance(model, DistributedDataParallel) and not last_micro_batch:
        with model.no_sync():
            yield
    else:
        yield


def compile_blocks(model: Transformer) -> None:
    """Compile each transformer block separately: short compile times, and the compiled graph is
    reused by every block of the same shape."""
    for block in model.blocks:
        block.compile()


def wrap_ddp(model: nn.Module, info: DistInfo, *, ignored: Sequence[str] = ()) -> nn.Module:
    """DDP over `model`, with the parameters named in `ignored` neither broadcast nor reduced by it (they start
    equal on every rank all the same: every rank builds the model from run.seed, or loads the same checkpoint)."""
    if not info.enabled:
        return model
    if ignored:
        # torch's only way to keep parameters out of DDP (a static method kept since 1.8 for this use: pytorch
        # issue 43690). find_unused_parameters would do, but at a host stall per step (optim/projected_backward.py).
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(ignored))
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision as it applies on `device`: auto = bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_context(precision: str, device: torch.device):
    """bf16 autocast (fp32 master weights stay in the model) or a no-op for fp32."""
    if resolve_precision(precision, device) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return torch.autocast(device_type=device.type, enabled=False)
