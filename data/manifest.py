"""manifest.json of a prepared token directory: its format, and reading it.

Written once by preparation (data/preparation/manifest_writer.py), read by every run
(data/loading/prepared_split.py) and by preparation itself when resuming.

    {
      "format": "memopt-lm-tokens", "format_version": 1, "tool_version": "...",
      "dtype": "uint16",
      "tokenizer": {"path": ..., "sha256": ..., "vocab_size": 32000, "eos_id": 1, "pad_id": 0},
      "splits": {
        "train": {"tokens": N, "docs": D, "skipped": {"invalid_json": 0, ...},
                  "source": {...}, "limits": {...}, "checksum": sha256,
                  "shards": [{"file": "train-00000.bin", "tokens": n, "docs": d, "sha256": ...}, ...]},
        "validation": {...}
      },
      "checksum": sha256 over the splits' checksums
    }

A split's checksum is a sha256 over its shards' content hashes, token counts and the
dtype/tokenizer, so it changes whenever the token stream could differ.
"""

from __future__ import annotations

import json
import pathlib

from data.errors import DataError

FORMAT = "memopt-lm-tokens"
FORMAT_VERSION = 1
TOOL_VERSION = "memopt-lm-data 1.0"
MANIFEST = "manifest.json"


def read_manifest(prepared_dir: pathlib.Path) -> dict:
    """The manifest, or a DataError saying how to make it."""
    path = prepared_dir / MANIFEST
    if not path.is_file():
        what = "directory" if not prepared_dir.is_dir() else "manifest"
        raise DataError(
            f"prepared data {what} missing: {path} not found. Fix: run "
            "`python tools/prepare_data.py` (sample corpus; `make data`), or "
            f"`python tools/prepare_data.py --source <C4 dir or hf> --out {prepared_dir}`, "
            "or point data.prepared_dir at an existing prepared directory."
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} manifest. Fix: re-run tools/prepare_data.py.")
    return manifest


def split_info(manifest: dict, split: str, prepared_dir: pathlib.Path) -> dict:
    info = manifest["splits"].get(split)
    if info is None:
        raise DataError(
            f"{prepared_dir} has no prepared {split!r} split (has: {sorted(manifest['splits'])}). Fix: "
            f"run `python tools/prepare_data.py --split {split} --out {prepared_dir} --source <same source>`."
        )
    return info
