"""Model configuration and the named sizes ("flavours", as torchtitan calls them)."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass
from typing import Any, Literal

Arch = Literal["olmo", "llama"]
HEAD_DIM = 64  # model.head_dim's default: the AdaMeM paper's setup and GaLore's LLaMA up to 1B (heads = width / 64)


@dataclass
class ModelConfig:
    flavor: str = "tiny"
    """A named size (one of FLAVORS: tiny, 210m, 550m, llama_60m, llama_130m, llama_350m, llama_1b, llama_7b); its
    values fill every field not set explicitly."""
    arch: Arch = "olmo"
    """Block design: olmo = LayerNorm + fused QKV + GeLU MLP, GPT-2 init (the AdaMeM paper); llama = RMSNorm + separate
    q/k/v + SwiGLU MLP, normal(0.02) init (GaLore's LLaMA). Both: RoPE, no biases, untied output."""
    d_model: int = 128
    """Width (residual stream); a multiple of head_dim."""
    head_dim: int = HEAD_DIM
    """Width of each attention head: heads = d_model / head_dim (64; LLaMA-7B: 128, i.e. 32 heads)."""
    n_layers: int = 4
    """Transformer blocks."""
    mlp_ratio: int = 4
    """MLP hidden width = mlp_ratio * d_model (unless mlp_hidden is set)."""
    mlp_hidden: int | None = None
    """MLP hidden width, overriding mlp_ratio (GaLore's LLaMA: 1376 at width 512); null = mlp_ratio x width."""
    norm_eps: float = 1e-5
    """Epsilon of the normalisation layers (LayerNorm's default 1e-5; LLaMA's RMSNorm 1e-6)."""
    vocab_size: int = 32128
    """Embedding rows: T5's 32100 ids padded up to a multiple of 128 (matmul-friendly; ids >= 32100 never occur)."""
    max_seq_len: int = 512
    """RoPE table length; must be >= data.seq_len."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    init_std: float = 0.02
    """Std of the normal init (olmo arch: residual projections get init_std / sqrt(2 n_layers); llama: none do)."""

    @classmethod
    def from_flavor(cls, flavor: str, **overrides: Any) -> ModelConfig:
        """The flavour's sizes with `overrides` on top, e.g. `ModelConfig.from_flavor("210m", max_seq_len=1024)`."""
        if flavor not in FLAVORS:
            close = difflib.get_close_matches(flavor, FLAVORS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown model.flavor {flavor!r}.{hint} Flavours: {', '.join(FLAVORS)}")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(cls)} - {"flavor"}
        if unknown:
            raise TypeError(f"unknown ModelConfig fields {sorted(unknown)}")
        return cls(**{**FLAVORS[flavor], **overrides, "flavor": flavor})

    @property
    def hidden_dim(self) -> int:
        """The MLP's hidden width."""
        return self.mlp_hidden if self.mlp_hidden is not None else self.mlp_ratio * self.d_model

    @property
    def n_heads(self) -> int:
        return self.d_model // self.head_dim

    def validate(self) -> None:
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"model.head_dim={self.head_dim} must be a positive even number (RoPE rotates pairs)")
        hd = self.head_dim
        if self.d_model <= 0 or self.d_model % hd:
            raise ValueError(
                f"model.d_model={self.d_model} is not a positive multiple of the head dimension {hd} (model.head_dim); "
                f"use e.g. --model.d_model={max(hd, round(self.d_model / hd) * hd)}"
            )
        if self.mlp_hidden is not None and self.mlp_hidden <= 0:
            raise ValueError(f"model.mlp_hidden must be positive or null, got {self.mlp_hidden}")
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps must be positive, got {self.norm_eps}")
        for key in ("n_layers", "mlp_ratio", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")


# The paper's sizes (AdaMeM, Section 5): widths 1024/1280, depths 12/24, MLP 4x, head dim 64.
FLAVORS: dict[str, dict[str, Any]] = {
    "tiny": dict(d_model=128, n_layers=4),
    "210m": dict(d_model=1024, n_layers=12),
    "550m": dict(d_model=1280, n_layers=24),
    # GaLore's LLaMA family (jiaweizzhao/GaLore configs/llama_*.json): RMSNorm eps 1e-6, SwiGLU, head dim 64 but
    # 7B's 128 (its 32 heads).
    # vocab: T5's 32100 ids padded to 32128 as above (GaLore's configs say 32000).
    "llama_60m": dict(arch="llama", d_model=512, n_layers=8, mlp_hidden=1376, norm_eps=1e-6, max_seq_len=1024),
    "llama_130m": dict(arch="llama", d_model=768, n_layers=12, mlp_hidden=2048, norm_eps=1e-6, max_seq_len=1024),
    "llama_350m": dict(arch="llama", d_model=1024, n_layers=24, mlp_hidden=2736, norm_eps=1e-6, max_seq_len=1024),
    "llama_1b": dict(arch="llama", d_model=2048, n_layers=24, mlp_hidden=5461, norm_eps=1e-6, max_seq_len=1024),
    "llama_7b": dict(
        arch="llama", d_model=4096, head_dim=128, n_layers=32, mlp_hidden=11008, norm_eps=1e-6, max_seq_len=1024
    ),
}
