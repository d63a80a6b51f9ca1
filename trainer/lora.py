"""LoRA adapters as a model transform: `apply_lora(model, ...)` wraps every nn.Linear inside
`model.blocks` so that the model file (model/) stays free of training code.

A wrapped linear computes (Hu et al. 2021; peft's / ReLoRA's LoraLinear without a bias):

    y = x W^T + (alpha / r) * dropout(x) A^T B^T,    A: (r x in),  B: (out x r)

- W is the block's original weight, frozen (requires_grad False) and kept as the *same*
  Parameter under the same attribute `weight`, so its state_dict key is unchanged
  (`blocks.0.attn.qkv.weight`); the adapters add `...qkv.lora_a` and `...qkv.lora_b`. A state dict
  of merged weights (`merged_state_dict`) therefore loads into a plain Transformer.
- A starts Kaiming-uniform with a = sqrt(5) over its fan-in `in` (peft's and ReLoRA's choice, which
  is nn.Linear's default: U(-1/sqrt(in), 1/sqrt(in))), B starts at zero, so a freshly wrapped
  model computes exactly the base model's function (B A = 0; the adapter branch adds +0.0).
- The scale alpha / r multiplies the rank-r activation dropout(x) A^T (r values per token rather
  than `out`): the same product, and the cheaper place.
- Dropout acts on the adapter branch's input only (the frozen path sees x), as in peft/ReLoRA; it
  draws from torch's global RNG, which the checkpoint's `rng` component saves, so resume is exact.
  Its memory cost: backward keeps each wrapped linear's dropped input as well as its input (210m,
  micro-batch 8 x 512, fp32: 5.49 GiB of activations at dropout 0.1 against 3.99 GiB at 0 and
  3.90 GiB without adapters; tools/bench_memory.py --adapter-rank 128).
- A's values come from a `torch.Generator` seeded from (run.seed, reset index) (`adapter_seed`):
  index 0 for the first initialisation, k for ReLoRA's k-th restart. Resuming therefore needs no
  generator state: a restart after a resume draws the same A as in an uninterrupted run. The
  draws are made on the CPU in fp32 and copied to the parameter's device (same values on any
  device; on the meta device the copy is shape-only).
- The embedding, the LayerNorms and the output layer are left as they are (trainable), as in
  GaLore's LoRA baseline; `optim.param_groups.describe_parameters` sees the adapter matrices as
  2-D `block_matrix` parameters of their block, and skips the frozen weights.

`merge_adapters` folds the adapters into W (W += (alpha/r) B A, computed in fp32) and zeroes B:
the function is unchanged up to fp32 rounding and the adapter branch contributes nothing until
the next update. `reinit_adapters` draws a new A and zeroes B (ReLoRA's restart).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from trainer.config import AdapterConfig

ADAPTER_PARAMS = ("lora_a", "lora_b")  # attribute names; also the last component of their parameter names


class LoRALinear(nn.Module):
    """A frozen bias-free linear plus a rank-r adapter (see the module docstring for the math)."""

    weight: nn.Parameter  # declared for type checkers (nn.Module's __setattr__ registers them)
    lora_a: nn.Parameter
    lora_b: nn.Parameter
    scale: float

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linears only (the model has no biases)")
        if not 1 <= rank <= min(base.in_features, base.out_features):
            raise ValueError(
                f"LoRA rank {rank} must be in [1, {min(base.in_features, base.out_features)}] for a "
                f"{base.out_features} x {base.in_features} linear"
            )
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.rank: int = rank
        self.alpha: float = alpha
        self.scale = alpha / rank
        self.weight = base.weight  # the same Parameter: same name in state_dict, no copy
        self.weight.requires_grad_(False)
        w = base.weight
        self.lora_a = nn.Parameter(torch.zeros(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        # Identity for p = 0: no mask tensor, no RNG draw.
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = F.linear(self.dropout(x), self.lora_a) * self.scale
        return F.linear(x, self.weight) + F.linear(low, self.lora_b)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """(name, module) of every adapter-wrapped linear, in the model's module order (DDP unwrapped)."""
    model = getattr(model, "module", model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name.replace("_orig_mod.", ""), module


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, seed: int) -> list[LoRALinear]:
    """Replace every nn.Linear inside `model.blocks` by a LoRALinear around it (in place) and draw
    the adapters' first A (reset index 0). Returns the wrapped modules in model order. The base
    weights keep their values and names; nothing outside `model.blocks` changes."""
    if any(True for _ in lora_modules(model)):
        raise ValueError("the model already has LoRA adapters")
    blocks = model.get_submodule("blocks")
    targets = [
        (parent, child_name, child)
        for parent in blocks.modules()
        for child_name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    if not targets:
        raise ValueError("no nn.Linear inside model.blocks to wrap with LoRA")
    for parent, child_name, child in targets:
        setattr(parent, child_name, LoRALinear(child, rank, alpha, dropout))
    reinit_adapters(model, seed=seed, reset_index=0)
    return [m for _, m in lora_modules(model)]


def apply_adapters(model: nn.Module, cfg: AdapterConfig, *, seed: int) -> list[LoRALinear]:
    """The transform `adapter.method` asks for: none = nothing (returns []); lora and relora = apply_lora
    with the config's rank, alpha and dropout (ReLoRA's restarts are trainer/relora.py's)."""
    if cfg.method == "none":
        return []
    return apply_lora(model, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, seed=seed)


def adapter_seed(seed: int, reset_index: int) -> int:
    """A 64-bit generator seed for (run.seed, reset index), well mixed (numpy's SeedSequence), so
    neighbouring seeds or indices give unrelated streams."""
    return int(np.random.SeedSequence([seed, reset_index, 0x10AA]).generate_state(1, np.uint64)[0])


@torch.no_grad()
def reinit_adapters(model: nn.Module, *, seed: int, reset_index: int) -> None:
    """A <- Kaiming-uniform(a=sqrt(5)) from the generator of (seed, reset_index), drawn in module
    order; B <- 0. The adapters then contribute exactly zero."""
    gen = torch.Generator().manual_seed(adapter_seed(seed, reset_index))
    for _, m in lora_modules(model):
        a = torch.empty(m.lora_a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=gen)
        m.lora_a.copy_(a)
        m.lora_b.zero_()


@torch.no_grad()
def merge_adapters(model: nn.Module) -> None:
    """W += (alpha / r) B A for every adapter (product and sum in fp32, then cast to W's dtype),
    then B <- 0: the function is unchanged up to fp32 rounding. A is left as it is."""
    for _, m in lora_modules(model):
        delta = (m.lora_b.float() @ m.lora_a.float()).mul_(m.scale)
        m.weight.copy_(m.weight.float().add_(delta))
        m.lora_b.zero_()


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of a plain model (no adapter keys) computing the same function: each frozen
    weight with its adapter folded in (W + (alpha / r) B A, in fp32). The model is not changed."""
    model = getattr(model, "module", model)
    # Plain names, as lora_modules gives them: torch.compile's wrappers add `_orig_mod.` to the keys.
    state = {
        k.replace("_orig_mod.", ""): v
        for k, v in model.state_dict().items()
        if k.rsplit(".", 1)[-1] not in ADAPTER_PARAMS
    }
    for name, m in lora_modules(model):
        delta = (m.lora_b.float() @ m.lora_a.float()).mul_(m.scale)
        state[f"{name}.weight"] = (m.weight.float() + delta).to(m.weight.dtype)
    return state


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter matrix (A then B of each wrapped linear, in model order)."""
    return [p for _, m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """{total, trainable, frozen, adapter} element counts of `model`'s parameters (adapters included
    in total and trainable)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    adapter = sum(p.numel() for p in adapter_parameters(model))
    return {"total": total, "trainable": trainable, "frozen": total - trainable, "adapter": adapter}
