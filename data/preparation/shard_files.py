"""Token shard files of a prepared split: writing them, and finding the finished ones.

Shard i of a split is `<split>-<i:05d>.bin` (raw little-endian uint16/uint32 token ids)
with a sidecar `<split>-<i:05d>.json` (tokens, docs, skipped records, sha256, the source
cursors before and after it, what closed it). A shard is written as `*.bin.tmp`, renamed
only when complete, then its sidecar is written: a shard counts as finished only if both
files exist and the size matches, so an interrupted run never leaves a shard that looks
finished, and re-running resumes after the last finished one. Resuming re-hashes the
finished shards, so one damaged later (same size, other content) is redone too.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import os
import pathlib

import numpy as np

from data.files import partial_path, read_json, sha256_file, write_json_atomic
from data.manifest import is_count, is_sha256


def shard_path(out: pathlib.Path, split: str, index: int) -> pathlib.Path:
    return out / f"{split}-{index:05d}.bin"


def sidecar_path(shard: pathlib.Path) -> pathlib.Path:
    return shard.with_suffix(".json")


class ShardWriter:
    """The shard being filled: a temp file that grows, hashed as written."""

    def __init__(self, path: pathlib.Path, start_cursor: object):
        self.path, self.start_cursor = path, start_cursor
        self.end_cursor = start_cursor
        self.tokens = self.docs = 0
        self.skipped: collections.Counter[str] = collections.Counter()
        self.tmp = partial_path(path)
        self.file = open(self.tmp, "wb")  # open across appends; finish / discard / abandon close it
        self.hash = hashlib.sha256()

    def append(self, ids: np.ndarray) -> None:
        data = ids.tobytes()  # native little-endian on all supported hosts
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(ids)

    def finish(self, dtype: np.dtype, closed_by: str) -> dict:
        """Make the shard final (fsync, rename, sidecar); returns its sidecar metadata."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        meta = {
            "file": self.path.name,
            "tokens": self.tokens,
            "docs": self.docs,
            "skipped": dict(self.skipped),
            "sha256": self.hash.hexdigest(),
            "start_cursor": self.start_cursor,
            "end_cursor": self.end_cursor,
            "closed_by": closed_by,
            "dtype": dtype.name,
        }
        write_json_atomic(sidecar_path(self.path), meta)
        return meta

    def discard(self) -> None:
        """Drop the (empty) shard: close and delete its temp file."""
        self.file.close()
        self.tmp.unlink()

    def abandon(self) -> None:
        """Interrupted: close the temp file and leave it; it is never taken for a finished shard."""
        if not self.file.closed:
            self.file.close()


def finished_shards(out: pathlib.Path, split: str, dtype: np.dtype) -> list[dict]:
    """Consecutive finished shards from index 0.

    A shard without a readable, well-formed sidecar, of the wrong size or whose content no longer
    has the sidecar's sha256 (damaged after it was written) is not finished: it is redone, with
    those after it.
    """
    shards = []
    for i in itertools.count():
        bin_path = shard_path(out, split, i)
        meta_path = sidecar_path(bin_path)
        if not (bin_path.is_file() and meta_path.is_file()):
            break
        meta = _read_sidecar(meta_path, bin_path.name)
        if meta is None:
            break
        if bin_path.stat().st_size != meta["tokens"] * dtype.itemsize or sha256_file(bin_path) != meta["sha256"]:
            break
        shards.append(meta)
    return shards


def _read_sidecar(path: pathlib.Path, shard_name: str) -> dict | None:
    """The sidecar with the fields resuming uses (ShardWriter.finish writes them), or None when it cannot be
    read or lacks one: the shard is then not finished, and redoing it rewrites the sidecar."""
    meta = read_json(path)
    if not (
        isinstance(meta, dict)
        and meta.get("file") == shard_name
        and is_count(meta.get("tokens"))
        and is_count(meta.get("docs"))
        and is_sha256(meta.get("sha256"))
        and isinstance(meta.get("skipped"), dict)
        and all(is_count(n) for n in meta["skipped"].values())
        and meta.get("closed_by") in ("size", "limit", "end")
        and "end_cursor" in meta
    ):
        return None
    return meta
