"""data/files.py: atomic writes leave no temporary file behind and the old file unchanged when they fail."""

from __future__ import annotations

import os

import pytest

from data import files
from data.files import write_bytes_atomic


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
