"""Loading a single-file checkpoint (one process's `step_XXXXXXXX.pt`, full tensors) into a run sharded
by FSDP2 on any number of ranks: every rank reads the file and keeps its own rows of each sharded
tensor (torch.chunk's split, optim/sharding.py). Which optimizer state follows the parameter's rows: a
state tensor of this package's optimizers along `optim.sharding.state_shard_dim` (None: whole on every
rank); torch's AdamW keeps its moments as DTensors shaped like the parameter.

(Multi-rank runs save sharded directories instead: trainer/dist_checkpoint.py. One process holds
everything whole, and these classes then pass the state through unchanged.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.tensor import DTensor

from optim.sharding import ShardedState, Sharding, sharding_of, state_shard_dim


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class ModelState:
    """The model as a checkpoint component: the module's own state dict; loading full tensors into a
    sharded model keeps each rank's rows."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not is_sharded(self.model):
            self.model.load_state_dict(state)
            return
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True))


def _params_by_index(opt: torch.optim.Optimizer) -> dict[int, tuple[torch.Tensor, dict]]:
    """torch's state_dict numbering: parameters in group order, from 0."""
    out, i = {}, 0
    for group in opt.param_groups:
        for p in group["params"]:
            out[i] = (p, group)
            i += 1
    return out


def local_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
    """The inverse: a full state dict (from any number of ranks) cut to this rank's rows, ready for
    `opt.load_state_dict`."""
    out = {**sd, "state": {idx: dict(s) for idx, s in sd["state"].items()}}
    for idx, (p, group) in _params_by_index(opt).items():
        if idx not in out["state"] or not isinstance(p, DTensor):
            continue
        sh = sharding_of(p)
        for key, value in list(out["state"][idx].items()):
            if not torch.is_tensor(value) or value.dim() == 0:
                continue
            if isinstance(opt, ShardedState):
                dim = state_shard_dim(opt, p, group, key, tuple(value.shape))
                if dim is not None:
                    rows = Sharding(dim, sh.group, sh.full_size).local_rows(value, dim)
                    out["state"][idx][key] = rows.contiguous()
            elif tuple(value.shape) == tuple(p.shape):  # torch's optimizers: a DTensor state like p
                rows = sh.local_rows(value.to(p.device), sh.dim or 0).contiguous()
                out["state"][idx][key] = DTensor.from_local(
                    rows, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                )
    return out
