"""The `optim` config section: one flat, typed set of keys shared by every optimizer.

Each optimizer reads the keys it needs (declared with `optim.registry.register(..., reads=...)`,
checked by `optim.validation.validate_optim_config`); `--optim.name` picks the optimizer from
`optim.REGISTRY`. Keys that only some optimizers read are grouped below by who reads them.

Choice-valued keys are typed with the `Literal` aliases below; `CHOICES` (read from the
annotations) maps each key to its valid values and the optimizer modules derive their tuples from
the same aliases (`typing.get_args`), so each set of choices is written once.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

MomentumStyle = Literal["adam", "hf"]
LowrankTargets = Literal["blocks", "all"]
ProjType = Literal["std", "reverse_std", "left", "right", "full"]
SvdMethod = Literal["exact", "randomized"]
MomentPolicy = Literal["keep", "reset", "rotate"]
AdamemVariant = Literal["adamem", "variant1", "variant2"]
SecondMomentSource = Literal["momentum", "gradient"]
UpdateNorm = Literal["grouped", "none", "layerwise", "global"]
Factorization = Literal["nmf", "svd", "qr"]


@dataclass
class OptimConfig:
    name: str = "adamw"
    """Optimizer, a name in optim.REGISTRY: adamw, adafactor, galore_adamw, galore_adafactor, adamem, adalomo."""
    lr: float = 1e-3
    """Peak learning rate (the schedule scales it)."""
    beta1: float | None = 0.9
    """First-moment (momentum) coefficient in [0, 1); null = no momentum (Adafactor family only)."""
    beta2: float = 0.95
    """Second-moment EMA coefficient in (0, 1) (Adafactor family: replaced by beta2_decay when that is set)."""
    eps: float = 1e-8
    """Added to sqrt(second moment) in the update's denominator."""
    weight_decay: float = 0.01
    """Decoupled weight decay coefficient."""
    decay_norm_weights: bool = False
    """Also decay LayerNorm weights (default: only matrices are decayed, as OLMo / nanoGPT)."""
    fused: bool | None = None
    """torch.optim.AdamW implementation: null = fused on CUDA, torch's default elsewhere (its single-tensor loop on
    CPU); false on CUDA = torch's foreach implementation."""
    compile: bool = False
    """adafactor, adalomo, and the full-space matrices of adamem (galore_adafactor's with momentum_style adam): run
    each whole fp32 matrix's update as two torch.compile'd functions (statistics, then the fused update;
    optim/compiled_steps.py) instead of the eager fast path. Compiles on first use (seconds) and needs a C/C++
    compiler, as train.compile."""

    # --- Adafactor family (adafactor, galore_adafactor, adamem, adalomo) ---
    beta2_decay: float | None = None
    """beta2_t = 1 - t^beta2_decay (< 0, e.g. -0.8) replaces beta2; null = constant beta2 (adalomo: -0.8)."""
    eps1: float = 1e-30
    """Added to g^2 before the second-moment statistics."""
    eps2: float = 1e-3
    """Floor of RMS(param) in the parameter-scaled step (scale_parameter / relative_step; adalomo always)."""
    clip_threshold: float | None = None
    """Update RMS clipping threshold; null = no clipping (adalomo: 1.0)."""
    scale_parameter: bool = False
    """Scale the step by max(eps2, RMS(param)) (HF Adafactor's scale_parameter)."""
    relative_step: bool = False
    """Use HF Adafactor's relative step min(1e-2, 1/sqrt(t)) instead of lr."""
    one_sided: bool = False
    """Keep one second-moment statistic on the larger side of a matrix instead of rows and columns."""
    warmup_init: bool = False
    """HF Adafactor's relative-step warm-up min(1e-6 t, 1/sqrt(t)) (only with relative_step)."""
    momentum_style: MomentumStyle | None = None
    """Adafactor momentum: adam = bias-corrected EMA of G, then preconditioned (the AdaMeM paper's "Adafactor with
    momentum"); hf = EMA of the preconditioned lr-scaled update (HF / galore_torch); null = the optimizer's reference
    (adam for adafactor / adamem, hf for galore_adafactor)."""

    # --- low rank (galore_adamw, galore_adafactor, adamem) ---
    lowrank_targets: LowrankTargets = "blocks"
    """Low-rank matrices: blocks = 2-D weights inside the transformer blocks; all = every 2-D weight."""
    rank: int = 128
    """Rank r of the gradient projection."""
    update_proj_gap: int = 200
    """Steps between projector refreshes (T; a refresh computes an SVD of the gradient)."""
    scale: float = 0.25
    """GaLore's alpha: the back-projected update is multiplied by it."""
    proj_type: ProjType = "std"
    """Projection side (galore_torch's proj_type): std, reverse_std, left, right or full (both sides)."""
    svd_method: SvdMethod = "exact"
    """Projector SVD: exact (torch.linalg.svd, as galore_torch) or randomized (seeded range finder)."""
    moments_on_proj_change: MomentPolicy = "keep"
    """Low-rank moments on a projector refresh: keep (the reference), reset (zero, bias correction restarts), rotate."""
    projected_backward: bool = False
    """GaLore only: compute each low-rank weight's projected gradient directly in backward (AdaMeM paper, Appendix B),
    never forming the full gradient except on projector-refresh steps (optim/projected_backward.py)."""
    delta: float = 1.0
    """AdaMeM's weight of the residual (full-rank) update."""
    variant: AdamemVariant = "adamem"
    """AdaMeM algorithm: adamem (the paper's), variant1 or variant2 (the paper's Figure 2 ablations)."""
    second_moment_from: SecondMomentSource = "momentum"
    """AdaMeM's low-rank second moment from the momentum (Algorithm 3 as printed) or from the projected gradient."""
    lowrank_base_momentum: bool = True
    """AdaMeM: parameters outside lowrank_targets run Adafactor with momentum beta1 (true) or without (false)."""

    # --- AdaLomo ---
    update_norm: UpdateNorm = "grouped"
    """Update normalisation by RMS / clip_threshold: grouped (per tensor), none, layerwise (per block), global."""
    factorization: Factorization = "nmf"
    """Factored second-moment estimate: nmf, svd or qr (optim/factorization.py)."""
    factor_rank: int = 1
    """Rank of the factored second-moment estimate (nmf rank 1 = Adafactor's closed form)."""
    factor_iters: int = 1
    """Factorisation iterations per step (nmf, rank > 1: multiplicative updates; svd: subspace iterations)."""


def _literal_values(annotation: object) -> tuple[str, ...]:
    """The values of a `Literal[...]` annotation or of the Literal in `Literal[...] | None`; () otherwise."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return ()


CHOICES: dict[str, tuple[str, ...]] = {
    key: values
    for key, annotation in typing.get_type_hints(OptimConfig).items()
    if (values := _literal_values(annotation))
}
