"""The output layer and the summed token cross-entropy in one pass over chunks of tokens, without the full
logits tensor: `linear_cross_entropy_sum(hidden, weight, targets, chunk_tokens)`.

The plain loss materialises the logits of every token (micro-batch x seq x vocab: 64 x 512 x 32128 fp32 is
4.2 GB), their fp32 copy and, in backward, their gradient. Here the forward walks the tokens `chunk_tokens`
at a time: logits of the chunk (in the autocast dtype, as `nn.Linear` under autocast), fp32 log-softmax,
the chunk's loss, and at once the chunk's gradients (softmax - one-hot), turned into the gradients of
the hidden states and of the weight; only those are kept for backward, which scales them by the
incoming gradient. Peak memory of the loss: one chunk's logits (a few hundred MB at 4096 tokens) plus
the two gradients the plain backward produces anyway; no recomputation, the same FLOPs (Liger-Kernel's
fused linear cross-entropy does the same in Triton; this is plain torch, so it runs on CPU and GPU). The
weight's fp32 gradient (vocab x d) is then held from forward to backward, where the plain loss holds the
tokens x vocab log-probabilities: with no more tokens than d the plain loss is the smaller, and the model
takes it (`Transformer._chunked_loss_is_smaller`).

Numerics: every op is the plain path's, in the same dtypes (bf16 matmuls under autocast with fp32
log-softmax; the weight's gradient accumulated in fp32 over chunks); fp32 results equal the plain loss
up to the summation order over chunks (tests/model/test_loss.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_TOKENS = 4096  # train.loss_chunk_tokens: 4096 x 32128 fp32 logits are 0.5 GB
IGNORE_INDEX = -100  # F.cross_entropy's default, which the plain loss uses: a target to leave out (padding)


class _LinearCrossEntropySum(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk: int,
        needs: tuple[bool, bool],
    ) -> torch.Tensor:
        h = hidden.reshape(-1, hidden.shape[-1])
        y = targets.reshape(-1)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        # Only the gradients backward will ask for (`needs`: hidden's, weight's): a frozen output layer costs
        # neither its vocab x d fp32 buffer nor the matmul that fills it.
        grad_h = torch.empty_like(h) if needs[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if needs[1] else None
        for start in range(0, h.shape[0], chunk):
            h_c, y_c = h[start : start + chunk], y[start : start + chunk]
            logits = F.linear(h_c, weight)  # the autocast dtype under autocast, as the plain nn.Linear
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += F.nll_loss(logp, y_c, reduction="sum")
            if not any(needs):
                continue
            # d(sum CE)/d logits = softmax - one-hot (fp32), then cast like the plain path's gradient.
            d = logp.exp_()
            d[torch.arange(len(y_c), device=d.device), y_c.clamp_min(0)] -= 1.0
            d = d.to(logits.dtype)
            del logits, logp
            # A token whose target is IGNORE_INDEX has no loss (nll_loss skips it), so no gradient: its row of d
            # is masked where that is cheap, on the d-wide sides of the two matmuls, not the vocab-wide d
            # (a mask, not an index of the kept rows: that would sync the host).
            keep = (y_c != IGNORE_INDEX).unsqueeze(1).to(d.dtype)
            if grad_h is not None:
                grad_h[start : start + chunk] = ((d @ weight.to(d.dtype)) * keep).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += (d.t() @ (h_c.to(d.dtype) * keep)).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.hidden_shape, ctx.weight_dtype = hidden.shape, weight.dtype
        return total

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        grad_h, grad_w = ctx.saved_tensors
        # In place: these are the only references, so the weight's gradient is handed on without a second
        # vocab x d copy (AccumulateGrad keeps it as .grad).
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_out.to(grad_h.dtype)).reshape(ctx.hidden_shape)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_out).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int
) -> torch.Tensor:
    """sum over tokens of cross_entropy(hidden @ weight.T, targets), fp32 0-d, `chunk_tokens` tokens at a time
    (see the module docstring). hidden: (..., d); weight: (vocab, d); targets: (...) int64, IGNORE_INDEX for
    a token left out of the loss and its gradients, as F.cross_entropy."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    grad = torch.is_grad_enabled()
    needs = (grad and hidden.requires_grad, grad and weight.requires_grad)
    return _LinearCrossEntropySum.apply(hidden, weight, targets, chunk_tokens, needs)
