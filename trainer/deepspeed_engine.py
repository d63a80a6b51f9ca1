"""train.engine=deepspeed on several ranks: the two ways an optimizer runs under DeepSpeed ZeRO, and
their checkpoints (one process runs unwrapped, like every engine).

AdamW (`StepInDeepSpeed`): DeepSpeed's engine wraps the model with torch's AdamW as its client
optimizer (the same optimizer and parameter groups as under ddp/fsdp2), at train.zero_stage 1/2/3,
optionally offloaded to the CPU. Per micro-batch `engine.backward(loss, scale_wrt_gas=False)` (the
trainer's loss is already the global-batch mean; accumulation is the trainer's, DeepSpeed's
`managed_gradient_accumulation` is off), then one `engine.step()`: ZeRO reduces the gradients, takes
their global norm, clips to gradient_clipping and steps its flat fp32 partitions. The norm is known only
inside that step, so, as with fused updates, the trainer checks it after the update: a non-finite step
stops the run without saving (ZeRO itself skips the step when the norm is not finite).
Checkpoints: DeepSpeed's save_checkpoint/load_checkpoint (each rank writes its partitions) into our
atomic directory commit (trainer/dist_checkpoint.committed_directory); they resume on the same number of
ranks and ZeRO stage (DeepSpeed's partitions are tied to both).

AdaLomo (`install_lomo_zero3`), the LOMO way: DeepSpeed ZeRO-3 partitions the parameters and holds no
optimizer. In backward each parameter is gathered by ZeRO-3 and its full local gradient accumulated;
the in-backward hook (optim/in_backward.py) all-reduces that gradient to the mean over ranks, runs the
same per-parameter AdaLomo step as one process on the gathered parameter (every rank computes the same
update from the same values: exact, and the small factored state is whole on every rank), and copies
this rank's flat slice into the ZeRO partition (`ds_tensor`), which is what survives the release. The
forward runs on the module itself: DeepSpeed's engine forward would route backward through its (absent)
optimizer. Checkpoints: parameters gathered one at a time, rank 0 writes the ordinary single file
(trainer/checkpoint.py), which resumes on any number of ranks and engines.

DeepSpeed is imported on use: its import takes seconds and probes the accelerator, and only deepspeed
runs need it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from optim.in_backward import InBackwardOptimizer
from trainer.dist_checkpoint import committed_directory, temp_directory
from trainer.distributed import DistInfo, mean_over_ranks_
from trainer.update import UpdateInBackward, UpdateStrategy


def initialize_deepspeed(model: nn.Module, config: dict, info: DistInfo, optimizer: Any = None) -> Any:
    """deepspeed.initialize on the process group that the trainer already started; returns the engine."""
    import deepspeed

    if info.device.type == "cpu":
        # DeepSpeed JIT-builds a shared-memory CPU all-reduce op (about 2 minutes, on first use); gloo does the
        # same job for CPU runs, which are tests and small checks.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


class StepInDeepSpeed(UpdateStrategy):
    """backward through the engine; `finish_backward` runs ZeRO's step (see the module docstring)."""

    def __init__(self, engine: Any, client: torch.optim.Optimizer):
        self.engine = engine
        self.optimizer = client  # its param_groups carry the learning rate; its state holds this rank's partitions
        super().__init__([client])

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def finish_backward(self) -> torch.Tensor:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            raise RuntimeError(
                "DeepSpeed computed no gradient norm (zero_optimization.compute_grad_norm=false in "
                "train.deepspeed_config?); remove that key: the trainer logs and checks the norm every step"
            )
        return norm if torch.is_tensor(norm) else torch.tensor(norm)  # ZeRO hands a float or a 0-d tensor

    def commit(self) -> None:
        pass  # engine.step() updated the parameters and cleared the gradients

    def state_dict(self) -> dict:
        raise RuntimeError("DeepSpeed's ZeRO optimizer state is saved by its engine (DeepSpeedCheckpoints)")

    def load_state_dict(self, state: dict) -> None:
        raise RuntimeError("DeepSpeed's ZeRO optimizer state is loaded by its engine (DeepSpeedCheckpoints)")


class DeepSpeedCheckpoints:
    """The model and optimizer of a multi-rank checkpoint directory, through DeepSpeed's own save/load (the
    ShardedBackend of trainer/checkpoint.py)."""

    layout = "deepspeed"

    def __init__(self, engine: Any, info: DistInfo):
        self.engine, self.info = engine, info

    def save(self, directory: Path, step: int, extras: dict[str, Any]) -> Path:
        final = directory / f"step_{step:08d}"
        directory.mkdir(parents=True, exist_ok=True)
        tmp = temp_directory(final, self.info)
        with committed_directory(tmp, final, extras, self.info):
            # save_latest=False: no `latest` file; the trainer finds checkpoints by their committed names.
            self.engine.save_checkpoint(str(directory), tag=tmp.name, save_latest=False)
        return final

    def load(self, path: Path) -> None:
        load_path, _ = self.engine.load_checkpoint(
            str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise ValueError(f"DeepSpeed found no model states in it ({sorted(p.name for p in path.iterdir())[:4]})")


# ----- AdaLomo under ZeRO-3, the LOMO way ---------------------------------------------------------


def install_lomo_zero3(updater: UpdateInBackward, info: DistInfo) -> None:
    """Make the fused AdaLomo updates of `updater` work on ZeRO-3 partitioned parameters (see the
    module docstring): reduce each gradient over ranks first, keep this rank's slice after."""
    opt: InBackwardOptimizer = updater.optimizer

    def reduce_mean(grad: torch.Tensor) -> None:
        mean_over_ranks_(grad, info)

    def keep_own_slice(p: torch.Tensor) -> None:
        write_own_slice(p, info.rank)

    opt.reduce_grad = reduce_mean
    opt.after_update = keep_own_slice


def write_own_slice(p: Any, rank: int) -> None:
    """Copy rank `rank`'s flat slice of the gathered parameter `p` into its ZeRO-3 partition (ZeRO-3 splits
    the flattened tensor into equal parts of ceil(numel / W), the last padded)."""
    _check_gathered(p)
    copy_own_slice(p, p.data, rank)


def copy_own_slice(p: Any, full: torch.Tensor, rank: int) -> None:
    """Copy rank `rank`'s flat slice of `full` (p's whole value) into p's ZeRO-3 partition `ds_tensor`."""
    part = p.ds_tensor
    start = part.numel() * rank
    count = max(0, min(part.numel(), p.ds_numel - start))
    if count:
        part.narrow(0, 0, count).copy_(full.reshape(-1).narrow(0, start, count).to(part.device, part.dtype))


def _check_gathered(p: Any) -> None:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    if p.ds_status != ZeroParamStatus.AVAILABLE or p.data.numel() != p.ds_numel:
        raise RuntimeError(
            f"a ZeRO-3 parameter ({tuple(p.ds_shape)}) was released before its in-backward update; the LOMO-way "
            "update needs it gathered when its gradient arrives (a DeepSpeed change?); use --train.engine=fsdp2"
        )


class GatheredModelState:
    """A ZeRO-3 partitioned model as a checkpoint component in the single-file format: `state_dict` gathers
    one parameter at a time (a collective: every rank calls it) into full CPU tensors; `load_state_dict`
    writes each rank's slice of the full tensors into its partitions (no communication)."""

    def __init__(self, model: nn.Module, info: DistInfo):
        self.model, self.info = model, info

    def state_dict(self) -> dict[str, Any]:
        import deepspeed

        params = dict(self.model.named_parameters())
        out: dict[str, Any] = {}
        for name, value in self.model.state_dict().items():  # the keys a plain model saves (persistent buffers too)
            if name in params:
                with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=None):
                    out[name] = params[name].data.detach().to("cpu", copy=True)
            else:
                out[name] = value.detach().to("cpu", copy=True)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params: dict[str, Any] = dict(self.model.named_parameters())  # ZeRO-3's: with ds_tensor, ds_shape, ...
        expected = set(self.model.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"model state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        buffers = dict(self.model.named_buffers())
        for name, full in state.items():
            if name not in params:
                buffers[name].copy_(full)
                continue
            p = params[name]
            if tuple(full.shape) != tuple(p.ds_shape):
                raise ValueError(f"{name}: the checkpoint has shape {tuple(full.shape)}, the model {tuple(p.ds_shape)}")
            copy_own_slice(p, full, self.info.rank)
