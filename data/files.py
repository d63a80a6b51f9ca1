"""File helpers shared by every stage: content hashes, and writes that are never half done.

A file is written under a temporary name beside its final path (`<name>.tmp`, same
directory, so the same filesystem) and moved into place with os.replace, which is
atomic: a crash or Ctrl-C leaves either the old file or the new one, never a truncated
one that a later run would take for complete (resumable preparation and cache checks
rely on that).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def partial_path(path: pathlib.Path) -> pathlib.Path:
    """Where `path` is written until it is complete: `<name>.tmp` beside it."""
    return path.with_name(path.name + ".tmp")


def write_bytes_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = partial_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_json_atomic(path: pathlib.Path, obj: dict) -> None:
    """Indented JSON with a final newline (manifests, sidecars and stamps are read by people too)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode())
