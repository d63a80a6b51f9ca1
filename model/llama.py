"""The LLaMA-style transformer block (`model.arch: llama`), as GaLore trains it (jiaweizzhao/GaLore,
peft_pretraining/modeling_llama.py, i.e. HF's LlamaDecoderLayer of transformers 4.28).

Pre-norm: x + out(attention(RMSNorm(x))), then x + down(silu(gate(h)) * up(h)) with h = RMSNorm(x).
- Attention: *separate* q, k, v projections (each d x d) and the output projection `out` (d x d), so a
  low-rank optimizer projects each of the four on its own, as GaLore does on LLaMA (the OLMo block
  fuses q, k, v into one 3d x d matrix instead). Heads of dimension 64; RoPE on q and k in the
  rotate-half layout (model/rope.py, the same tables as the OLMo block and as HF's LLaMA: dims i and
  i + 32 of a head share a frequency); causal softmax attention with scale 1/sqrt(64) (SDPA's default).
- SwiGLU MLP (Shazeer 2020): down(silu(gate(x)) * up(x)), gate and up d -> hidden, down hidden -> d,
  hidden = ModelConfig.hidden_dim (GaLore's intermediate_size, e.g. 1376 at width 512).
- RMSNorm (model/rms_norm.py) with eps = model.norm_eps; no biases anywhere.

Parameter names mirror the OLMo block's (`attn.*`, `mlp.*`, `attn_norm`, `mlp_norm`) so that the
optimizers' roles (optim/param_groups.py: `blocks.<i>.` = block matrix, 1-D = norm) apply unchanged.
Initialisation is the Transformer's (model/transformer.py). This file holds the model only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.rms_norm import RMSNorm
from model.rope import apply_rope


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        d = cfg.d_model
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (batch, heads, seq, head_dim): head j is columns [hd j, hd (j + 1)) (HF's view)."""
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = apply_rope(self.heads(self.q(x)), cos, sin)
        k = apply_rope(self.heads(self.k(x)), cos, sin)
        y = F.scaled_dot_product_attention(q, k, self.heads(self.v(x)), is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # optimizers use it to pick groups ("first/last layers"), as the OLMo block
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = LlamaAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))
