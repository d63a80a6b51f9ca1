"""Writing manifest.json (format: data/manifest.py) and the checksums it carries.

A split's checksum covers its shards' content hashes and token counts and the
dtype/tokenizer, so it changes whenever the token stream could differ; the manifest's
checksum covers the splits' checksums. Training keys resume checks on them, and checks
them against the shard entries when it opens the data (data/manifest.py computes both,
for the writer here and for that check).
"""

from __future__ import annotations

import pathlib

import numpy as np

from data import manifest as mf
from data.files import write_json_atomic
from data.tokenizer import EOS_ID, PAD_ID


def write_manifest(
    out: pathlib.Path,
    splits: dict[str, dict],
    tokenizer_path: pathlib.Path,
    tok_sha: str,
    vocab_size: int,
    dtype: np.dtype,
) -> dict:
    """Write out/manifest.json for the given split entries; returns the manifest."""
    manifest = {
        "format": mf.FORMAT,
        "format_version": mf.FORMAT_VERSION,
        "tool_version": mf.TOOL_VERSION,
        "dtype": dtype.name,
        "tokenizer": {
            "path": str(tokenizer_path),
            "sha256": tok_sha,
            "vocab_size": vocab_size,
            "eos_id": EOS_ID,
            "pad_id": PAD_ID,
        },
        "splits": splits,
        "checksum": mf.overall_checksum(splits),
    }
    write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest
