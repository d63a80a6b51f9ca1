"""Closed-form parameter and FLOP counts for a ModelConfig."""

from __future__ import annotations

from model.config import ModelConfig


def block_params(cfg: ModelConfig) -> int:
    """One block's parameters: attention 4 d^2 (q, k, v, fused (olmo) or separate (llama), and the output
    projection), MLP 2 d h (olmo: up, down) or 3 d h (llama's SwiGLU: gate, up, down) with h = hidden_dim,
    and two norm weights of d each (no biases anywhere)."""
    d, h = cfg.d_model, cfg.hidden_dim
    attention = 3 * d * d + d * d
    mlp = (3 if cfg.arch == "llama" else 2) * d * h
    norms = 2 * d
    return attention + mlp + norms


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """total, non_embedding (blocks + final norm d) and embedding (input table + untied output layer, 2 V d)."""
    embedding = 2 * cfg.vocab_size * cfg.d_model  # untied
    non_embedding = cfg.n_layers * block_params(cfg) + cfg.d_model
    return {"total": embedding + non_embedding, "non_embedding": non_embedding, "embedding": embedding}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token.

    6 * N_non_embedding for the weight matmuls, 12 * layers * width * seq_len for attention scores
    and values (Kaplan et al. / PaLM appendix B, without the causal halving), and 6 * width * vocab
    for the output layer. The input embedding is a lookup and costs nothing.
    """
    n = param_counts(cfg)["non_embedding"]
    return 6 * n + 12 * cfg.n_layers * cfg.d_model * seq_len + 6 * cfg.d_model * cfg.vocab_size
