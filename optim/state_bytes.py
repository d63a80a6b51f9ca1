"""Optimizer state memory: measured (sum of the state tensors' bytes) and closed-form formulas.

- `measured_state_bytes(optimizer)`: sum of `numel * element_size` over every tensor in
  `optimizer.state` (ints / floats such as step counters are not counted; torch.optim.AdamW keeps
  `step` as a 4-byte tensor per parameter, which is counted). Works for an InBackwardOptimizer too.
- `formula_state_bytes(model, cfg)`: the closed form, per parameter (fp32 state, s = min(m, n),
  l = max(m, n), r = min(rank, s)):
    adamw                 8 mn (+ 4 for its step tensor)            1-D: 8 n (+ 4)
    adafactor             4 (m + n) [+ 4 mn with beta1]; one_sided 4 l [+ 4 mn]; 1-D 4 n [+ 4 n]
    galore_adamw (low)    projector + 2 x low-rank shape: std 4 (s r + 2 r l), reverse_std
                          4 (l r + 2 r s), left 4 (m r + 2 r n), right 4 (n r + 2 m r),
                          full 4 (m r + n r + 2 r^2); other params as adamw (no step tensor)
    galore_adafactor (low) projector + Adafactor on the low-rank shape (a x b): 4 (a + b) [+ 4 ab]
    adalomo               4 (m + n) (factor_rank + 1) (nmf-1: 4 (m + n)); 1-D 4 n
    adamem (low)          4 (s r + r l + r + 2 l)  (= (m + n) r + r + 2 max(m, n) floats);
                          variant2 + 4 s; variant1 4 (s r + r l + m + n); other params adafactor
- `state_bytes_table(model_cfg, optim_names=None, optim_cfg=None)` -> list of row dicts
  {optimizer, measured_bytes, formula_bytes, n_params, bytes_per_param}; measured by instantiating
  each optimizer: per distinct (shape, group options), one single-parameter optimizer is built
  from the registry's spec (the per-parameter math depends only on these), stepped once on a
  random gradient, measured, and multiplied by the number of such parameters. So 550m needs no
  2.2 GB model nor its SVDs 96 times. `format_state_bytes_table(rows)` renders it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from model import ModelConfig, Transformer
from optim.config import OptimConfig
from optim.factorization import factored_state_bytes
from optim.param_groups import describe_parameters, group_options, is_lowrank_target
from optim.projector import projection_side
from optim.registry import optimizer_spec
from optim.sharding import chunk_sizes, local, state_shard_dim

FP32 = 4
MEMORY_EFFICIENT = ("adamw", "adafactor", "galore_adamw", "galore_adafactor", "adamem", "adalomo")
# Table rows: "adafactor" = without momentum (beta1 null), "adafactor_momentum" = with beta1.
TABLE_ROWS = ("adamw", "adafactor", "adafactor_momentum", "galore_adamw", "galore_adafactor", "adamem", "adalomo")


def _named_cfg(base: OptimConfig, name: str) -> OptimConfig:
    if name == "adafactor":
        return replace(base, name="adafactor", beta1=None)
    if name == "adafactor_momentum":
        return replace(base, name="adafactor", beta1=base.beta1 if base.beta1 is not None else 0.9)
    if name in ("adamw", "galore_adamw") and base.beta1 is None:
        return replace(base, name=name, beta1=0.9)
    return replace(base, name=name)


def _state_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    if hasattr(optimizer, "optimizers"):  # InBackwardOptimizer: one optimizer per parameter
        for opt in optimizer.optimizers.values():
            yield from _state_tensors(opt)
        return
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                yield local(value)  # this rank's part of a sharded (DTensor) state: the memory it holds


def state_bytes_per_rank(optimizer: Any, world: int) -> int:
    """Bytes of `optimizer`'s state on one rank when its parameters are row-sharded over `world` ranks
    (FSDP2): a state tensor that follows its parameter's rows (optim.sharding.state_shard_dim) holds the
    largest chunk of torch.chunk's split; the others are whole on every rank. From an unsharded
    optimizer (one process, e.g. on the meta device) after a first step."""
    opts = list(optimizer.optimizers.values()) if hasattr(optimizer, "optimizers") else [optimizer]
    total = 0
    for opt in opts:
        for group in opt.param_groups:
            for p in group["params"]:
                for key, value in opt.state.get(p, {}).items():
                    if not torch.is_tensor(value):
                        continue
                    nbytes = value.numel() * value.element_size()
                    dim = state_shard_dim(opt, p, group, key, tuple(value.shape)) if value.dim() else None
                    if dim is not None and value.shape[dim]:
                        nbytes = nbytes // value.shape[dim] * chunk_sizes(value.shape[dim], world)[0]
                    total += nbytes
    return total


def measured_state_bytes(optimizer: Any) -> int:
    """Sum of the bytes of every tensor in the optimizer state (initialise it first: one step).
    `optimizer`: a torch.optim.Optimizer or an optim.in_backward.InBackwardOptimizer."""
    return sum(t.numel() * t.element_size() for t in _state_tensors(optimizer))


def _adafactor_floats(shape: tuple[int, ...], beta1: float | None, one_sided: bool) -> int:
    numel = 1
    for d in shape:
        numel *= d
    mom = numel if beta1 is not None else 0
    if len(shape) < 2:
        return numel + mom
    m, n = shape[-2], shape[-1]
    return (max(m, n) if one_sided else m + n) + mom


def _param_formula(name: str, shape: tuple[int, ...], low: bool, cfg: OptimConfig) -> int:
    """State floats (or bytes for adamw's step tensors) of one parameter; returns bytes."""
    numel = 1
    for d in shape:
        numel *= d
    if name == "adamw":
        return FP32 * (2 * numel + 1)
    if name == "adafactor":
        return FP32 * _adafactor_floats(shape, cfg.beta1, cfg.one_sided)
    if name == "adalomo":  # (m + n)(factor_rank + 1) floats per matrix (nmf-1: m + n), n per vector
        return factored_state_bytes(tuple(shape), cfg.factorization, cfg.factor_rank, FP32)
    if not low:
        if name == "galore_adamw":
            return FP32 * 2 * numel
        beta1 = cfg.beta1 if (name != "adamem" or cfg.lowrank_base_momentum) else None
        return FP32 * _adafactor_floats(shape, beta1, cfg.one_sided)
    m, n = shape
    small, large = min(m, n), max(m, n)  # s and l of the module docstring
    r = min(cfg.rank, small)
    if name == "adamem":
        if cfg.variant == "variant1":
            return FP32 * (small * r + r * large + m + n)
        extra = small if cfg.variant == "variant2" else 0
        return FP32 * (small * r + r * large + r + 2 * large + extra)
    side = projection_side((m, n), cfg.proj_type)  # a basis has r = min(rank, m, n) vectors on either side
    proj = {"left": m * r, "right": n * r, "full": (m + n) * r}[side]
    low_shape = {"left": (r, n), "right": (m, r), "full": (r, r)}[side]
    if name == "galore_adamw":
        return FP32 * (proj + 2 * low_shape[0] * low_shape[1])
    if name == "galore_adafactor":
        return FP32 * (proj + _adafactor_floats(low_shape, cfg.beta1, cfg.one_sided))
    raise ValueError(f"no state formula for optimizer {name!r}")


def formula_state_bytes(model: nn.Module, cfg: OptimConfig) -> int:
    """Closed-form state bytes of optimizer `cfg.name` on `model` (see module docstring)."""
    total = 0
    for info in describe_parameters(model):
        low = cfg.name in ("galore_adamw", "galore_adafactor", "adamem") and is_lowrank_target(
            info.role, info.param.dim(), cfg.lowrank_targets
        )
        total += _param_formula(cfg.name, tuple(info.param.shape), low, cfg)
    return total


def _group_key(group: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in group_options(group).items()))


def measured_state_bytes_for(model: nn.Module, cfg: OptimConfig, seed: int = 0) -> int:
    """Measured bytes of `cfg.name` on `model`: one single-parameter optimizer per distinct
    (shape, group options), stepped once on a random gradient, times its multiplicity (projectors
    from the randomized SVD: the state's shapes do not depend on the SVD method)."""
    spec = optimizer_spec(model, cfg)
    kinds: Counter[tuple[Any, ...]] = Counter()
    examples: dict[tuple[Any, ...], dict[str, Any]] = {}
    for group in spec.param_groups:
        for p in group["params"]:
            key = (tuple(p.shape), p.dtype, _group_key(group))
            kinds[key] += 1
            examples.setdefault(key, group)
    gen = torch.Generator().manual_seed(seed)
    total = 0
    for key, count in kinds.items():
        shape, dtype, _ = key
        group = examples[key]
        p = nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = torch.randn(shape, generator=gen).to(dtype)
        options = group_options(group)
        if "svd_method" in options:
            # The bases have the same shapes however they are computed; the randomized range finder
            # is several times faster than the exact SVD on 210m/550m shapes (tools/model_info.py).
            options["svd_method"] = "randomized"
        opt = spec.cls([{**options, "params": [p]}], **spec.kwargs)
        opt.step()
        total += count * measured_state_bytes(opt)
    return total


def state_bytes_table(
    model_cfg: ModelConfig,
    optim_names: Iterable[str] | None = None,
    optim_cfg: OptimConfig | None = None,
    model: nn.Module | None = None,
) -> list[dict[str, Any]]:
    """Rows {optimizer, measured_bytes, formula_bytes, n_params, bytes_per_param} for `model_cfg`
    (a model.ModelConfig) and each optimizer name (default: every registered one that has a
    formula), with the other keys from `optim_cfg` (default OptimConfig()). `model`: count this
    model instead of a fresh Transformer(model_cfg), e.g. one with LoRA adapters and frozen
    weights (trainer/lora.py; only trainable parameters have state; n_params counts them all)."""
    base = optim_cfg or OptimConfig()
    if model is None:
        with torch.device("meta"):  # shapes only: the measurement instantiates one param per kind
            model = Transformer(model_cfg)
    n_params = sum(p.numel() for p in model.parameters())
    names = list(optim_names) if optim_names is not None else list(TABLE_ROWS)
    rows = []
    for name in names:
        cfg = _named_cfg(base, name)
        name = cfg.name if name not in ("adafactor", "adafactor_momentum") else name
        formula = formula_state_bytes(model, cfg) if cfg.name in MEMORY_EFFICIENT else None
        # measuring needs real tensors: measured_state_bytes_for builds its own small ones
        measured = measured_state_bytes_for(model, cfg)
        rows.append(
            dict(
                optimizer=name,
                measured_bytes=measured,
                formula_bytes=formula,
                n_params=n_params,
                bytes_per_param=measured / n_params,
            )
        )
    return rows


def format_state_bytes_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'optimizer':<18} {'measured MiB':>13} {'formula MiB':>12} {'bytes/param':>12}"]
    for r in rows:  # MiB = 2^20 bytes
        formula = "-" if r["formula_bytes"] is None else f"{r['formula_bytes'] / 2**20:12.1f}"
        lines.append(
            f"{r['optimizer']:<18} {r['measured_bytes'] / 2**20:13.1f} {formula:>12} {r['bytes_per_param']:12.3f}"
        )
    return "\n".join(lines)


def print_state_bytes_table(cfg: Any, model: nn.Module | None = None, optim_names: Iterable[str] | None = None) -> None:
    """For tools/model_info.py: `cfg` is the full run Config (uses cfg.model and cfg.optim's keys:
    rank, lowrank_targets, proj_type, variant, one_sided, ...); `model` and `optim_names` as in
    state_bytes_table."""
    rows = state_bytes_table(cfg.model, optim_names, optim_cfg=cfg.optim, model=model)
    o = cfg.optim
    print(
        f"optimizer state, fp32, measured (instantiated) vs closed form; rank {o.rank}, "
        f"lowrank_targets {o.lowrank_targets}, proj_type {o.proj_type}, adamem variant {o.variant}:"
    )
    print(format_state_bytes_table(rows))
