"""SentencePiece tokenizer loading, identity (sha256) and the token dtype.

Token ids follow T5: pad = 0, EOS = 1 (appended to every document), unk = 2.
The sha256 of the .model file is the tokenizer's identity: prepare_data stores it
in the manifest and training refuses data made with a different tokenizer
(check_tokenizer_matches is the one shared check).
"""

from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import sentencepiece as spm

from data.errors import DataError
from data.files import sha256_file
from data.paths import resolve_path, t5_tokenizer_path

PAD_ID = 0
EOS_ID = 1


def resolve_tokenizer_path(spec: str) -> pathlib.Path:
    """ "t5" -> the cached T5 spiece.model; anything else is a path (relative = repo root)."""
    if spec == "t5":
        path = t5_tokenizer_path()
        if not path.is_file():
            raise DataError(
                f"T5 tokenizer not found at {path}. Fix: run `python tools/fetch_assets.py` "
                "(downloads and verifies it; set MEMOPT_CACHE if your cache lives elsewhere)."
            )
        return path
    path = resolve_path(spec)
    if not path.is_file():
        raise DataError(
            f"tokenizer model {spec!r} not found (looked at {path}). Fix: pass an existing "
            "SentencePiece .model file, train one with `python tools/train_tokenizer.py`, "
            "or use tokenizer 't5' after `python tools/fetch_assets.py`."
        )
    return path


@functools.lru_cache(maxsize=8)
def _load(path: str, mtime_ns: int) -> spm.SentencePieceProcessor:
    # mtime_ns is part of the cache key only: a rewritten .model file is loaded again.
    sp = spm.SentencePieceProcessor(model_file=path)
    if sp.eos_id() != EOS_ID or sp.pad_id() != PAD_ID:
        raise DataError(
            f"tokenizer {path} has eos_id={sp.eos_id()}, pad_id={sp.pad_id()}; this pipeline needs "
            f"the T5 convention eos={EOS_ID}, pad={PAD_ID}. Fix: train it with tools/train_tokenizer.py "
            "(which sets these ids)."
        )
    return sp


def load_tokenizer(path: str | os.PathLike) -> spm.SentencePieceProcessor:
    """A cached SentencePieceProcessor for a .model file (validated ids)."""
    path = str(pathlib.Path(path).resolve())
    return _load(path, os.stat(path).st_mtime_ns)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab < 65536), else uint32."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise DataError(f"vocab_size={vocab_size} does not fit uint32 token storage")


def check_tokenizer_matches(manifest_sha256: str, tokenizer_path: pathlib.Path, where: str) -> None:
    """The one tokenizer-identity check used by prepare (resume) and training."""
    actual = sha256_file(tokenizer_path)
    if actual != manifest_sha256:
        raise DataError(
            f"{where} was tokenized with a different tokenizer (manifest sha256 {manifest_sha256[:12]}..., "
            f"configured {tokenizer_path} has sha256 {actual[:12]}...). Training on it would feed "
            "wrong ids. Fix: set data.tokenizer to the model used for preparation, or re-run "
            "`python tools/prepare_data.py --tokenizer <model> --out <new dir>`."
        )
