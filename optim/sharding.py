"""Optimizer math on a shard of a matrix: the one place where the optimizers meet FSDP2.

Under FSDP2 (`fully_shard`) every parameter and its gradient are DTensors sharded along dim 0
(rows), in torch.chunk's split: rank k holds rows [k c, min((k + 1) c, m)) with c = ceil(m / W),
so with uneven sizes a rank may hold fewer rows, or none. The optimizers here work on the local
tensors (`local`) and reduce over the full tensor only where their math needs it, through one
`Sharding` object per parameter:

- a reduction along the sharded dim (`sum`, `mean`): the local partial sums, then one all-reduce
  of the result (for Adafactor's column statistics of an m x n matrix: one all-reduce of an
  n-vector); along any other dim it is local;
- reductions over all entries (`sum_all`, `sq_sum`, `rms`): one scalar all-reduce;
- a product that contracts the sharded dim (e.g. GaLore's P^T G for a left projector): the local
  product, then one all-reduce of the small result (`sum_all_into`);
- `gather_to`: the full matrix on one rank (GaLore / AdaMeM projector refreshes: one owner rank
  per matrix runs the SVD, `broadcast` sends the result), never a silent all-rank gather.

Means divide by the *full* size (`full_size`), never by the local one: a rank holding zero rows
still joins every collective (with zeros) and gets the same result as the others.

Why not DTensor's own operators: `x.mean(0)` on a sharded DTensor is correct, but it hides which
collectives run (`torch.linalg.svd` of a sharded DTensor silently gathers the whole matrix on every
rank, and `torch.optim.Adafactor` crashes on DTensors in torch 2.13); the explicit form keeps the
cost of each line visible and the same code path for one process (`WHOLE`: every collective is a
no-op) and for W ranks.

`state_shard_dim` says, for a state tensor, which of its dims follows the parameter's rows (None:
the tensor is whole on every rank, e.g. Adafactor's column statistics): distributed checkpoints
use it to save each rank's part and to re-split state on another number of ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard


@dataclass(frozen=True)
class Sharding:
    """How a local tensor relates to the full one: `dim` of the local tensor is split over `group`
    (None: the local tensor is the full one), and the full tensor has `full_size` entries there."""

    dim: int | None = None
    group: dist.ProcessGroup | None = None
    full_size: int = 0

    @property
    def sharded(self) -> bool:
        return self.dim is not None

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group) if self.sharded else 0

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group) if self.sharded else 1

    def _all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.sharded:
            dist.all_reduce(x, op=dist.ReduceOp.SUM, group=self.group)
        return x

    def full_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The shape of the full tensor behind local `x`."""
        if not self.sharded:
            return tuple(x.shape)
        return tuple(self.full_size if _same_dim(i, self.dim, x.dim()) else s for i, s in enumerate(x.shape))

    def full_numel(self, x: torch.Tensor) -> int:
        if not self.sharded:
            return x.numel()
        assert self.dim is not None
        others = 1
        for i, s in enumerate(x.shape):
            if not _same_dim(i, self.dim, x.dim()):
                others *= s
        return others * self.full_size

    def sum(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        """x.sum(dim) of the full tensor (all-reduced when `dim` is the sharded one)."""
        out = x.sum(dim=dim, keepdim=keepdim)
        if self.sharded and _same_dim(dim, self.dim, x.dim()):
            self._all_reduce(out)
        return out

    def mean(self, x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
        """x.mean(dim) of the full tensor. When `dim` is not sharded this *is* `x.mean(dim)` (same
        bits as one process); when it is, the full sum over the full size."""
        if not (self.sharded and _same_dim(dim, self.dim, x.dim())):
            return x.mean(dim=dim, keepdim=keepdim)
        return self.sum(x, dim, keepdim).div_(self.full_size)

    def reduced(self, dim: int, ndim: int) -> Sharding:
        """The Sharding of `x.mean(dim)` (or sum) for a local x of `ndim` dims: the row statistic of a
        row-sharded matrix is itself row-sharded; the column statistic is whole."""
        if not self.sharded or _same_dim(dim, self.dim, ndim):
            return WHOLE
        assert self.dim is not None
        own, red = self.dim % ndim, dim % ndim
        return Sharding(own - (1 if red < own else 0), self.group, self.full_size)

    def sum_all(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of every entry of the full tensor (0-d)."""
        return self._all_reduce(x.sum())

    def sum_all_into(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of each rank's `partial` (in place): the result of a product whose
        contracted dim is the sharded one (e.g. P^T G with this rank's rows of P and of G)."""
        return self._all_reduce(partial.contiguous())

    def sq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of squares of the full tensor (0-d)."""
        if not self.sharded:
            return x.norm(2).square()
        return self._all_reduce(x.square().sum())

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        """RMS of the full tensor, as optim.rms.rms: ||x|| / sqrt(numel) (the same bits for WHOLE)."""
        if not self.sharded:
            return x.norm(2) / (x.numel() ** 0.5)
        return self.sq_sum(x).sqrt_() / (self.full_numel(x) ** 0.5)

    def gather_to(self, x: torch.Tensor, owner: int) -> torch.Tensor | None:
        """The full tensor on rank `owner` (None elsewhere): the local shards gathered along `dim`.
        Every rank of the group must call it. Uneven shards (chunk split) are handled."""
        if not self.sharded:
            return x
        assert self.dim is not None
        sizes = chunk_sizes(self.full_size, self.world_size)
        shape = list(x.shape)
        pieces = []
        for s in sizes:
            shape[self.dim] = s
            pieces.append(x.new_empty(shape))
        # gloo and NCCL both need equal-size buffers for gather: pad to the largest chunk.
        biggest = max(sizes)
        shape[self.dim] = biggest
        padded = x.new_zeros(shape)
        padded.narrow(self.dim, 0, x.shape[self.dim]).copy_(x)
        me = self.rank
        group_owner = dist.get_global_rank(self.group, owner) if self.group is not None else owner
        buffers = [x.new_empty(shape) for _ in sizes] if me == owner else None
        dist.gather(padded, buffers, dst=group_owner, group=self.group)
        if buffers is None:
            return None
        return torch.cat([buf.narrow(self.dim, 0, s) for buf, s in zip(buffers, sizes, strict=True)], dim=self.dim)

    def broadcast(self, x: torch.Tensor, owner: int) -> torch.Tensor:
        """`x` of rank `owner` on every rank (in place on `x`, which every rank allocates)."""
        if self.sharded:
            group_owner = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            dist.broadcast(x, src=group_owner, group=self.group)
        return x

    def local_rows(self, full: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's slice of `full` along `dim` (a tensor whose `dim` follows the parameter's rows)."""
        if not self.sharded:
            return full
        start, length = chunk_range(self.full_size, self.world_size, self.rank)
        return full.narrow(dim, start, length)

    def transposed(self) -> Sharding:
        """The sharding of x.T for a 2-D x."""
        if not self.sharded:
            return self
        assert self.dim is not None
        return Sharding(1 - self.dim % 2, self.group, self.full_size)


WHOLE = Sharding()


def _same_dim(a: int, b: int | None, ndim: int) -> bool:
    return b is not None and a % ndim == b % ndim


def chunk_sizes(full: int, world: int) -> list[int]:
    """torch.chunk's split of `full` rows over `world` ranks (FSDP2's and DTensor Shard's): ceil-sized
    chunks, the last ones shorter or empty."""
    size = -(-full // world) if full else 0
    return [max(0, min(size, full - k * size)) for k in range(world)]


def chunk_range(full: int, world: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank `rank`'s chunk."""
    sizes = chunk_sizes(full, world)
    return sum(sizes[:rank]), sizes[rank]


def sharding_of(p: torch.Tensor) -> Sharding:
    """The Sharding of parameter `p` (WHOLE unless a DTensor sharded along one dim of a 1-D mesh).
    Hybrid sharding (a 2-D mesh) is refused: its statistics would need the shard group of the mesh."""
    if not isinstance(p, DTensor):
        return WHOLE
    placements = p.placements
    shards = [pl for pl in placements if isinstance(pl, Shard)]
    if not shards:
        return WHOLE
    if len(placements) != 1:
        raise NotImplementedError(
            f"parameter sharded over a {len(placements)}-D device mesh ({placements}): the optimizers reduce "
            "over a 1-D FSDP mesh only; use one fully_shard mesh dimension"
        )
    dim = shards[0].dim
    return Sharding(dim, p.device_mesh.get_group(), p.shape[dim])


def local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor behind a DTensor (`t` itself otherwise)."""
    return t.to_local() if isinstance(t, DTensor) else t


@runtime_checkable
class ShardedState(Protocol):
    """Optimizers whose state tensors may follow the parameter's row split (this package's)."""

    def state_shard_dim(
        self, p: torch.Tensor, group: dict[str, Any], key: str, full_shape: Sequence[int]
    ) -> int | None:
        """The dim of state tensor `key` of parameter `p` (in `group`) that is split like p's rows,
        or None when every rank holds it whole. `full_shape`: the state tensor's full shape. Depends
        only on p's full shape, the group's options and `key`, not on the state's values, so a
        checkpoint loader can ask before the state exists."""
        ...


def state_shard_dim(
    opt: torch.optim.Optimizer, p: torch.Tensor, group: dict[str, Any], key: str, full_shape: Sequence[int]
) -> int | None:
    """`opt.state_shard_dim(...)` for this package's optimizers; for torch's (AdamW): a state tensor
    of the parameter's full shape is split like it (dim 0), anything else (the step) is whole."""
    if isinstance(opt, ShardedState):
        return opt.state_shard_dim(p, group, key, full_shape)
    return 0 if tuple(full_shape) == tuple(p.shape) and len(full_shape) > 0 else None
