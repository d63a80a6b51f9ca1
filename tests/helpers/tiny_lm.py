"""A tiny LM, fixed token batches and its loss, shared by the optimizer tests."""

import torch

from model import ModelConfig, Transformer


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(d_model=64, n_layers=2, vocab_size=512, max_seq_len=32))


def batch(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(0, 512, (2, 17), generator=g)


def loss_of(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
