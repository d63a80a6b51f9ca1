"""Verifying a prepared split's shard files when a run opens it (data.verify).

Modes (DataConfig.verify):

    quick  (default) each shard's sha256 and largest token id are computed once, then trusted
           while the file's (size, mtime_ns, ctime_ns, inode) is unchanged: those are recorded in
           the verification cache. Any rewrite of a shard changes its mtime and ctime (a restored
           mtime still leaves a new ctime) or its inode (a replaced file), so it is hashed again.
    full   every shard of the split is hashed on every open (the cache is refreshed, not used).
    off    only the files' presence and sizes are checked: nothing is read, so neither content
           hashes nor the token-id range are checked. For huge sets on trusted storage.

In every mode the manifest is checked against itself first (data/manifest.py check_checksums:
edited sha256 values in it are caught), and each shard must exist with the size its token count
implies. Hashing checks each shard's sha256 against the manifest's and its largest id against the
tokenizer's vocabulary (the same read: data/files.py shard_digest). Shards are hashed in a few
threads (hashlib and numpy release the GIL), each with one 8 MiB buffer: memory stays flat.

The verification cache is a small JSON file:

    {"format": "memopt-lm-verified", "version": 1, "prepared_dir": "/abs/dir",
     "shards": {"train-00000.bin": {"size": ..., "mtime_ns": ..., "ctime_ns": ..., "ino": ...,
                                    "sha256": "...", "max_id": 31999}, ...}}

It lives at `<prepared_dir>/.verified.json` when that directory is writable, else at
`<cache root>/verified/<sha256 of the directory's path, 16 hex>.json` (data/paths.py cache_root).
It records what the files hold, not whether they passed: the manifest comparison is redone on
every open. A file changed in the last 2 seconds is not recorded (RACY_NS): it is hashed again
next time. A cache that cannot be read or parsed is ignored (and rewritten); one that cannot be
written is skipped (the next run hashes again). Every rank of a distributed run verifies and may
write it at the same time: each write is an atomic replace of a whole file, so the worst case is a
lost update, i.e. a shard hashed again by a later run.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import pathlib
import time
from typing import Literal

import numpy as np

from data import manifest as mf
from data.errors import DataError
from data.files import read_json, shard_digest, write_json_atomic
from data.paths import cache_root

VerifyMode = Literal["quick", "full", "off"]
MODES: tuple[VerifyMode, ...] = ("quick", "full", "off")
CACHE_NAME = ".verified.json"
CACHE_FORMAT = "memopt-lm-verified"
CACHE_VERSION = 1
MAX_THREADS = 4
"""Shards hashed at once (each thread reads one shard at a time; every rank of a run does this)."""

RACY_NS = 2_000_000_000
"""A file changed less than this long ago is hashed but not cached: file-system timestamps are coarse (a
clock tick; seconds on some network file systems), so an in-place rewrite right after hashing could
leave (size, mtime, ctime, inode) as they were (git's "racily clean" files)."""

_STAT_KEYS = ("size", "mtime_ns", "ctime_ns", "ino")


def _writable(directory: pathlib.Path) -> bool:
    return os.access(directory, os.W_OK)


def cache_file(prepared_dir: pathlib.Path) -> pathlib.Path:
    """Where the verification cache of prepared_dir lives (see the module doc)."""
    prepared_dir = prepared_dir.resolve()
    if _writable(prepared_dir):
        return prepared_dir / CACHE_NAME
    key = hashlib.sha256(str(prepared_dir).encode()).hexdigest()[:16]
    return cache_root() / "verified" / f"{key}.json"


def hash_threads(n_files: int) -> int:
    """Threads hashing n_files shards: at most MAX_THREADS, the CPU count and the file count."""
    return max(1, min(MAX_THREADS, os.cpu_count() or 1, n_files))


def _stat_key(st: os.stat_result) -> dict[str, int]:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "ino": st.st_ino}


def _load_cache(path: pathlib.Path) -> dict[str, dict]:
    """The cached shard entries; {} for a missing, unreadable or malformed cache (it is rebuilt)."""
    cache = read_json(path)
    if not isinstance(cache, dict) or (cache.get("format"), cache.get("version")) != (CACHE_FORMAT, CACHE_VERSION):
        return {}
    shards = cache.get("shards")
    if not isinstance(shards, dict):
        return {}
    return {
        name: e
        for name, e in shards.items()
        if isinstance(e, dict)
        and all(isinstance(e.get(k), int) for k in (*_STAT_KEYS, "max_id"))
        and isinstance(e.get("sha256"), str)
    }


def _save_cache(path: pathlib.Path, prepared_dir: pathlib.Path, fresh: dict[str, dict], keep: set[str]) -> None:
    """Merge fresh entries into the cache file as it is now (another rank may have written it); drop
    entries of files the manifest no longer lists. Best effort: a cache that cannot be written is skipped."""
    entries = {k: v for k, v in _load_cache(path).items() if k in keep}
    entries.update(fresh)
    cache = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "prepared_dir": str(prepared_dir.resolve()),
        "note": "what each shard held when last hashed (data.verify=quick); safe to delete",
        "shards": dict(sorted(entries.items())),
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, cache, unique_tmp=True)
    except OSError:
        pass


def _hash(path: pathlib.Path, dtype: np.dtype) -> tuple[dict[str, int], str, int]:
    """(stat key, sha256, max id) of a shard. The stat key is {} (not to be cached) if the file changed while
    being hashed, or so recently that a next change could carry the same timestamps (see RACY_NS)."""
    before = _stat_key(path.stat())
    sha, max_id = shard_digest(path, dtype)
    after = _stat_key(path.stat())
    racy = time.time_ns() - max(after["mtime_ns"], after["ctime_ns"]) < RACY_NS
    return (before if before == after and not racy else {}), sha, max_id


def verify_split(
    prepared_dir: pathlib.Path,
    manifest: dict,
    split: str,
    mode: VerifyMode,
    *,
    cache: pathlib.Path | None = None,
) -> dict[str, int]:
    """Check split's shard files (see the module doc); DataError naming the file and the fix.

    `cache` overrides the cache file's location (benchmarks). Returns how many shards were
    found, size-checked, hashed and taken from the cache: {"shards", "hashed", "cached"}.
    """
    if mode not in MODES:
        raise DataError(f"data.verify={mode!r} is not one of {', '.join(MODES)}")
    mf.check_checksums(manifest, prepared_dir)
    dtype = np.dtype(manifest["dtype"])
    vocab = int(manifest["tokenizer"]["vocab_size"])
    shards = manifest["splits"][split]["shards"]
    stats: dict[str, dict[str, int]] = {}
    for s in shards:
        path = prepared_dir / s["file"]
        try:
            st = path.stat()
        except FileNotFoundError:
            raise DataError(
                f"token shard {path} is missing (listed in {prepared_dir / mf.MANIFEST}). "
                f"{mf.rebuild_hint(prepared_dir, manifest)}"
            ) from None
        expected = s["tokens"] * dtype.itemsize
        if st.st_size != expected:
            raise DataError(
                f"token shard {path} is damaged: expected {expected} bytes ({s['tokens']} {dtype.name} tokens), "
                f"found {st.st_size}. {mf.rebuild_hint(prepared_dir, manifest)}"
            )
        stats[s["file"]] = _stat_key(st)
    counts = {"shards": len(shards), "hashed": 0, "cached": 0}
    if mode == "off":
        return counts

    cache_path = cache if cache is not None else cache_file(prepared_dir)
    known = _load_cache(cache_path) if mode == "quick" else {}
    digests: dict[str, tuple[str, int]] = {}
    todo = []
    for s in shards:
        entry = known.get(s["file"])
        if entry is not None and all(entry[k] == stats[s["file"]][k] for k in _STAT_KEYS):
            digests[s["file"]] = (entry["sha256"], entry["max_id"])
        else:
            todo.append(s["file"])
    fresh: dict[str, dict] = {}
    if todo:
        with concurrent.futures.ThreadPoolExecutor(hash_threads(len(todo))) as pool:
            results = pool.map(lambda name: _hash(prepared_dir / name, dtype), todo)
            for name, (key, sha, max_id) in zip(todo, results, strict=True):
                digests[name] = (sha, max_id)
                if key:
                    fresh[name] = {**key, "sha256": sha, "max_id": max_id}
        keep = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
        _save_cache(cache_path, prepared_dir, fresh, keep)
    counts["hashed"], counts["cached"] = len(todo), len(shards) - len(todo)

    bad = [s for s in shards if digests[s["file"]][0] != s["sha256"]]
    if bad:
        first, others = bad[0], [s["file"] for s in bad[1:]]
        actual = digests[first["file"]][0]
        max_id = digests[first["file"]][1]
        ids = f"; it also holds token id {max_id}, outside the vocabulary of {vocab} ids" if max_id >= vocab else ""
        more = f" ({len(others)} more shard(s) of this split differ too: {', '.join(others)})" if others else ""
        raise DataError(
            f"token shard {prepared_dir / first['file']} does not hold what was prepared: its sha256 is "
            f"{actual[:16]}..., {prepared_dir / mf.MANIFEST} records {first['sha256'][:16]}... (the file was "
            f"changed or damaged after preparation{ids}){more}. {mf.rebuild_hint(prepared_dir, manifest)}"
        )
    for s in shards:
        max_id = digests[s["file"]][1]
        if max_id >= vocab:
            raise DataError(
                f"token shard {prepared_dir / s['file']} holds token id {max_id}, outside the vocabulary of "
                f"{vocab} ids (0..{vocab - 1}) of the tokenizer in {prepared_dir / mf.MANIFEST}: training would "
                f"index past the embedding. {mf.rebuild_hint(prepared_dir, manifest)}"
            )
    return counts
