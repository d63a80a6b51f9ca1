"""data/files.py: atomic writes leave no temporary file behind and the old file unchanged when they fail; hashes."""

from __future__ import annotations

import hashlib
import io
import os
import pathlib

import numpy as np
import pytest

from data import files
from data.files import shard_digest, write_bytes_atomic, write_json_atomic
from tests.helpers.disk import record_durable_renames


@pytest.mark.parametrize("unique_tmp", [False, True])
def test_failed_atomic_write_leaves_no_temporary_file(tmp_path, unique_tmp):
    # The rename fails: the final path is a directory (tools/train_tokenizer.py --out <a directory>).
    target = tmp_path / "out.model"
    target.mkdir()
    with pytest.raises(IsADirectoryError):
        write_bytes_atomic(target, b"model", unique_tmp=unique_tmp)
    assert target.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["out.model"]


@pytest.mark.parametrize("unique_tmp", [False, True])
def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch, unique_tmp):
    target = tmp_path / "f.json"
    target.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_bytes_atomic(target, b"new", unique_tmp=unique_tmp)
    monkeypatch.undo()
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]
    write_bytes_atomic(target, b"new", unique_tmp=unique_tmp)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["f.json"]


def test_a_unique_write_is_fsynced_before_it_is_renamed(tmp_path: pathlib.Path, monkeypatch) -> None:
    # Several writers (every rank) share the file: the one that wins must be on disk, not only in the page cache.
    target = tmp_path / "cache.json"
    renames = record_durable_renames(monkeypatch)
    write_bytes_atomic(target, b"data", unique_tmp=True)
    assert [(dst, durable) for _, dst, durable in renames] == [("cache.json", True)]
    assert target.read_bytes() == b"data"


def test_json_is_written_indented_with_a_final_newline(tmp_path: pathlib.Path) -> None:
    target = tmp_path / "manifest.json"
    write_json_atomic(target, {"a": 1, "b": [2]})
    assert target.read_bytes() == b'{\n  "a": 1,\n  "b": [\n    2\n  ]\n}\n'


def test_shard_digest_does_not_read_a_trailing_partial_token_as_an_id(tmp_path: pathlib.Path) -> None:
    # One uint16 token (id 1) and a stray byte 0xFF: hashed, but not an id (it would read as 255).
    raw = b"\x01\x00\xff"
    path = tmp_path / "shard.bin"
    path.write_bytes(raw)
    assert shard_digest(path, "uint16") == (hashlib.sha256(raw).hexdigest(), 1)


class _ShortReads(io.FileIO):
    """A file that returns at most 3 bytes per read, as pipes and some network file systems may."""

    def readinto(self, buffer) -> int | None:
        return super().readinto(memoryview(buffer)[:3])


def test_shard_digest_retries_short_reads_and_stays_token_aligned(tmp_path: pathlib.Path, monkeypatch) -> None:
    tokens = np.arange(1, 41, dtype=np.uint16)  # ids 1..40; a read split inside a token would see e.g. 0x0300
    path = tmp_path / "shard.bin"
    path.write_bytes(tokens.tobytes())
    monkeypatch.setattr(files, "BLOCK", 16)
    monkeypatch.setattr(files, "open", lambda p, *a, **k: _ShortReads(p), raising=False)
    assert shard_digest(path, "uint16") == (hashlib.sha256(tokens.tobytes()).hexdigest(), 40)
