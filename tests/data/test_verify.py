"""Prepared data is verified when a run opens it (data.verify), and every damage names its file and fix.

Each test damages a copy of a tiny set prepared with tools/prepare_data.py, so the rebuild
command in the messages can be run as given (test_the_fix_in_the_message_repairs).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shlex
import shutil
import threading
import time
import types
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import data.files as files_mod
import data.loading.verify as verify_mod
from data import DataConfig, DataError, DataWarning, TrainBatches, validation_batches
from data import manifest as mf
from data.files import write_json_atomic
from data.paths import sample_corpus_dir
from tests.data.test_cli import load_tool
from tests.helpers.corpus import make_texts, split_tokens, tiny_tokenizer, write_corpus

SEQ = 16
VAL_TOKENS = 300


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """(tokenizer, prepared dir) made by tools/prepare_data.py: several train shards, a short validation split."""
    root = tmp_path_factory.mktemp("verify")
    train, val = make_texts(150, seed=3), make_texts(30, seed=4)
    tok = tiny_tokenizer(root / "tiny.model", train + val)
    corpus = write_corpus(root / "corpus", train, val)
    out = root / "tokens"
    args = ["--source", str(corpus), "--out", str(out), "--tokenizer", str(tok), "--workers", "0"]
    args += ["--val_tokens", str(VAL_TOKENS), "--shard_tokens", "997", "--no_progress"]
    assert load_tool("prepare_data").main(args) == 0
    return tok, out


@pytest.fixture
def prepared(pristine, tmp_path, monkeypatch):
    """A fresh copy of the pristine set (new files: nothing cached), to damage.

    Its files were written a moment ago: RACY_NS = 0 lets quick mode cache them all the same, so
    the tests exercise the cache (test_a_file_changed_a_moment_ago_is_not_cached sets it back).
    """
    monkeypatch.setattr(verify_mod, "RACY_NS", 0)
    tok, out = pristine
    copy = tmp_path / "tokens"
    shutil.copytree(out, copy)
    return tok, copy


def cfg_for(prepared, **kw) -> DataConfig:
    tok, out = prepared
    return DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=kw.pop("seq_len", SEQ), **kw)


def open_train(prepared, **kw) -> TrainBatches:
    return TrainBatches(cfg_for(prepared, **kw), global_batch=2)


def train_shards(out: pathlib.Path) -> list[pathlib.Path]:
    return [out / s["file"] for s in json.loads((out / mf.MANIFEST).read_text())["splits"]["train"]["shards"]]


def rewrite_in_place(path: pathlib.Path, data: bytes) -> None:
    """Overwrite the file's bytes in place (same inode, same size), after the clock has passed its timestamps,
    so its mtime/ctime change as on any later edit (file-system clocks can be coarse)."""
    st = path.stat()
    assert len(data) == st.st_size
    while time.time_ns() < max(st.st_mtime_ns, st.st_ctime_ns) + 20_000_000:
        time.sleep(0.005)
    with open(path, "r+b") as f:
        f.write(data)


def other_valid_ids(path: pathlib.Path) -> bytes:
    """Same-size content of valid ids that differs from the file's: its tokens rotated by one."""
    ids = np.fromfile(path, dtype=np.uint16)
    rotated = np.roll(ids, 1)
    assert not np.array_equal(rotated, ids)
    return rotated.tobytes()


def resign(out: pathlib.Path) -> None:
    """Make manifest.json agree with the shards as they are now (what a careful forger would do)."""
    m = json.loads((out / mf.MANIFEST).read_text())
    for info in m["splits"].values():
        for s in info["shards"]:
            s["sha256"] = verify_mod.shard_digest(out / s["file"], m["dtype"])[0]
        info["checksum"] = mf.split_checksum(m["dtype"], m["tokenizer"]["sha256"], info["shards"])
    m["checksum"] = mf.overall_checksum(m["splits"])
    write_json_atomic(out / mf.MANIFEST, m)


def assert_names_file_and_fix(message: str, file: pathlib.Path, out: pathlib.Path) -> None:
    assert str(file) in message, message
    assert "Fix: re-run the preparation command `python tools/prepare_data.py" in message, message
    assert f"--out {out}" in message, message


def fix_command(message: str) -> list[str]:
    match = re.search(r"`(python tools/prepare_data\.py [^`]*)`", message)
    assert match, message
    return shlex.split(match.group(1))


@pytest.fixture
def hash_calls(monkeypatch) -> list[str]:
    """The shard files verification hashes, in call order (a wrapper around the real hash)."""
    calls: list[str] = []
    lock = threading.Lock()
    real = verify_mod.shard_digest

    def counting(path, dtype):
        with lock:
            calls.append(pathlib.Path(path).name)
        return real(path, dtype)

    monkeypatch.setattr(verify_mod, "shard_digest", counting)
    return calls


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_same_size_overwrite_with_valid_ids_is_caught(prepared, mode, hash_calls):
    _, out = prepared
    open_train(prepared, verify=mode)  # hashed and cached: quick mode trusts the entry while the file is unchanged
    victim = train_shards(out)[1]
    assert victim.name in json.loads((out / verify_mod.CACHE_NAME).read_text())["shards"]
    rewrite_in_place(victim, other_valid_ids(victim))
    hash_calls.clear()
    with pytest.raises(DataError, match="does not hold what was prepared") as err:
        open_train(prepared, verify=mode)
    assert sorted(hash_calls) == ([victim.name] if mode == "quick" else sorted(p.name for p in train_shards(out)))
    assert_names_file_and_fix(str(err.value), victim, out)
    assert "changed or damaged after preparation" in str(err.value)
    with pytest.raises(DataError, match="does not hold what was prepared"):  # still, e.g. from the cache
        open_train(prepared, verify=mode)


def test_quick_mode_catches_a_rewrite_whose_mtime_was_restored(prepared):
    _, out = prepared
    open_train(prepared)
    victim = train_shards(out)[2]
    assert victim.name in json.loads((out / verify_mod.CACHE_NAME).read_text())["shards"]
    before = victim.stat()
    rewrite_in_place(victim, other_valid_ids(victim))
    os.utime(victim, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    with pytest.raises(DataError, match=f"{re.escape(str(victim))} does not hold what was prepared"):
        open_train(prepared)


def test_quick_mode_hashes_a_shard_once_until_it_changes(prepared, hash_calls):
    _, out = prepared
    shards = train_shards(out)
    open_train(prepared)
    assert sorted(hash_calls) == sorted(p.name for p in shards)
    cache = json.loads((out / verify_mod.CACHE_NAME).read_text())
    assert cache["format"] == verify_mod.CACHE_FORMAT and set(cache["shards"]) == {p.name for p in shards}
    entry = cache["shards"][shards[0].name]
    st = shards[0].stat()
    assert (entry["size"], entry["mtime_ns"], entry["ctime_ns"], entry["ino"]) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )
    assert 0 < entry["max_id"] < 400 and len(entry["sha256"]) == 64
    hash_calls.clear()
    open_train(prepared)
    validation_batches(cfg_for(prepared, val_tokens=VAL_TOKENS), 4)
    assert hash_calls == ["validation-00000.bin"]  # train: all from the cache; validation: first time
    hash_calls.clear()
    open_train(prepared)
    validation_batches(cfg_for(prepared, val_tokens=VAL_TOKENS), 4)
    assert hash_calls == []
    assert set(json.loads((out / verify_mod.CACHE_NAME).read_text())["shards"]) == {
        *(p.name for p in shards),
        "validation-00000.bin",
    }
    os.utime(shards[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched: hashed again
    open_train(prepared)
    assert hash_calls == [shards[1].name]


def test_a_file_changed_a_moment_ago_is_not_cached(prepared, hash_calls, monkeypatch):
    """Its next in-place rewrite could fall in the same timestamp tick: it is hashed again next time."""
    _, out = prepared
    monkeypatch.setattr(verify_mod, "RACY_NS", 3600 * 10**9)  # every file here changed within the hour
    open_train(prepared)
    assert not json.loads((out / verify_mod.CACHE_NAME).read_text())["shards"]
    hash_calls.clear()
    open_train(prepared)
    assert len(hash_calls) == len(train_shards(out))


def test_a_file_whose_mtime_was_set_back_a_moment_ago_is_not_cached(prepared, hash_calls, monkeypatch):
    """Restoring an old mtime leaves a new ctime: the file changed a moment ago all the same."""
    _, out = prepared
    monkeypatch.setattr(verify_mod, "RACY_NS", 3600 * 10**9)
    old = time.time_ns() - 2 * 3600 * 10**9
    for shard in train_shards(out):
        os.utime(shard, ns=(old, old))
    open_train(prepared)
    assert not json.loads((out / verify_mod.CACHE_NAME).read_text())["shards"]


def test_full_mode_hashes_every_shard_every_time_and_off_none(prepared, hash_calls):
    _, out = prepared
    n = len(train_shards(out))
    for _ in range(2):
        open_train(prepared, verify="full")
    assert len(hash_calls) == 2 * n
    hash_calls.clear()
    open_train(prepared, verify="off")
    assert hash_calls == []


def test_a_corrupt_cache_is_ignored_and_rebuilt(prepared, hash_calls):
    _, out = prepared
    n = len(train_shards(out))
    open_train(prepared)
    cache = out / verify_mod.CACHE_NAME
    for junk in (b'{"format": "memopt-lm-verified", "vers', b"[1, 2]", b"\xff\xfe", b'{"format": 1}'):
        cache.write_bytes(junk)
        hash_calls.clear()
        open_train(prepared)
        assert len(hash_calls) == n
        assert json.loads(cache.read_text())["format"] == verify_mod.CACHE_FORMAT
    entries = json.loads(cache.read_text())
    first = next(iter(entries["shards"]))
    entries["shards"][first]["max_id"] = "lots"  # a malformed entry is dropped alone
    cache.write_text(json.dumps(entries))
    hash_calls.clear()
    open_train(prepared)
    assert hash_calls == [first]


def test_a_cache_of_another_version_or_entry_is_not_trusted_and_gone_files_are_dropped(prepared, hash_calls):
    _, out = prepared
    shards = train_shards(out)
    open_train(prepared)
    cache = out / verify_mod.CACHE_NAME
    valid = json.loads(cache.read_text())
    cache.write_text(json.dumps({**valid, "version": verify_mod.CACHE_VERSION + 1}))  # a later format: not read
    hash_calls.clear()
    open_train(prepared)
    assert sorted(hash_calls) == sorted(p.name for p in shards)
    entries = json.loads(cache.read_text())
    first = shards[0].name
    entries["shards"][first]["sha256"] = None  # a malformed sha256: that entry is hashed again, no crash
    entries["shards"]["gone-00000.bin"] = dict(entries["shards"][shards[1].name])  # no longer in the manifest
    cache.write_text(json.dumps(entries))
    hash_calls.clear()
    open_train(prepared)
    assert hash_calls == [first]
    entries = json.loads(cache.read_text())
    assert set(entries["shards"]) == {p.name for p in shards}
    entries["shards"][first]["ino"] += 1  # another file (replaced) with the same size and timestamps
    cache.write_text(json.dumps(entries))
    hash_calls.clear()
    open_train(prepared)
    assert hash_calls == [first]


def test_read_only_prepared_dir_caches_under_the_cache_root(prepared, hash_calls, monkeypatch, tmp_path):
    _, out = prepared
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(verify_mod, "_writable", lambda d: False)
    path = verify_mod.cache_file(out)
    assert path.parent == tmp_path / "cache" / "verified" and path.suffix == ".json"
    open_train(prepared)
    assert path.is_file() and not (out / verify_mod.CACHE_NAME).exists()
    hash_calls.clear()
    open_train(prepared)
    assert hash_calls == []


def test_concurrent_cache_writers_leave_a_whole_file(prepared, tmp_path):
    """Several ranks write the cache at once: every replace is a whole file, updates may only be lost."""
    _, out = prepared
    path = tmp_path / "cache.json"
    keep = {f"s{i}" for i in range(8)}
    entry = {"size": 1, "mtime_ns": 1, "ctime_ns": 1, "ino": 1, "sha256": "0" * 64, "max_id": 3}

    def writer(i: int) -> None:
        for _ in range(25):
            verify_mod._save_cache(path, out, {f"s{i}": entry}, keep)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert verify_mod._load_cache(path), "the cache is a whole, valid file"
    assert not list(tmp_path.glob("cache.json.*.tmp")), "no temp files left behind"


def test_edited_sha256_in_the_manifest_is_caught(prepared):
    _, out = prepared
    path = out / mf.MANIFEST
    m = json.loads(path.read_text())
    m["splits"]["train"]["shards"][1]["sha256"] = "ab" * 32
    path.write_text(json.dumps(m))
    for open_ in (lambda: open_train(prepared), lambda: validation_batches(cfg_for(prepared), 4)):
        with pytest.raises(DataError, match="'train' split's checksum does not match its shard entries") as err:
            open_()
        assert_names_file_and_fix(str(err.value), path, out)
    with pytest.raises(DataError, match="checksum does not match"):
        open_train(prepared, verify="off")  # no shard is read for this


def test_a_resigned_manifest_still_fails_on_the_content_hash(prepared):
    """Edited sha256 values with recomputed checksums: the shard's own hash disagrees (cached or not)."""
    _, out = prepared
    open_train(prepared)  # quick mode: the shards' true hashes are cached
    m = json.loads((out / mf.MANIFEST).read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = "cd" * 32
    write_json_atomic(out / mf.MANIFEST, m)
    resign_checksums_only(out)
    for mode in ("quick", "full"):
        with pytest.raises(DataError, match="records cdcdcdcd") as err:
            open_train(prepared, verify=mode)
        assert_names_file_and_fix(str(err.value), train_shards(out)[0], out)


def resign_checksums_only(out: pathlib.Path) -> None:
    m = json.loads((out / mf.MANIFEST).read_text())
    for info in m["splits"].values():
        info["checksum"] = mf.split_checksum(m["dtype"], m["tokenizer"]["sha256"], info["shards"])
    m["checksum"] = mf.overall_checksum(m["splits"])
    write_json_atomic(out / mf.MANIFEST, m)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_token_id_out_of_vocabulary_names_the_shard(prepared, mode):
    _, out = prepared
    victim = train_shards(out)[2]
    ids = np.fromfile(victim, dtype=np.uint16)
    ids[len(ids) // 2] = 65535
    rewrite_in_place(victim, ids.tobytes())
    with pytest.raises(DataError, match="also holds token id 65535, outside the vocabulary of 400 ids"):
        open_train(prepared, verify=mode)
    resign(out)  # a manifest that vouches for the damaged shard: the id range still catches it
    with pytest.raises(DataError, match=r"holds token id 65535, outside the vocabulary of 400 ids \(0\.\.399\)") as e:
        open_train(prepared, verify=mode)
    assert_names_file_and_fix(str(e.value), victim, out)
    assert "index past the embedding" in str(e.value)
    open_train(prepared, verify="off")  # off reads nothing: documented


def test_truncated_or_invalid_manifest_names_its_path(prepared):
    _, out = prepared
    path = out / mf.MANIFEST
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    for open_ in (lambda: open_train(prepared), lambda: validation_batches(cfg_for(prepared), 4)):
        with pytest.raises(DataError, match=f"{re.escape(str(path))} is not valid JSON") as err:
            open_()
        assert_names_file_and_fix(str(err.value), path, out)
        assert "truncated or damaged" in str(err.value)
        # The manifest is unreadable: the command comes from the split records, with the same settings.
        assert "--shard_tokens 997" in str(err.value) and f"--val_tokens {VAL_TOKENS}" in str(err.value)
    m = json.loads(good)
    del m["splits"]["train"]["shards"][0]["sha256"]
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="is damaged: the entry of shard train-00000.bin lacks") as err:
        open_train(prepared)
    assert_names_file_and_fix(str(err.value), path, out)
    m = json.loads(good)
    m["splits"]["train"]["shards"][0]["file"] = "../train-00000.bin"
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="without a plain file name"):
        open_train(prepared)
    m = json.loads(good)
    m["tokenizer"]["vocab_size"] = 65536
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="records tokenizer vocab_size=65536.*has 400 ids") as err:
        open_train(prepared)
    assert_names_file_and_fix(str(err.value), path, out)


def test_missing_or_wrong_size_shard_names_the_file(prepared):
    _, out = prepared
    victim = train_shards(out)[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-2])
    for mode in ("quick", "full", "off"):
        with pytest.raises(DataError, match=f"{re.escape(str(victim))} is damaged: expected {len(data)} bytes") as e:
            open_train(prepared, verify=mode)
        assert_names_file_and_fix(str(e.value), victim, out)
    victim.unlink()
    for mode in ("quick", "off"):
        with pytest.raises(DataError, match=f"{re.escape(str(victim))} is missing") as e:
            open_train(prepared, verify=mode)
        assert_names_file_and_fix(str(e.value), victim, out)


def test_a_longer_shard_is_damage_in_every_mode(prepared):
    """Off mode checks sizes only: a shard with bytes appended must still be refused there."""
    _, out = prepared
    victim = train_shards(out)[1]
    size = victim.stat().st_size
    with open(victim, "ab") as f:
        f.write(b"\0\0")
    for mode in ("quick", "full", "off"):
        with pytest.raises(DataError, match=f"{re.escape(str(victim))} is damaged: expected {size} bytes") as e:
            open_train(prepared, verify=mode)
        assert f"found {size + 2}" in str(e.value)


def test_a_uint32_set_is_size_checked_with_4_bytes_a_token(prepared):
    """Vocabularies over 65536 ids are stored as uint32: a shard's expected size is 4 bytes per token."""
    _, out = prepared
    m = json.loads((out / mf.MANIFEST).read_text())
    for info in m["splits"].values():
        for s in info["shards"]:
            np.fromfile(out / s["file"], dtype=np.uint16).astype(np.uint32).tofile(out / s["file"])
    m["dtype"] = "uint32"
    write_json_atomic(out / mf.MANIFEST, m)
    resign(out)
    m = json.loads((out / mf.MANIFEST).read_text())
    first = m["splits"]["train"]["shards"][0]
    assert (out / first["file"]).stat().st_size == 4 * first["tokens"]
    for mode in ("quick", "full", "off"):
        counts = verify_mod.verify_split(out, m, "train", mode)
        assert counts["shards"] == len(m["splits"]["train"]["shards"])


def test_an_unknown_verify_mode_is_refused(prepared):
    _, out = prepared
    m = json.loads((out / mf.MANIFEST).read_text())
    mode: Any = "Quick"
    with pytest.raises(DataError, match=r"^data\.verify='Quick' is not one of quick, full, off$"):
        verify_mod.verify_split(out, m, "train", mode)


def test_verify_off_reads_no_shard(prepared, monkeypatch):
    def no_reads(path, dtype):
        raise AssertionError(f"verify=off read {path}")

    monkeypatch.setattr(verify_mod, "shard_digest", no_reads)
    _, out = prepared
    victim = train_shards(out)[1]
    rewrite_in_place(victim, other_valid_ids(victim))
    open_train(prepared, verify="off")  # sizes only: the same-size rewrite goes through, as documented
    validation_batches(cfg_for(prepared, verify="off", val_tokens=VAL_TOKENS), 4)
    assert not (out / verify_mod.CACHE_NAME).exists()


def edit_shard_sha256(out: pathlib.Path, split: str, index: int, sha: str | None) -> None:
    """Replace a shard's sha256 in manifest.json (None: the split's checksum instead), as a text edit."""
    text = (out / mf.MANIFEST).read_text()
    info = json.loads(text)["splits"][split]
    old = info["checksum"] if sha is None else info["shards"][index]["sha256"]
    (out / mf.MANIFEST).write_text(text.replace(old, sha or "0" * 64))


DAMAGE = {
    "overwritten shard": lambda out: rewrite_in_place(train_shards(out)[1], other_valid_ids(train_shards(out)[1])),
    "truncated shard": lambda out: train_shards(out)[2].write_bytes(train_shards(out)[2].read_bytes()[:-4]),
    "missing shard": lambda out: train_shards(out)[0].unlink(),
    "edited sha256": lambda out: edit_shard_sha256(out, "train", 1, "ab" * 32),
    "edited checksum": lambda out: edit_shard_sha256(out, "validation", 0, None),
    "truncated manifest": lambda out: (out / mf.MANIFEST).write_bytes((out / mf.MANIFEST).read_bytes()[:100]),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_the_fix_in_the_message_repairs(pristine, prepared, damage):
    """The command the error names, run as given, restores the prepared set byte for byte."""
    _, out = prepared
    open_train(prepared)
    DAMAGE[damage](out)
    with pytest.raises(DataError) as err:
        open_train(prepared)
    command = fix_command(str(err.value))
    assert command[:2] == ["python", "tools/prepare_data.py"]
    assert load_tool("prepare_data").main(command[2:] + ["--workers", "0", "--no_progress"]) == 0
    tb = open_train(prepared, verify="full")
    assert tb.manifest == json.loads((pristine[1] / mf.MANIFEST).read_text())
    for split in ("train", "validation"):
        np.testing.assert_array_equal(split_tokens(out, split), split_tokens(pristine[1], split))


def hub_manifest(tokenizer: str, train_limits: dict, validation_limits: dict) -> dict:
    """A manifest of both C4 splits read from the hub, with the limits each was prepared with."""
    hub = {"kind": "hf", "path": "allenai/c4", "name": "en", "split": "train"}
    return {
        "tokenizer": {"path": tokenizer},
        "splits": {
            "train": {"source": hub, "limits": train_limits},
            "validation": {"source": {**hub, "split": "validation"}, "limits": validation_limits},
        },
    }


def test_rebuild_command_from_the_manifest():
    out = pathlib.Path("/data/tokens/c4")
    manifest = hub_manifest(
        "/models/my.model",
        {"max_tokens": 4200, "max_docs": None, "shard_tokens": 100_000_000},
        {"max_tokens": DataConfig.val_tokens, "max_docs": None, "shard_tokens": 100_000_000},
    )
    command, note = mf.rebuild_command(out, manifest)
    assert command == (
        "python tools/prepare_data.py --source hf --tokenizer /models/my.model --out /data/tokens/c4 --max_tokens 4200"
    )
    assert note == ""
    sample = [str(sample_corpus_dir() / "en" / "c4-train.00000-of-00004.json.gz")]
    manifest["tokenizer"]["path"] = "/home/x/.cache/tokenizers/t5/spiece.model"
    manifest["splits"] = {
        "train": {"source": {"kind": "local", "reader": "gzip", "files": sample}, "limits": {"shard_tokens": 5000}}
    }
    command, note = mf.rebuild_command(out, manifest)
    assert command == "python tools/prepare_data.py --shard_tokens 5000 --split train --out /data/tokens/c4"
    command, note = mf.rebuild_command(pathlib.Path("/nowhere"), None)  # neither manifest nor records
    assert command == "python tools/prepare_data.py --out /nowhere"
    assert "same --source, --tokenizer and limits" in note


def test_corpus_smaller_than_one_global_batch(prepared):
    tb = open_train(prepared)
    n = tb.n_windows
    TrainBatches(cfg_for(prepared), global_batch=n)  # exactly one batch: fine
    with pytest.raises(DataError) as err:
        TrainBatches(cfg_for(prepared), global_batch=n + 1)
    message = str(err.value)
    assert f"has {n} windows of seq_len={SEQ}" in message and f"one global batch of {n + 1} windows" in message
    assert str(prepared[1]) in message
    assert "Fix: prepare more data" in message and "--train.global_batch (to at most" in message
    assert "--data.seq_len" in message


def test_short_validation_split_warns(prepared):
    _, out = prepared
    n = int(json.loads((out / mf.MANIFEST).read_text())["splits"]["validation"]["tokens"])
    with pytest.warns(DataWarning) as record:
        batches = validation_batches(cfg_for(prepared, val_tokens=1_048_576), 4)
    assert len(record) == 1 and issubclass(record[0].category, UserWarning)
    assert str(record[0].message) == (
        f"data.val_tokens=1048576 but the validation split of {out} has {n} tokens: evaluating on all of them. "
        f"Set --data.val_tokens={n} (or less) to silence this, or prepare a larger validation split with --val_tokens"
    )
    assert sum(len(x) for x, _ in batches) == (n - 1) // SEQ
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validation_batches(cfg_for(prepared, val_tokens=n), 4)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_shard_digest_streams_blocks_and_matches_a_whole_file_read(tmp_path, monkeypatch, dtype):
    monkeypatch.setattr(files_mod, "BLOCK", 64)  # many blocks, and files ending inside one
    path = tmp_path / "shard.bin"
    for size in (0, 1, 2, 3, 63, 64, 65, 1000, 4099):
        raw = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
        path.write_bytes(raw)
        count = size // np.dtype(dtype).itemsize
        top = int(np.frombuffer(raw, dtype=dtype, count=count).max()) if count else -1
        assert files_mod.shard_digest(path, dtype) == (hashlib.sha256(raw).hexdigest(), top)
        assert files_mod.sha256_file(path) == files_mod.sha256_file(path, chunk=7) == hashlib.sha256(raw).hexdigest()


def test_bench_data_times_each_mode_and_writes_a_valid_synthetic_set(pristine, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(verify_mod, "RACY_NS", verify_mod.RACY_NS)  # the bench sets it to 0: restore it after
    bench = load_tool("bench_data")
    tok, _ = pristine
    out = tmp_path / "synthetic"
    manifest = bench.write_synthetic(out, tok, 5000, 1500)
    assert [s["tokens"] for s in manifest["splits"]["train"]["shards"]] == [1500, 1500, 1500, 500]
    rows = bench.bench_verify(out, "train", 1, str(tok))
    assert [(label.split(",")[0], hashed) for label, _, hashed in rows] == [
        ("full", 4),
        ("full", 4),
        ("full", 4),
        ("quick", 4),
        ("quick", 0),
        ("off", 0),
    ]
    printed = capsys.readouterr().out
    assert "4 shard(s)" in printed and "GB/s" in printed and "quick, second open" in printed
    assert not (out / verify_mod.CACHE_NAME).exists(), "the benchmark writes nothing into the prepared dir"
    tb = TrainBatches(DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=SEQ, verify="full"), global_batch=2)
    assert tb.store.n_tokens == 5000


def test_bench_data_reports_gb_per_s_of_the_shard_bytes_and_restores_the_thread_limit(
    pristine: Any, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """GB/s = shard bytes / seconds / 1e9 (a clock that ticks 1 us per reading: every timing is 1 us); cold rows
    run once, warm rows `repeats` times; verify.MAX_THREADS is as before."""
    monkeypatch.setattr(verify_mod, "RACY_NS", verify_mod.RACY_NS)
    bench = load_tool("bench_data")
    tok, _ = pristine
    out = tmp_path / "synthetic"
    bench.write_synthetic(out, tok, 5000, 1500)
    n_bytes = sum(p.stat().st_size for p in out.glob("train*") if p.suffix != ".json")
    assert n_bytes >= 10_000
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks) * 1e-6))
    verified: list[str] = []
    real_verify = verify_mod.verify_split

    def counting_verify(*args: Any, **kwargs: Any) -> dict[str, Any]:
        verified.append(args[3])
        return real_verify(*args, **kwargs)

    monkeypatch.setattr(verify_mod, "verify_split", counting_verify)
    threads = verify_mod.MAX_THREADS
    capsys.readouterr()
    rows = bench.bench_verify(out, "train", 2, str(tok))
    assert verify_mod.MAX_THREADS == threads
    assert verified == ["full"] + ["full"] * 4 + ["quick"] * 3 + ["off"] * 2
    printed = capsys.readouterr().out
    n_shards = sum(1 for p in out.glob("train*") if p.suffix != ".json")
    # One row per mode, in the table's order (a cold row is relabelled where the page cache cannot be dropped);
    # full and a first quick open hash every shard, a second quick open and off hash none.
    assert [(label.replace("page cache not dropped", "cold"), hashed) for label, _, hashed in rows] == [
        ("full, cold", n_shards),
        ("full, warm", n_shards),
        ("full, warm, 1 thread", n_shards),
        ("quick, first open, cold", n_shards),
        ("quick, second open", 0),
        ("off", 0),
    ]
    for label, seconds, hashed in rows:
        assert seconds == pytest.approx(1e-6)
        assert f"  {label:<26}{seconds:>10.4f}{n_bytes / 1e-6 / 1e9:>10.2f}{hashed:>8}" in printed


def test_a_source_changed_since_preparation_is_a_warning(pristine, tmp_path):
    # The prepared tokens are intact and are used; the warning says they no longer match their source, and how
    # to prepare the current one. A deleted source (raw data removed after preparation) is not a change.
    tok, _ = pristine
    train, val = make_texts(40, seed=5), make_texts(10, seed=6)
    corpus = write_corpus(tmp_path / "corpus", train, val)
    out = tmp_path / "tokens"
    args = ["--source", str(corpus), "--out", str(out), "--tokenizer", str(tok), "--workers", "0", "--no_progress"]
    assert load_tool("prepare_data").main(args) == 0
    cfg = DataConfig(prepared_dir=str(out), tokenizer=str(tok), seq_len=SEQ)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        before = next(TrainBatches(cfg, global_batch=2).batches())
    shard = sorted((corpus / "en").glob("c4-train.*"))[0]
    size = shard.stat().st_size
    write_corpus(tmp_path / "corpus", train[1:], val)
    with pytest.warns(DataWarning) as record:
        after = next(TrainBatches(cfg, global_batch=2).batches())
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith(
        f"the train split of {out} was prepared from source files that have changed since: "
        f"{shard} ({size} bytes then, {shard.stat().st_size} now)"
    )
    assert "The run uses the tokens as prepared" in message
    assert f"re-run its command: python tools/prepare_data.py --source {corpus}" in message
    assert message.endswith(f"--out {out})")
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    for p in (corpus / "en").glob("c4-train.*"):
        p.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TrainBatches(cfg, global_batch=2)


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_token_id_equal_to_the_vocab_size_is_out_of_range(prepared, mode):
    """Ids are 0..vocab-1: the last valid id passes, the id just past it (== vocab_size) is refused, even in a
    manifest re-signed to vouch for it."""
    _, out = prepared
    victim = train_shards(out)[0]
    ids = np.fromfile(victim, dtype=np.uint16)
    ids[len(ids) // 2] = 399
    rewrite_in_place(victim, ids.tobytes())
    resign(out)
    open_train(prepared, verify=mode)
    ids[len(ids) // 2] = 400
    rewrite_in_place(victim, ids.tobytes())
    resign(out)
    with pytest.raises(DataError, match=r"holds token id 400, outside the vocabulary of 400 ids \(0\.\.399\)"):
        open_train(prepared, verify=mode)


def test_an_edited_document_count_is_caught(prepared):
    """The split checksum covers each shard's document count (check_checksums' message says so)."""
    _, out = prepared
    path = out / mf.MANIFEST
    m = json.loads(path.read_text())
    m["splits"]["train"]["shards"][0]["docs"] += 1
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="'train' split's checksum does not match its shard entries"):
        open_train(prepared, verify="off")


def test_edited_token_count_or_overall_checksum_is_caught(prepared):
    """Neither a split's token count nor the overall checksum is inside a split checksum: each has its own check."""
    _, out = prepared
    path = out / mf.MANIFEST
    good = json.loads(path.read_text())
    n = good["splits"]["train"]["tokens"]
    m = json.loads(path.read_text())
    m["splits"]["train"]["tokens"] = n + 1
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"'train' split claims {n + 1} tokens but its shard entries add up to {n}\\."):
        open_train(prepared, verify="off")
    m = json.loads(json.dumps(good))
    m["checksum"] = "0" * 64
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match="the overall checksum does not match the splits' checksums") as err:
        open_train(prepared, verify="off")
    assert_names_file_and_fix(str(err.value), path, out)


@pytest.mark.parametrize(
    "edit,problem",
    [
        (lambda m: m["splits"]["train"].pop("tokens"), "split 'train' lacks its token count"),
        (lambda m: m.update(dtype="float32"), "dtype 'float32' is not one of uint16, uint32"),
        (lambda m: m["splits"]["train"]["shards"][0].update(docs=True), "the entry of shard train-00000.bin lacks"),
    ],
    ids=["no token count", "foreign dtype", "boolean count"],
)
def test_a_malformed_manifest_entry_is_named_as_damage(prepared, edit, problem):
    _, out = prepared
    path = out / mf.MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(DataError, match=f"{re.escape(str(path))} is damaged: {re.escape(problem)}") as err:
        open_train(prepared, verify="off")
    assert_names_file_and_fix(str(err.value), path, out)


def test_a_missing_directory_and_a_missing_manifest_are_told_apart(tmp_path):
    with pytest.raises(DataError, match=f"prepared data directory missing: {re.escape(str(tmp_path / 'nope'))}"):
        mf.read_manifest(tmp_path / "nope")
    with pytest.raises(DataError, match=f"prepared data manifest missing: {re.escape(str(tmp_path / mf.MANIFEST))}"):
        mf.read_manifest(tmp_path)


def test_counts_and_digests_are_checked_strictly():
    assert mf.is_count(0) and mf.is_count(7)
    assert not any(mf.is_count(x) for x in (-1, True, False, 1.0, "3", None))
    digest = hashlib.sha256(b"x").hexdigest()
    assert mf.is_sha256(digest)
    assert not any(mf.is_sha256(x) for x in (digest.upper(), digest[:-1], "g" * 64, None))


def test_rebuild_command_keeps_per_split_settings_max_docs_and_a_custom_spiece_model():
    out = pathlib.Path("/data/tokens/c4")
    manifest = hub_manifest(
        "/models/mine/spiece.model",  # named like T5's, but not T5's cached file
        {"max_tokens": None, "max_docs": 50, "shard_tokens": 5000},
        {"max_tokens": DataConfig.val_tokens, "max_docs": None, "shard_tokens": 7000},
    )
    command, note = mf.rebuild_command(out, manifest)
    assert command == (
        "python tools/prepare_data.py --source hf --shard_tokens 5000 --tokenizer /models/mine/spiece.model"
        " --split train --out /data/tokens/c4 --max_docs 50"
        " && python tools/prepare_data.py --source hf --shard_tokens 7000 --tokenizer /models/mine/spiece.model"
        " --split validation --out /data/tokens/c4"
    )
    assert note == ""


def test_rebuild_command_of_a_local_source_names_the_reader_and_other_files_in_its_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    used, other = corpus / "c4-train.00000-of-00002.json.gz", corpus / "c4-train.00001-of-00002.json.gz"
    used.write_bytes(b"")
    other.write_bytes(b"")  # `--source corpus` would read this one too
    source = {"kind": "local", "reader": "hf", "files": [str(used)]}
    manifest = {"tokenizer": {}, "splits": {"train": {"source": source, "limits": {}}}}
    command, note = mf.rebuild_command(tmp_path / "tokens", manifest)
    assert shlex.split(command) == [
        *("python", "tools/prepare_data.py", "--source", str(corpus), "--reader", "hf"),
        *("--split", "train", "--out", str(tmp_path / "tokens")),
    ]
    assert note == f" (--source as when it was prepared: the train split was read from 1 file(s) such as {used})"


def test_rebuild_command_from_old_split_records_names_the_tokenizer_by_its_sha256(tmp_path):
    """Records written before tokenizer_path was added: a tokenizer that is not T5's is named by its sha256. A
    record marked complete without its manifest entry is malformed and left out."""
    key: dict[str, object] = {"source": {"kind": "hf"}, "max_tokens": None, "max_docs": None, "shard_tokens": None}
    key["tokenizer_sha256"] = "ab" * 32
    train = {"key": key}
    (tmp_path / "train.prepare.json").write_text(json.dumps(train))
    validation = {"key": {**key, "max_tokens": 1234}, "complete": True}
    (tmp_path / "validation.prepare.json").write_text(json.dumps(validation))
    assert mf.read_record(tmp_path, "train") == train and mf.read_record(tmp_path, "validation") is None
    command, note = mf.rebuild_command(tmp_path, None)
    assert shlex.split(command) == [
        *("python", "tools/prepare_data.py", "--source", "hf"),
        *("--tokenizer", "<the .model with sha256 abababababab...>", "--split", "train", "--out", str(tmp_path)),
    ]
    assert note == ""
