"""Validation batches: fixed, in-order windows over the first val_tokens tokens.

The validation split is read from the start of its stream: windows of seq_len+1 tokens
with stride seq_len (as in training), no shuffling, the last batch possibly smaller.
The same prepared dir and config give identical batches in every run. If the prepared
validation split holds fewer than val_tokens tokens, all of it is used, never silently: a
DataWarning (data/errors.py) names both numbers and the fix. Still identical across runs,
since the prepared split is fixed.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from data.config import DataConfig
from data.errors import DataError, DataWarning
from data.loading.prepared_split import open_split
from data.loading.window_order import count_windows
from data.paths import resolve_path


def validation_batches(cfg: DataConfig, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    _, _, store = open_split(cfg, "validation")
    n_tokens = min(cfg.val_tokens, store.n_tokens)
    if n_tokens < cfg.val_tokens:
        warnings.warn(
            f"data.val_tokens={cfg.val_tokens} but the validation split of {resolve_path(cfg.prepared_dir)} "
            f"has {store.n_tokens} tokens: evaluating on all of them. Set --data.val_tokens={store.n_tokens} "
            "(or less) to silence this, or prepare a larger validation split with --val_tokens",
            DataWarning,
            stacklevel=2,
        )
    n = count_windows(n_tokens, cfg.seq_len)
    if n < 1:
        raise DataError(
            f"{n_tokens} validation tokens are too few for one window of seq_len+1={cfg.seq_len + 1}. Fix: raise "
            "data.val_tokens / prepare the validation split with a larger --val_tokens, or lower seq_len."
        )
    tokens = store.read(0, n * cfg.seq_len + 1)
    starts = np.arange(n) * cfg.seq_len
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(cfg.seq_len + 1)])
    return [
        (rows[i : i + batch_size, :-1].contiguous(), rows[i : i + batch_size, 1:].contiguous())
        for i in range(0, n, batch_size)
    ]
