"""manifest.json of a prepared token directory: what is in it and how it was made.

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

import hashlib
import json
import os
import pathlib

from data.errors import DataError

FORMAT = "memopt-lm-tokens"
FORMAT_VERSION = 1
TOOL_VERSION = "memopt-lm-data 1.0"
MANIFEST = "manifest.json"


def split_checksum(dtype: str, tokenizer_sha256: str, shards: list[dict]) -> str:
    payload = json.dumps({"dtype": dtype, "tokenizer": tokenizer_sha256,
                          "shards": [[s["tokens"], s["docs"], s["sha256"]] for s in shards]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def overall_checksum(splits: dict) -> str:
    payload = json.dumps({name: s["checksum"] for name, s in sorted(splits.items())}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def write_json_atomic(path: pathlib.Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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
