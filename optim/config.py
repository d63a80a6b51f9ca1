"""The `optim` config section: one flat, typed set of keys shared by every optimizer.

Each optimizer reads the keys it needs; `--optim.name` picks the optimizer from `optim.REGISTRY`.
Keys that only some optimizers read are grouped below by who reads them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 1e-3
    beta1: Optional[float] = 0.9  # null = no momentum (Adafactor without momentum)
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.01
    # Weight decay goes to matrices (embedding, output layer, block weights) but not to
    # LayerNorm weights unless this is set (OLMo / nanoGPT default).
    decay_norm_weights: bool = False
    # torch.optim.AdamW implementation: null = fused on CUDA, foreach elsewhere.
    fused: Optional[bool] = None

    # --- Adafactor family (adafactor, galore_adafactor, adamem, adalomo) ---
    beta2_decay: Optional[float] = None  # e.g. -0.8: beta2_t = 1 - t^beta2_decay (replaces beta2)
    eps1: float = 1e-30  # added to g^2 before the second-moment statistics
    eps2: float = 1e-3  # floor of RMS(param) for scale_parameter / relative_step
    clip_threshold: Optional[float] = None  # update RMS clipping; null = off
    scale_parameter: bool = False
    relative_step: bool = False
    one_sided: bool = False
    warmup_init: bool = False  # HF Adafactor's relative-step warm-up (with relative_step)
    # Adafactor momentum: adam = EMA of G, bias-corrected, then preconditioned (the AdaMeM paper's
    # "Adafactor with momentum"); hf = EMA of the preconditioned lr-scaled update (HF / galore_torch).
    # null = the optimizer's reference: adam for adafactor / adamem, hf for galore_adafactor.
    momentum_style: Optional[str] = None

    # --- low rank (galore_adamw, galore_adafactor, adamem) ---
    lowrank_targets: str = "blocks"  # blocks | all
    rank: int = 128
    update_proj_gap: int = 200
    scale: float = 0.25  # GaLore's alpha
    proj_type: str = "std"  # std | reverse_std | left | right | full
    svd_method: str = "exact"  # exact | randomized
    moments_on_proj_change: str = "keep"  # keep (reference behaviour) | reset | rotate
    delta: float = 1.0  # AdaMeM residual weight
    variant: str = "adamem"  # adamem | variant1 | variant2
    second_moment_from: str = "momentum"  # momentum (Algorithm 3 as printed) | gradient
    # adamem: parameters outside lowrank_targets (embedding, output, LayerNorms) run Adafactor
    # with momentum beta1 (true) or without momentum (false).
    lowrank_base_momentum: bool = True

    # --- AdaLomo ---
    update_norm: str = "grouped"  # grouped | none | layerwise | global
    factorization: str = "nmf"  # nmf | svd | qr
    factor_rank: int = 1
    # nmf (r > 1): multiplicative-update iterations per step; svd: subspace iterations per step
    factor_iters: int = 1
