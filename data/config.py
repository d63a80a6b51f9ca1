"""The `data` config section."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # A prepared token directory (manifest.json + token shards), made by tools/prepare_data.py.
    prepared_dir: str = ".cache/tokens/sample"
    # SentencePiece model: "t5" = the cached T5 spiece.model (tools/fetch_assets.py), or a path.
    tokenizer: str = "t5"
    seq_len: int = 512
    # Windows are shuffled by a permutation drawn from (seed, epoch); identical on any rank count.
    seed: int = 1234
    num_workers: int = 0  # DataLoader worker processes for training batches
    # Validation: the first val_tokens tokens of the validation split, identical for every run.
    val_tokens: int = 1_048_576
