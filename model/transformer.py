"""Decoder-only transformer of the AdaMeM paper's setup (OLMo-style, `model.arch: olmo`), or with
GaLore's LLaMA blocks (`model.arch: llama`, model/llama.py); the embedding, RoPE tables, final norm
and output layer below are shared, the block and norm types follow the arch.

OLMo arch. Pre-norm blocks: LayerNorm -> causal self-attention with RoPE -> residual; LayerNorm ->
GeLU MLP (hidden = ModelConfig.hidden_dim: mlp_ratio x width unless model.mlp_hidden is set) ->
residual. Final LayerNorm, untied output projection. No biases anywhere (Wortsman et al. 2024):
linears have bias=False and LayerNorms have no bias term. Query, key and value come from one fused
projection, as in OLMo's `att_proj`.

Initialisation (GPT-2 / nanoGPT scheme): every linear and the embedding ~ N(0, init_std) with
init_std = 0.02, except the two residual output projections (attention `out`, MLP `down`),
which use init_std / sqrt(2 * n_layers) so the residual stream's variance does not grow with
depth. LayerNorm weights start at 1. LayerNorm eps = model.norm_eps (1e-5, torch's default).

LLaMA arch: RMSNorm (eps = model.norm_eps) instead of LayerNorm, final norm included; initialised as
HF's LlamaPreTrainedModel._init_weights, which GaLore trains with: every linear and the embedding
~ N(0, init_std), norm weights 1, no residual scaling.

This file holds the model only: no optimizer, data or parallelism code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.llama import LlamaBlock
from model.loss import linear_cross_entropy_sum
from model.rms_norm import RMSNorm
from model.rope import apply_rope, rope_tables


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.hidden_dim, bias=False)
        self.down = nn.Linear(cfg.hidden_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id  # optimizers use it to pick groups ("first/last layers")
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    rope_cos: torch.Tensor  # buffers, declared for type checkers (register_buffer sets them)
    rope_sin: torch.Tensor

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        llama = cfg.arch == "llama"
        self.blocks = nn.ModuleList((LlamaBlock if llama else Block)(cfg, i) for i in range(cfg.n_layers))
        self.norm: nn.Module = (
            RMSNorm(cfg.d_model, cfg.norm_eps) if llama else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=False)
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Derived from the config, so not saved in checkpoints (persistent=False).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # GPT-2's depth scaling of the residual projections (OLMo arch); HF's LLaMA init has none.
        residual_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.arch == "olmo" else std
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)  # LayerNorm / RMSNorm weights
            elif name.endswith(("attn.out.weight", "mlp.down.weight")):
                nn.init.normal_(p, mean=0.0, std=residual_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def _chunked_loss_is_smaller(self, n_tokens: int) -> bool:
        """Whether the chunked loss may replace the plain one for `n_tokens` targets. It may not when lm_head's
        forward is replaced (GaLore's projected backward: optim/projected_backward.py), which must run. From
        forward to backward the chunked loss keeps the output layer's fp32 weight gradient (vocab x d) where the
        plain one keeps the fp32 log-probabilities (tokens x vocab): with a gradient to keep and no more tokens than
        the width (llama_7b at micro-batch 4: 2048 tokens, d 4096), the plain loss is the smaller."""
        if "forward" in vars(self.lm_head):
            return False
        keeps_weight_grad = torch.is_grad_enabled() and self.lm_head.weight.requires_grad
        return not keeps_weight_grad or n_tokens > self.cfg.d_model

    def forward(
        self, tokens: torch.Tensor, targets: torch.Tensor | None = None, loss_chunk_tokens: int = 0
    ) -> torch.Tensor:
        """tokens: (batch, seq) int64 -> logits (batch, seq, vocab_size); with `targets` (batch, seq) the summed
        token cross-entropy instead (fp32, 0-d): `loss_chunk_tokens` > 0 computes it with the output layer
        chunk by chunk, never holding the full logits (model/loss.py), where that is the smaller (see
        _chunked_loss_is_smaller); 0 from the full logits. The loss is
        part of forward so that engines which gather parameters around it (FSDP2, ZeRO-3) see the output
        layer used."""
        t = tokens.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x)
        if loss_chunk_tokens > 0 and self._chunked_loss_is_smaller(targets.numel()):
            return linear_cross_entropy_sum(x, self.lm_head.weight, targets, loss_chunk_tokens)
        logits = self.lm_head(x)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
