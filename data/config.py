"""The `data` config section (`--data.<field>` on train.py's command line).

Each field's docstring is its one-line help. Fields with a fixed set of choices are typed
Literal (the config loader checks the value against them); `tokenizer` is "t5" or any
path, so a plain str.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DataConfig:
    prepared_dir: str = ".cache/tokens/sample"
    """Prepared token directory (manifest.json + shards) from tools/prepare_data.py; relative to the repo root."""
    tokenizer: str = "t5"
    """SentencePiece model: "t5" = the cached T5 spiece.model (tools/fetch_assets.py), or a .model path."""
    seq_len: int = 512
    """Tokens per training window (each window also needs the next token as the target)."""
    seed: int = 1234
    """Seed of the window shuffle: epoch e's order is a permutation drawn from (seed, e), the same on any rank count."""
    num_workers: int = 0
    """DataLoader worker processes reading training batches (0 = in the training process)."""
    val_tokens: int = 1_048_576
    """Validation uses the first val_tokens tokens of the validation split: identical for every run."""
    verify: Literal["quick", "full", "off"] = "quick"
    """Shard checks (sha256, id range): quick = once per file until it changes; full = every run; off = sizes only."""
