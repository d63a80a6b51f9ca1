"""Model configuration and the named sizes ("flavours", as torchtitan calls them)."""

from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM = 64  # fixed by the AdaMeM paper's setup: heads = width / 64


@dataclass
class ModelConfig:
    flavor: str = "tiny"  # one of FLAVORS; its values fill every field not set explicitly
    d_model: int = 128
    n_layers: int = 4
    mlp_ratio: int = 4
    # T5's 32100 ids padded up to a multiple of 128: matmul-friendly, ids >= 32100 never occur.
    vocab_size: int = 32128
    max_seq_len: int = 512  # RoPE table length; must be >= data.seq_len
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @property
    def n_heads(self) -> int:
        return self.d_model // HEAD_DIM

    def validate(self) -> None:
        if self.d_model % HEAD_DIM:
            raise ValueError(
                f"model.d_model={self.d_model} is not a multiple of the head dimension {HEAD_DIM}; "
                f"use e.g. --model.d_model={max(HEAD_DIM, round(self.d_model / HEAD_DIM) * HEAD_DIM)}"
            )
        for key in ("n_layers", "mlp_ratio", "vocab_size", "max_seq_len"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")


# The paper's sizes (AdaMeM, Section 5): widths 1024/1280, depths 12/24, MLP 4x, head dim 64.
FLAVORS: dict[str, dict] = {
    "tiny": dict(d_model=128, n_layers=4),
    "210m": dict(d_model=1024, n_layers=12),
    "550m": dict(d_model=1280, n_layers=24),
}
