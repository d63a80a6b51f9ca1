"""File helpers shared by every stage: content hashes, and writes that are never half done.

Hashes stream the file in BLOCK-sized reads into one reused buffer, so memory stays flat
whatever the file size. `shard_digest` also returns a token shard's largest id, from the
same blocks (one read of the file for both).

A file is written under a temporary name beside its final path (`<name>.tmp`, same
directory, so the same filesystem) and moved into place with os.replace, which is
atomic: a crash or Ctrl-C leaves either the old file or the new one, never a truncated
one that a later run would take for complete (resumable preparation and cache checks
rely on that). Where several processes may write the same file at once (the verification
cache, written by every rank of a run; a run directory's config and metrics, see
trainer/run_lock.py), `unique_tmp=True` gives each writer its own temporary name
(`unique_temp_path`: `<name>.<pid>.<8 hex>.tmp`) and fsyncs it before the rename: the last
os.replace wins and the file is always one writer's whole file, on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import secrets
from collections.abc import Iterator
from typing import Any, BinaryIO

import numpy as np

BLOCK = 8 << 20
"""Bytes per read when hashing (8 MiB: large enough for full disk/page-cache speed; a multiple of every token size)."""


def _read_block(f: io.FileIO, view: memoryview) -> int:
    """Fill `view` from `f` (short reads retried); the byte count, < len(view) only at the end of the file."""
    n = 0
    while n < len(view):
        got = f.readinto(view[n:])
        if not got:
            break
        n += got
    return n


def _buffer(f: io.FileIO, block: int, itemsize: int = 1) -> bytearray:
    """A read buffer of `block` bytes, or less for a smaller file (allocating 8 MiB costs ~1 ms); whole items."""
    size = min(block, max(os.fstat(f.fileno()).st_size, itemsize))
    return bytearray(-(-size // itemsize) * itemsize)


def sha256_file(path: str | os.PathLike, chunk: int = BLOCK) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        view = memoryview(_buffer(f, chunk))
        while n := _read_block(f, view):
            h.update(view[:n])
    return h.hexdigest()


def shard_digest(path: str | os.PathLike, dtype: np.dtype | str) -> tuple[str, int]:
    """(sha256, largest token id) of a token shard in one streaming pass; the id is -1 for an empty file.

    Trailing bytes that do not make a whole token are hashed but not read as an id.
    """
    dtype = np.dtype(dtype)
    h = hashlib.sha256()
    top = -1
    with open(path, "rb", buffering=0) as f:
        buf = _buffer(f, BLOCK - BLOCK % dtype.itemsize, dtype.itemsize)
        view = memoryview(buf)
        while n := _read_block(f, view):
            h.update(view[:n])
            count = n // dtype.itemsize
            if count:
                top = max(top, int(np.frombuffer(buf, dtype=dtype, count=count).max()))
    return h.hexdigest(), top


def partial_path(path: pathlib.Path) -> pathlib.Path:
    """Where `path` is written until it is complete: `<name>.tmp` beside it."""
    return path.with_name(path.name + ".tmp")


def unique_temp_path(final: pathlib.Path) -> pathlib.Path:
    """`final`'s temporary name for one writer: pid and a random suffix, so no two writers share it."""
    return final.with_name(f"{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


@contextlib.contextmanager
def _replacing_file(path: pathlib.Path, tmp: pathlib.Path, *, fsync: bool) -> Iterator[BinaryIO]:
    """A binary file `tmp` to write `path`'s new contents into, (fsynced and) moved over `path` when the block
    ends. Whatever goes wrong inside (an OSError, Ctrl-C), `tmp` is removed and `path` is unchanged."""
    try:
        with open(tmp, "wb") as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # e.g. a read-only file system: the error to raise is the first one
            tmp.unlink(missing_ok=True)
        raise


def unique_atomic_file(path: pathlib.Path) -> contextlib.AbstractContextManager[BinaryIO]:
    """A binary file to write `path`'s new contents into: its own unique temporary file, fsynced and moved over
    `path` when the block ends. Whatever goes wrong inside (an OSError, Ctrl-C), the temporary file is removed
    and `path` is unchanged."""
    return _replacing_file(path, unique_temp_path(path), fsync=True)


def write_bytes_atomic(path: pathlib.Path, data: bytes, *, unique_tmp: bool = False) -> None:
    """Write `data` to `path` atomically (see the module doc); unique_tmp for files several processes
    write. Whatever goes wrong (an OSError, Ctrl-C), no temporary file is left behind and `path` is unchanged."""
    tmp = unique_temp_path(path) if unique_tmp else partial_path(path)
    with _replacing_file(path, tmp, fsync=unique_tmp) as f:
        f.write(data)


def read_json(path: pathlib.Path) -> Any:
    """The JSON value in `path`, or None when it is missing, unreadable or not JSON (e.g. cut short by a crash):
    the caller treats it as absent, and checks the value's shape itself."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):  # ValueError: json.JSONDecodeError, UnicodeDecodeError
        return None


def write_json_atomic(path: pathlib.Path, obj: dict, *, unique_tmp: bool = False) -> None:
    """Indented JSON with a final newline (manifests, sidecars and stamps are read by people too)."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2) + "\n").encode(), unique_tmp=unique_tmp)
