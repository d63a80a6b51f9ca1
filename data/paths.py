"""Where things live: the repo root and the cache root.

Relative paths in configs are relative to the repo root (not the cwd), so a run
started from any directory finds the same files. The cache root is `<repo>/.cache`
(git-ignored) unless the env var MEMOPT_CACHE points elsewhere (e.g. a big disk).
"""

from __future__ import annotations

import os
import pathlib

from data.errors import DataError

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def cache_root() -> pathlib.Path:
    env = os.environ.get("MEMOPT_CACHE")
    return pathlib.Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache"


def resolve_path(path: str | os.PathLike) -> pathlib.Path:
    """A config path: absolute stays, `~` expands, relative is taken from the repo root.

    A relative path starting with `.cache/` follows MEMOPT_CACHE, so the default
    `prepared_dir` still works when the cache is moved.
    """
    p = pathlib.Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.parts and p.parts[0] == ".cache":
        return cache_root().joinpath(*p.parts[1:])
    return REPO_ROOT / p


def t5_tokenizer_path() -> pathlib.Path:
    return cache_root() / "tokenizers" / "t5" / "spiece.model"


def sample_corpus_dir() -> pathlib.Path:
    """Local C4-format shards of the bundled sample corpus (tools/fetch_assets.py)."""
    return cache_root() / "corpus" / "sample"


def sample_tokens_dir() -> pathlib.Path:
    """Default output of tools/prepare_data.py for the sample corpus (= DataConfig.prepared_dir)."""
    return cache_root() / "tokens" / "sample"


def check_output_path(path: pathlib.Path, flag: str, *, directory: bool) -> None:
    """A DataError naming `flag` unless `path` can be written as a directory (or else a file): it does not exist
    as the other kind, no parent of it is a file, and the nearest existing directory is writable. The tools
    check their output this way before the long work, not when they write at its end."""
    kind = "directory" if directory else "file"
    if path.exists() and path.is_dir() != directory:
        raise DataError(
            f"{flag} {path} is {'a directory' if path.is_dir() else 'a file'}, not a {kind}. "
            f"Fix: point {flag} at a new {kind} path (or move {path} away)."
        )
    # A file is written beside its final path (then renamed over it): its directory must be writable.
    existing = next(p for p in ((path,) if directory else ()) + tuple(path.parents) if p.exists())
    if not existing.is_dir():
        raise DataError(
            f"{flag} {path} cannot be created: {existing} is a file. Fix: point {flag} at a path under a directory."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(
            f"{flag} {path} cannot be written: {existing} is not writable by this user. Fix: make it writable, "
            f"or point {flag} elsewhere."
        )
