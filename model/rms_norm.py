"""RMSNorm (Zhang & Sennrich 2019) as LLaMA uses it, numerically as HF's `LlamaRMSNorm`."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2 over the last dim) + eps); a learned weight, no bias, no mean subtraction.

    Computed in fp32 whatever the input dtype (the mean of squares of bf16 activations loses precision), cast back
    to the input dtype, then multiplied by the weight, in that order as HF's `LlamaRMSNorm` does: under bf16
    autocast the residual stream is fp32 here, so the output is fp32 and the following Linear casts it.
    eps sits inside the square root (HF / GaLore), not added to the RMS.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
