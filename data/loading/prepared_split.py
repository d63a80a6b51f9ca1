"""Opening a prepared split for training/eval, with every check done up front.

Checks (each error names the file and the fix): prepared dir / manifest present and intact
(valid JSON, the format's fields), tokenizer file present, tokenizer sha256 == the manifest's
(data made with another tokenizer is an error, not garbage training) and its vocabulary size
== the manifest's, the vocabulary fits the stored dtype, then the split's shard files as
data.verify says (verify.py: the manifest's checksums, shard presence and sizes, and unless
verify=off each shard's sha256 and token-id range). A source file that has changed size since
the split was prepared is a DataWarning, not an error: the prepared tokens are intact and are
what the run uses, but they no longer match the source (e.g. a cached sample corpus rebuilt by a
newer recipe while the tokens prepared from the old one were kept).

TrainBatches and validation_batches both open their split here, once per construction: a
process verifies each split it uses once.
"""

from __future__ import annotations

import warnings

import numpy as np

from data import manifest as mf
from data.config import DataConfig
from data.errors import DataError, DataWarning
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
    changed = mf.changed_source_files(info.get("source"))
    if changed:
        warnings.warn(
            f"the {split} split of {prepared_dir} was prepared from source files that have changed since: "
            f"{'; '.join(changed)}. The run uses the tokens as prepared. To train on the current files, prepare "
            f"them into a new --out (or delete {prepared_dir} and re-run its command: "
            f"{mf.rebuild_command(prepared_dir, manifest)[0]})",
            DataWarning,
            stacklevel=2,
        )
    return manifest, info, TokenStore(prepared_dir, info, manifest["dtype"])
