from model.config import FLAVORS, HEAD_DIM, ModelConfig
from model.flops import flops_per_token, param_counts
from model.transformer import Transformer

__all__ = ["FLAVORS", "HEAD_DIM", "ModelConfig", "Transformer", "flops_per_token", "param_counts"]
