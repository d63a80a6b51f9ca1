"""Opening a prepared split for training/eval, with every check done up front.

Checks (each error names the file and the fix): prepared dir / manifest present and intact
(valid JSON, the format's fields), tokenizer file present, tokenizer sha256 == the manifest's
(data made with another tokenizer is an error, not garbage training) and its vocabulary size
== the manifest's, the vocabulary fits the stored dtype, then the split's shard files as
data.verify says (verify.py: the manifest's checksums, shard presence and sizes, and unless
verify=off each shard's sha256 and token-id range).

TrainBatches and validation_batches both open their split here, once per construction: a
process verifies each split it uses once.
"""

from __future__ import annotations

import numpy as np

from data import manifest as mf
from data.config import DataConfig
from data.errors import DataError
from data.loading.token_store import TokenStore
from data.loading.verify import verify_split
from data.paths import resolve_path
from data.tokenizer import check_tokenizer_matches, load_tokenizer, resolve_tokenizer_path, token_dtype


def open_split(cfg: DataConfig, split: str) -> tuple[dict, dict, TokenStore]:
    """(manifest, split entry, token store) for a split of cfg.prepared_dir."""
    prepared_dir = resolve_path(cfg.prepared_dir)
    manifest = mf.read_manifest(prepared_dir)
    tokenizer_path = resolve_tokenizer_path(cfg.tokenizer)
    check_tokenizer_matches(manifest["tokenizer"]["sha256"], tokenizer_path, f"prepared data {prepared_dir}")
    vocab = load_tokenizer(tokenizer_path).vocab_size()
    if manifest["tokenizer"]["vocab_size"] != vocab:
        raise DataError(
            f"{prepared_dir / mf.MANIFEST} records tokenizer vocab_size={manifest['tokenizer']['vocab_size']}, but "
            f"its tokenizer {tokenizer_path} (same sha256) has {vocab} ids: the manifest was edited or damaged. "
            f"{mf.rebuild_hint(prepared_dir, manifest)}"
        )
    stored = np.dtype(manifest["dtype"])
    if token_dtype(vocab).itemsize > stored.itemsize:
        raise DataError(
            f"tokenizer vocab_size={vocab} does not fit the {stored.name} token storage of {prepared_dir}. "
            "Fix: re-run tools/prepare_data.py (it picks uint32 for vocabularies >= 65536)."
        )
    info = mf.split_info(manifest, split, prepared_dir)
    verify_split(prepared_dir, manifest, split, cfg.verify)
    return manifest, info, TokenStore(prepared_dir, info, manifest["dtype"])
