"""Opening a prepared split for training/eval, with every check done up front.

Checks (each error names the fix): prepared dir / manifest present, tokenizer file
present, tokenizer sha256 == the manifest's (data made with another tokenizer is an
error, not garbage training), the vocabulary fits the stored dtype, shard files
intact (sizes).
"""

from __future__ import annotations

import pathlib

import numpy as np

from data import manifest as mf
from data.config import DataConfig
from data.errors import DataError
from data.loading.token_store import TokenStore
from data.paths import resolve_path
from data.tokenizer import check_tokenizer_matches, load_tokenizer, resolve_tokenizer_path, token_dtype


def open_split(cfg: DataConfig, split: str) -> tuple[dict, dict, TokenStore]:
    """(manifest, split entry, token store) for a split of cfg.prepared_dir."""
    prepared_dir = resolve_path(cfg.prepared_dir)
    manifest = mf.read_manifest(prepared_dir)
    tokenizer_path = resolve_tokenizer_path(cfg.tokenizer)
    check_tokenizer_matches(manifest["tokenizer"]["sha256"], tokenizer_path, f"prepared data {prepared_dir}")
    vocab = load_tokenizer(tokenizer_path).vocab_size()
    stored = np.dtype(manifest["dtype"])
    if token_dtype(vocab).itemsize > stored.itemsize:
        raise DataError(
            f"tokenizer vocab_size={vocab} does not fit the {stored.name} token storage of {prepared_dir}. "
            "Fix: re-run tools/prepare_data.py (it picks uint32 for vocabularies >= 65536)."
        )
    info = mf.split_info(manifest, split, prepared_dir)
    return manifest, info, TokenStore(pathlib.Path(prepared_dir), info, manifest["dtype"])
