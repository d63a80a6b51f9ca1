"""Learning-rate schedule: linear warmup, then cosine decay to final_lr_ratio x peak.

A pure function of the step, so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, final_lr_ratio: float) -> float:
    """Multiplier of the peak lr used for the optimizer update of `step` (0-based).

    Warmup: (step + 1) / warmup_steps, so the first update uses a small non-zero lr and the
    update of step warmup_steps - 1 uses the peak. Then cosine from 1 at step warmup_steps - 1
    down to final_lr_ratio at step max_steps - 1 (the last update).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - warmup_steps + 1) / decay_steps)
    return final_lr_ratio + (1 - final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
