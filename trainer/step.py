"""One optimizer step's forward/backward over micro-batches, and evaluation."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
from torch import nn

from trainer.distributed import DistInfo, all_reduce_sum


def split_micro_batches(inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int):
    return list(zip(inputs.split(micro_batch), targets.split(micro_batch), strict=True))


def token_loss_sum(
    model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast, loss_chunk_tokens: int = 0
) -> torch.Tensor:
    """Summed token cross-entropy, in fp32 from the (possibly bf16) logits; `loss_chunk_tokens` > 0: chunk by
    chunk, without the full logits tensor (model/loss.py; the trainer's train.loss_chunk_tokens)."""
    with autocast:
        return model(inputs, targets=targets, loss_chunk_tokens=loss_chunk_tokens)


def forward_backward(
    model: nn.Module,
    micro_batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_denominator: float,
    autocast,
    sync: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    before_backward: Callable[[bool], None] | None = None,
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
    loss_chunk_tokens: int = 0,
) -> torch.Tensor:
    """Accumulate gradients of sum(CE) / loss_denominator over the micro-batches.

    The denominator is the number of target tokens of the whole global batch divided by the
    number of ranks (DDP and FSDP2 average gradients over ranks), so the gradient is that of the
    mean token loss over the global batch, whatever the micro-batch split. `sync(is_last)` (the
    engine's: trainer.parallelize.grad_sync) skips the gradient reduction on all but the last
    micro-batch; `before_backward(is_last)` lets an in-backward optimizer arm itself for the last
    one; `loss_chunk_tokens`: see token_loss_sum; `backward(loss)` is the update strategy's (DeepSpeed's
    engine runs it). Returns this rank's mean token loss (detached).
    """
    total = torch.zeros((), device=micro_batches[0][0].device)
    for i, (x, y) in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        if before_backward is not None:
            before_backward(last)
        with contextlib.nullcontext() if sync is None else sync(last):
            loss = token_loss_sum(model, x, y, autocast, loss_chunk_tokens) / loss_denominator
            backward(loss)
        total += loss.detach()
    return total


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list,
    info: DistInfo,
    autocast,
    should_stop: Callable[[], bool] | None = None,
    loss_chunk_tokens: int = 0,
) -> tuple[float, float] | None:
    """Mean token cross-entropy and perplexity over the validation batches (split over ranks).

    `should_stop()` is asked before each round of batches, the same number of times on every rank
    (so it may be a collective); when it says True the evaluation is abandoned and None returned."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=info.device)
    count = torch.zeros((), dtype=torch.float64, device=info.device)
    mine = batches[info.rank :: info.world_size]
    for i in range(math.ceil(len(batches) / info.world_size)):
        if should_stop is not None and should_stop():
            model.train(was_training)
            return None
        if i < len(mine):
            x, y = (t.to(info.device, non_blocking=True) for t in mine[i])
            loss_sum += token_loss_sum(model, x, y, autocast, loss_chunk_tokens).double()
            count += y.numel()
        elif info.enabled:
            # FSDP2 and ZeRO-3 all-gather each block's parameters in forward, a collective: a rank left without a
            # batch in the last round still runs one forward (its loss is not counted), or the others hang.
            x, y = (t.to(info.device, non_blocking=True) for t in batches[0])
            token_loss_sum(model, x, y, autocast, loss_chunk_tokens)
    all_reduce_sum(loss_sum, info)
    all_reduce_sum(count, info)
    model.train(was_training)
    loss = (loss_sum / count).item()
    return loss, math.exp(min(loss, 700.0))
