"""Sharded checkpoints of multi-rank runs through torch.distributed.checkpoint (DCP): every rank writes
its part, and a checkpoint saved on W ranks loads on W' ranks, or in one process.

A checkpoint is a directory `step_XXXXXXXX/` (a single-process run writes `step_XXXXXXXX.pt`,
trainer/checkpoint.py; either resumes the other):
- the tensors, flat and keyed by name (so any layout can reload them): `model.<fqn>` (FSDP2's
  DTensors: each rank writes its rows; DDP's replicated tensors are written once) and
  `optim.<fqn>.<key>`, every tensor of each parameter's optimizer state, named by parameter, so the
  ordinary and the fused (one optimizer per parameter) layouts hold the same keys. Under FSDP2 a
  state tensor that follows its parameter's rows (optim.sharding.state_shard_dim) is written as a
  DTensor sharded like them; the others are whole on every rank and written once;
- `extras.pt` (rank 0, torch.save, weights_only-loadable): the config, progress, data position, RNG
  and the optimizer state's non-tensor entries (step counters).

Atomic commit: every rank writes into `step_XXXXXXXX.<pid>.<hex>.tmp/` (rank 0 picks the name and
broadcasts it), a barrier waits for all of them, then rank 0 writes extras.pt, fsyncs and renames the
directory to its final name (atomic on POSIX); a kill at any point leaves only a temporary directory,
which the next start removes (trainer/run_lock.remove_stale_temp_files). Loading reads the
checkpoint's metadata (every key's full size and dtype) and builds the template for the current
world: a sharded key becomes this rank's empty chunk wrapped as a DTensor, anything else a full
tensor; DCP fills them in place (without a process group in one process).
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.tensor import DTensor, Shard

from data.files import unique_temp_path
from optim.sharding import ShardedState, Sharding, local, sharding_of
from trainer.distributed import DistInfo, barrier

EXTRAS = "extras.pt"


def param_states(optimizers: list[torch.optim.Optimizer]) -> Iterator[tuple[str, torch.Tensor, Any, dict]]:
    """(name, parameter, its optimizer, its group) for every parameter of `optimizers`, in order."""
    for opt in optimizers:
        for group in opt.param_groups:
            for name, p in zip(group["names"], group["params"], strict=True):
                yield name, p, opt, group


def _shard_dim(opt: Any, p: torch.Tensor, group: dict, key: str, shape: tuple[int, ...]) -> int | None:
    """The dim of a state tensor split like p's rows, on FSDP2 (None: whole, or not sharded)."""
    if not isinstance(p, DTensor) or not shape:
        return None
    if isinstance(opt, ShardedState):
        return opt.state_shard_dim(p, group, key, shape)
    return 0 if shape == tuple(p.shape) else None  # torch's optimizers keep such state as DTensors


def _as_saved(value: torch.Tensor, p: torch.Tensor, dim: int | None) -> torch.Tensor:
    """A local state tensor of an FSDP2 parameter as the DTensor it is a shard of (split along `dim`)."""
    if dim is None or isinstance(value, DTensor):
        return value
    assert isinstance(p, DTensor)  # _shard_dim names a dim only for FSDP2's parameters
    shape = list(value.shape)
    shape[dim] = sharding_of(p).full_size
    full = torch.Size(shape)
    stride = torch.empty(full, device="meta").stride()
    return DTensor.from_local(value, p.device_mesh, [Shard(dim)], run_check=False, shape=full, stride=stride)


def temp_directory(final: Path, info: DistInfo) -> Path:
    """A unique temporary directory name next to `final`, the same on every rank (rank 0 picks it)."""
    names = [str(unique_temp_path(final)) if info.is_main else ""]
    if info.enabled:
        dist.broadcast_object_list(names, src=0)
    return Path(names[0])


@contextlib.contextmanager
def committed_directory(tmp: Path, final: Path, extras: dict[str, Any], info: DistInfo) -> Iterator[None]:
    """Every rank writes its part into `tmp` inside the block; then (after a barrier) rank 0 writes
    `extras` as extras.pt, fsyncs and renames `tmp` to `final`: the atomic commit of the module docstring.
    On any error the temporary directory is removed."""
    try:
        yield
        barrier(info)
        if info.is_main:
            with open(tmp / EXTRAS, "wb") as f:
                torch.save(extras, f)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():  # the same step saved again (e.g. a stop request right after a save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        if info.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier(info)


def save_sharded(
    directory: Path,
    step: int,
    model: nn.Module,
    optimizers: list[torch.optim.Optimizer],
    extras: dict[str, Any],
    info: DistInfo,
) -> Path:
    """Write `step`'s checkpoint (every rank calls it); returns its final path."""
    final = directory / f"step_{step:08d}"
    tmp = temp_directory(final, info)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in model.state_dict().items()}
    scalars: dict[str, Any] = {}
    for name, p, opt, group in param_states(optimizers):
        for key, value in opt.state.get(p, {}).items():
            if torch.is_tensor(value):
                dim = _shard_dim(opt, p, group, key, tuple(value.shape))
                tensors[f"optim.{name}.{key}"] = _as_saved(value, p, dim)
            else:
                scalars[f"{name}.{key}"] = value
    with committed_directory(tmp, final, {**extras, "optim_scalars": scalars}, info):
        dcp.save(tensors, checkpoint_id=tmp)
    return final


def read_extras(path: Path) -> dict[str, Any]:
    return torch.load(path / EXTRAS, map_location="cpu", weights_only=True)


def read_full_tensors(path: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of checkpoint directory `path` whose key starts with `prefix`, whole, in this
    process (no process group): for tools and tests that read a multi-rank checkpoint as one file."""
    template = {
        k: torch.empty(tuple(v.size), dtype=v.properties.dtype)
        for k, v in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata) and k.startswith(prefix)
    }
    dcp.load(template, checkpoint_id=str(path), no_dist=True)
    return template


def load_sharded(path: Path, model: nn.Module, optimizers: list[torch.optim.Optimizer], device: torch.device) -> None:
    """Load `path`'s tensors into `model` and the optimizers' state, for the current world (see the
    module docstring). ValueError naming the keys when the checkpoint holds another model or optimizer."""
    sizes = {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in FileSystemReader(str(path)).read_metadata().state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }
    model_sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    template: dict[str, torch.Tensor] = dict(model_sd)
    slots: list[tuple[Any, torch.Tensor, str, str]] = []  # (optimizer, parameter, state key, template key)
    by_name = {name: (p, opt, group) for name, p, opt, group in param_states(optimizers)}
    for key, (shape, dtype) in sizes.items():
        if not key.startswith("optim."):
            continue
        pname, _, skey = key[len("optim.") :].rpartition(".")
        if pname not in by_name:
            raise ValueError(f"it holds optimizer state for {pname!r}, which this model/optimizer does not have")
        p, opt, group = by_name[pname]
        dim = _shard_dim(opt, p, group, skey, shape)
        if dim is None:
            template[key] = torch.empty(shape, dtype=dtype, device=device)
        else:
            sh = sharding_of(p)
            part = Sharding(dim, sh.group, sh.full_size).local_rows(torch.empty(shape, dtype=dtype, device="meta"), dim)
            mine = torch.empty(part.shape, dtype=dtype, device=device)
            template[key] = _as_saved(mine, p, dim)
        slots.append((opt, p, skey, key))
    missing = [k for k in model_sd if k not in sizes]
    if missing:
        raise ValueError(f"it lacks model tensors {missing[:3]}: another model shape")
    dcp.load(template, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    for opt, p, skey, key in slots:
        value = template[key]
        # This package's optimizers keep local tensors (their math reduces explicitly: optim/sharding.py);
        # torch's keep DTensors like their parameters.
        opt.state[p][skey] = local(value) if isinstance(opt, ShardedState) else value
    scalars = read_extras(path).get("optim_scalars", {})
    for name, p, opt, _ in param_states(optimizers):
        for k, v in scalars.items():
            if k.rpartition(".")[0] == name:
                opt.state[p][k.rpartition(".")[2]] = v
