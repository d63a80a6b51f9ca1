from model.config import FLAVORS, HEAD_DIM, ModelConfig
from model.flops import flops_per_token, param_counts
from model.loss import DEFAULT_CHUNK_TOKENS, linear_cross_entropy_sum
from model.transformer import Transformer

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "FLAVORS",
    "HEAD_DIM",
    "ModelConfig",
    "Transformer",
    "flops_per_token",
    "linear_cross_entropy_sum",
    "param_counts",
]
