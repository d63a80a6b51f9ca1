"""Root mean square of a tensor: the one formula the optimizers here use for RMS(x)."""

from __future__ import annotations

import torch


def rms(x: torch.Tensor) -> torch.Tensor:
    """RMS(x) = ||x||_2 / sqrt(numel), a 0-d tensor (no host sync).

    The 2-norm over sqrt(numel), as HF's Adafactor computes it, not sqrt(mean(x^2)): the two
    round differently, and the updates are meant to match HF's to the last bit where they can."""
    return x.norm(2) / (x.numel() ** 0.5)
