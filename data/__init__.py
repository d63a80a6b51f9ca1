"""memopt-lm data layer: C4-style text -> token shards -> training/validation batches.

    tools/fetch_assets.py    T5 tokenizer + sample corpus into the cache
    tools/prepare_data.py    text shards (local or HF hub) -> token shards + manifest.json
    TrainBatches             step-indexed, rank-sliced training batches (data/windows.py: the order)
    validation_batches       fixed validation windows

TrainBatches / validation_batches are imported lazily so the tools (and their worker
processes) do not pay for importing torch.
"""

from __future__ import annotations

from data.config import DataConfig
from data.errors import DataError
from data.tokenizer import resolve_tokenizer_path

__all__ = ["DataConfig", "DataError", "TrainBatches", "resolve_tokenizer_path", "validation_batches"]


def __getattr__(name: str):
    if name == "TrainBatches":
        from data.train_batches import TrainBatches

        return TrainBatches
    if name == "validation_batches":
        from data.validation import validation_batches

        return validation_batches
    raise AttributeError(f"module 'data' has no attribute {name!r}")
