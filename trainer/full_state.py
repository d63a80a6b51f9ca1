"""Full (unsharded) model and optimizer state under FSDP2, so one checkpoint file resumes on any number
of ranks (and on one process, which holds everything anyway).

Saving: every rank joins the gathers (collectives), rank 0 receives the full tensors and writes the
usual single-file checkpoint (trainer/checkpoint.py). Loading: every rank reads the file and keeps its
own rows of each sharded tensor (torch.chunk's split, optim/sharding.py), so a run saved on W ranks
resumes on W' ranks. Which optimizer state follows the parameter's rows: a DTensor state (torch's
AdamW keeps its moments as DTensors like the parameter) is gathered as such; a plain state tensor of
this package's optimizers is gathered along `optim.sharding.state_shard_dim` (None: whole on every
rank, nothing to gather).

Cost: the full state passes through rank 0's CPU memory once per save: fine up to a few billion
parameters; a sharded save where every rank writes its part (torch.distributed.checkpoint) is the
next step for larger models.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from optim.sharding import ShardedState, Sharding, sharding_of, state_shard_dim

_OWNER = 0  # the rank that receives full tensors and writes the checkpoint


def is_sharded(model: nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


class ModelState:
    """The model as a checkpoint component: full tensors on rank 0 (an empty dict elsewhere) when
    sharded; the module's own state dict otherwise."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        if not is_sharded(self.model):
            return self.model.state_dict()
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

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


def full_optimizer_state(opt: torch.optim.Optimizer) -> dict[str, Any]:
    """`opt.state_dict()` with every sharded state tensor gathered to rank 0 (a collective: every rank
    calls it; rank 0's result is the one to save)."""
    sd = opt.state_dict()
    sd["state"] = {idx: dict(s) for idx, s in sd["state"].items()}  # torch's packing shares the live dicts
    for idx, (p, group) in _params_by_index(opt).items():
        if idx not in sd["state"] or not isinstance(p, DTensor):
            continue
        sh = sharding_of(p)
        for key, value in list(sd["state"][idx].items()):
            if isinstance(value, DTensor):
                sd["state"][idx][key] = value.full_tensor().cpu()
            elif torch.is_tensor(value) and isinstance(opt, ShardedState):
                dim = state_shard_dim(opt, p, group, key, tuple(value.shape))
                if dim is not None:
                    full = Sharding(dim, sh.group, sh.full_size).gather_to(value, _OWNER)
                    sd["state"][idx][key] = full.cpu() if full is not None else value
    return sd


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
