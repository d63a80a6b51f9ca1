"""tools/prepare_data.py's library: ids, manifest, workers, limits, resume, bad input."""

from __future__ import annotations

import gzip
import json
import pathlib
import re

import numpy as np
import pytest

import data.preparation.prepare as prepare_module
from data.errors import DataError
from data.files import sha256_file
from data.preparation.prepare import PrepareOptions, SplitPlan, prepare
from data.preparation.sources import LocalSource
from data.tokenizer import EOS_ID, load_tokenizer, token_dtype
from tests.helpers.corpus import make_texts, split_tokens, tiny_tokenizer, write_corpus
from tests.helpers.disk import record_durable_renames

TRAIN = make_texts(120, seed=1)
VAL = make_texts(20, seed=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    tok = tiny_tokenizer(root / "tiny.model", TRAIN + VAL)
    corpus = write_corpus(root / "corpus", TRAIN, VAL, train_shards=3)
    return tok, corpus


def run(
    tok,
    corpus,
    out,
    *,
    workers=0,
    shard_tokens=1000,
    max_tokens=None,
    max_docs=None,
    val_tokens=None,
    splits=("train", "validation"),
    source=None,
    log=lambda *_: None,
):
    plans = []
    for split in splits:
        src = source if source is not None else LocalSource(corpus, split)
        limit = max_tokens if split == "train" else val_tokens
        plans.append(SplitPlan(split, src, max_tokens=limit, max_docs=max_docs if split == "train" else None))
    return prepare(
        plans,
        PrepareOptions(
            out=out,
            tokenizer_path=tok,
            workers=workers,
            shard_tokens=shard_tokens,
            batch_docs=16,
            progress=False,
            log=log,
        ),
    )


def expected_stream(tok, texts) -> np.ndarray:
    sp = load_tokenizer(tok)
    return np.array([i for t in texts for i in sp.encode(t) + [EOS_ID]], dtype=np.int64)


def test_ids_equal_direct_sentencepiece_plus_eos(assets, tmp_path):
    tok, corpus = assets
    run(tok, corpus, tmp_path / "out")
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "train"), expected_stream(tok, TRAIN))
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "validation"), expected_stream(tok, VAL))


def test_manifest_content(assets, tmp_path):
    tok, corpus = assets
    out = tmp_path / "out"
    m = run(tok, corpus, out, shard_tokens=1000)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert m["dtype"] == "uint16"
    assert m["tokenizer"]["sha256"] == sha256_file(tok)
    assert m["tokenizer"]["vocab_size"] == 400 and m["tokenizer"]["eos_id"] == 1
    assert m["tokenizer"]["pad_id"] == 0 and m["tokenizer"]["path"] == str(tok)
    assert m["tool_version"]
    train = m["splits"]["train"]
    assert train["docs"] == len(TRAIN) and train["tokens"] == len(expected_stream(tok, TRAIN))
    assert len(train["shards"]) > 3  # several shards of ~1000 tokens
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"]
    assert sum(s["docs"] for s in train["shards"]) == train["docs"]
    for s in train["shards"]:
        assert sha256_file(out / s["file"]) == s["sha256"]
        assert (out / s["file"]).stat().st_size == 2 * s["tokens"]
        assert s["tokens"] >= 1000 or s is train["shards"][-1]
    assert train["source"]["files"] == [str(p) for p in sorted((corpus / "en").glob("c4-train.*"))]
    assert train["skipped"] == {}
    assert m["splits"]["validation"]["docs"] == len(VAL)
    assert not list(out.glob("*.tmp"))


def test_workers_do_not_change_output(assets, tmp_path):
    tok, corpus = assets
    m0 = run(tok, corpus, tmp_path / "w0", workers=0)
    m2 = run(tok, corpus, tmp_path / "w2", workers=2)
    assert m0["checksum"] == m2["checksum"]


def test_limits(assets, tmp_path):
    tok, corpus = assets
    full = expected_stream(tok, TRAIN)
    m = run(tok, corpus, tmp_path / "a", max_tokens=2500, val_tokens=300)
    train = m["splits"]["train"]
    # Stops at the first document boundary at or past the limit.
    assert 2500 <= train["tokens"] < 2500 + 200
    np.testing.assert_array_equal(split_tokens(tmp_path / "a", "train"), full[: train["tokens"]])
    assert split_tokens(tmp_path / "a", "train")[-1] == EOS_ID
    assert 300 <= m["splits"]["validation"]["tokens"] < 500
    m = run(tok, corpus, tmp_path / "b", max_docs=7)
    assert m["splits"]["train"]["docs"] == 7
    np.testing.assert_array_equal(split_tokens(tmp_path / "b", "train"), expected_stream(tok, TRAIN[:7]))


class _Interrupting:
    """A source that raises KeyboardInterrupt after n records (a killed job)."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def describe(self):
        return self.inner.describe()

    def progress(self):
        return 0.0

    def events(self, cursor=None):
        for i, ev in enumerate(self.inner.events(cursor)):
            if i == self.n:
                raise KeyboardInterrupt
            yield ev


def test_resume_after_interrupt(assets, tmp_path):
    tok, corpus = assets
    ref = run(tok, corpus, tmp_path / "ref", splits=("train",))
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(tok, corpus, out, splits=("train",), source=_Interrupting(LocalSource(corpus, "train"), 70))
    finished = sorted(out.glob("train-*.bin"))
    assert finished and list(out.glob("train-*.bin.tmp")), "expected finished shards and one interrupted temp shard"
    assert not (out / "manifest.json").exists()
    # Damage the temp file and drop the sidecar of the last finished shard (crash between rename and sidecar).
    tmp = next(out.glob("*.bin.tmp"))
    tmp.write_bytes(b"\xff" * 10_000)
    last = finished[-1]
    last.with_suffix(".json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in finished[:-1]}
    m = run(tok, corpus, out, splits=("train",))
    assert m["splits"]["train"]["checksum"] == ref["splits"]["train"]["checksum"]
    assert {p.name: p.stat().st_mtime_ns for p in finished[:-1]} == kept  # finished shards were skipped
    assert not list(out.glob("*.tmp"))
    # A complete split is not redone at all.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.bin")}
    run(tok, corpus, out, splits=("train",))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.bin")} == before
    # A finished shard damaged later (wrong size) is redone, with everything after it.
    victim = out / "train-00001.bin"
    victim.write_bytes(victim.read_bytes()[:-2])
    m = run(tok, corpus, out, splits=("train",))
    assert m["splits"]["train"]["checksum"] == ref["splits"]["train"]["checksum"]
    assert (out / "train-00000.bin").stat().st_mtime_ns == before["train-00000.bin"]
    for shard in m["splits"]["train"]["shards"]:
        assert sha256_file(out / shard["file"]) == shard["sha256"]
    # So is one damaged later with its size kept (other content): resuming re-hashes finished shards.
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.bin")}
    victim = out / "train-00002.bin"
    victim.write_bytes(victim.read_bytes()[::-1])
    logged: list[str] = []
    m = run(tok, corpus, out, splits=("train",), log=logged.append)
    assert any("train-00002.bin is damaged" in line for line in logged), logged
    assert m["splits"]["train"]["checksum"] == ref["splits"]["train"]["checksum"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("train-0000[01].bin")} == {
        name: before[name] for name in ("train-00000.bin", "train-00001.bin")
    }
    assert sha256_file(victim) == m["splits"]["train"]["shards"][2]["sha256"]
    # A truncated manifest.json does not stop a re-run: it is rewritten from the split records.
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:50])
    assert run(tok, corpus, out, splits=("train",)) == m


def test_changed_settings_for_existing_out_is_an_error(assets, tmp_path):
    tok, corpus = assets
    run(tok, corpus, tmp_path / "o", splits=("train",))
    with pytest.raises(DataError, match="different settings.*shard_tokens.*new --out"):
        run(tok, corpus, tmp_path / "o", splits=("train",), shard_tokens=5000)
    other = tiny_tokenizer(tmp_path / "other.model", TRAIN, vocab_size=350)
    with pytest.raises(DataError, match="different tokenizer"):
        run(other, corpus, tmp_path / "o", splits=("train",))


def _write_raw_shard(path: pathlib.Path, lines: list[bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def test_bad_records_are_skipped_and_counted(assets, tmp_path):
    tok, _ = assets
    good = [json.dumps({"text": t, "url": "u", "timestamp": "t"}).encode() for t in TRAIN[:4]]
    lines = [
        good[0],
        b'{"text": "unterminated',
        good[1],
        json.dumps({"url": "no text"}).encode(),
        json.dumps({"text": 5}).encode(),
        b"[1, 2]",
        '{"text": "caf\xe9"}'.encode("latin-1"),
        json.dumps({"text": "   "}).encode(),
        good[2],
        b"",
        good[3],
    ]
    _write_raw_shard(tmp_path / "c" / "en" / "c4-train.00000-of-00001.json.gz", lines)
    m = run(tok, tmp_path / "c", tmp_path / "out", splits=("train",))
    train = m["splits"]["train"]
    assert train["skipped"] == {"invalid_json": 1, "missing_text": 3, "not_utf8": 1, "empty": 1}
    assert train["docs"] == 4
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "train"), expected_stream(tok, TRAIN[:4]))


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_gzip_stops_without_finalizing_a_shard(assets, tmp_path, damage):
    tok, _ = assets
    path = tmp_path / "c" / "en" / "c4-train.00000-of-00001.json.gz"
    _write_raw_shard(path, [json.dumps({"text": t}).encode() for t in TRAIN])
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0x5A for b in data[mid : mid + 64]) + data[mid + 64 :])
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"c4-train\.00000.*corrupt or truncated gzip.*re-download"):
        run(tok, tmp_path / "c", out, splits=("train",), shard_tokens=10**9)
    assert not list(out.glob("train-*.bin")), "a shard was finalized from a partially read file"
    assert not (out / "manifest.json").exists()


def test_uint32_when_vocab_exceeds_uint16(assets, tmp_path, monkeypatch):
    # Training a >65536-piece model is slow; fake the vocab size and check the dtype choice end to end.
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32
    tok, corpus = assets
    monkeypatch.setattr(prepare_module, "token_dtype", lambda v: np.dtype(np.uint32))
    m = run(tok, corpus, tmp_path / "out", splits=("train",))
    assert m["dtype"] == "uint32"
    np.testing.assert_array_equal(split_tokens(tmp_path / "out", "train"), expected_stream(tok, TRAIN))


def _mtimes(out: pathlib.Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*-*.bin")}


@pytest.mark.parametrize("damage", [b"", b'{"file": "train-00001.bin", "tok', b"[]", b'{"file": "train-00001.bin"}'])
def test_damaged_shard_sidecar_is_redone(assets, tmp_path, damage):
    # A sidecar that cannot be read, or lacks what resuming uses, makes its shard unfinished (not a traceback).
    tok, corpus = assets
    out = tmp_path / "out"
    ref = run(tok, corpus, out, splits=("train",))
    assert len(ref["splits"]["train"]["shards"]) >= 3
    before = _mtimes(out)
    (out / "train-00001.json").write_bytes(damage)
    logged: list[str] = []
    assert run(tok, corpus, out, splits=("train",), log=logged.append) == ref
    assert any("train-00001.bin is damaged" in line for line in logged), logged
    after = _mtimes(out)
    assert after["train-00000.bin"] == before["train-00000.bin"]  # the shard before it is kept
    assert after["train-00001.bin"] != before["train-00001.bin"]  # it and those after it are redone
    assert json.loads((out / "train-00001.json").read_text())["sha256"] == ref["splits"]["train"]["shards"][1]["sha256"]


@pytest.mark.parametrize("damage", [b"", b'{"key": {"tok', b"[]", b'{"complete": true}'])
def test_damaged_split_record_is_rewritten(assets, tmp_path, damage):
    # The documented repair (re-running) works on an unreadable `<split>.prepare.json`: it is rewritten and
    # the shards, which their sidecars vouch for, are kept.
    tok, corpus = assets
    out = tmp_path / "out"
    ref = run(tok, corpus, out)
    before = _mtimes(out)
    record = json.loads((out / "train.prepare.json").read_text())
    (out / "train.prepare.json").write_bytes(damage)
    logged: list[str] = []
    assert run(tok, corpus, out, log=logged.append) == ref
    assert any("train.prepare.json is unreadable or damaged" in line for line in logged), logged
    assert json.loads((out / "train.prepare.json").read_text()) == record
    assert _mtimes(out) == before


def test_damaged_record_of_a_split_not_prepared_now(assets, tmp_path):
    tok, corpus = assets
    out = tmp_path / "out"
    ref = run(tok, corpus, out)
    # With a readable manifest, the split keeps its entry.
    (out / "validation.prepare.json").write_bytes(b"")
    assert run(tok, corpus, out, splits=("train",)) == ref
    # The reviewer's case: the manifest and the record both truncated to nothing. The split preparation
    # cannot vouch for is left out of the manifest, with a note saying how to restore it...
    (out / "manifest.json").write_bytes(b"")
    logged: list[str] = []
    m = run(tok, corpus, out, splits=("train",), log=logged.append)
    assert set(m["splits"]) == {"train"} and m["splits"]["train"] == ref["splits"]["train"]
    assert any("validation.prepare.json is unreadable" in line and "--split validation" in line for line in logged)
    # ... and re-running the whole command restores it.
    (out / "manifest.json").write_bytes(b"")
    assert run(tok, corpus, out) == ref


def test_a_source_rewritten_since_preparation_is_named_in_the_error(assets, tmp_path):
    # The same files with new content (a sample corpus of a newer recipe): the original settings cannot be had
    # again, so the error names the changed files and the fixes that work.
    tok, _ = assets
    corpus = write_corpus(tmp_path / "corpus", TRAIN, VAL, train_shards=2)
    run(tok, corpus, tmp_path / "o", splits=("train",))
    shards = sorted((corpus / "en").glob("c4-train.*"))
    before = [p.stat().st_size for p in shards]
    write_corpus(tmp_path / "corpus", TRAIN[:-5], VAL, train_shards=2)
    after = [p.stat().st_size for p in shards]
    assert all(a != b for a, b in zip(after, before, strict=True))
    with pytest.raises(DataError) as err:
        run(tok, corpus, tmp_path / "o", splits=("train",))
    changed = "; ".join(f"{p} ({b} bytes then, {a} now)" for p, b, a in zip(shards, before, after, strict=True))
    assert str(err.value) == (
        f"{tmp_path / 'o'} holds a train split prepared from source files that have changed since: {changed}. "
        f"Fix: prepare into a new --out, or delete {tmp_path / 'o'} (prepared data only) and re-run."
    )
    run(tok, corpus, tmp_path / "new")  # the first fix works


def _sidecar(out: pathlib.Path, name: str) -> dict:
    return json.loads((out / name).with_suffix(".json").read_text())


def test_records_skipped_after_the_last_document_are_counted(assets, tmp_path: pathlib.Path) -> None:
    # Trailing bad records (no document after them) count too, also when they come after a full shard, and a
    # re-run of the complete split (which rebuilds the counts from the shard sidecars) keeps them.
    tok, _ = assets
    lines = [json.dumps({"text": t}).encode() for t in TRAIN[:2]]
    lines += [json.dumps({"url": "no text"}).encode(), json.dumps({"text": "  \n "}).encode()]
    _write_raw_shard(tmp_path / "c" / "en" / "c4-train.00000-of-00001.json.gz", lines)
    for shard_tokens in (10**9, 1):
        out = tmp_path / f"out{shard_tokens}"
        for _ in range(2):
            m = run(tok, tmp_path / "c", out, splits=("train",), shard_tokens=shard_tokens)
            assert m["splits"]["train"]["skipped"] == {"missing_text": 1, "empty": 1}
            assert m["splits"]["train"]["docs"] == 2
        sidecars = [_sidecar(out, s["file"]) for s in m["splits"]["train"]["shards"]]
        assert sum(sum(s["skipped"].values()) for s in sidecars) == 2


def test_a_shard_closes_when_it_reaches_shard_tokens(assets, tmp_path: pathlib.Path) -> None:
    # Two documents of exactly shard_tokens tokens each: one shard each, the input ends exactly at a shard
    # boundary (the empty next shard is dropped and the last one marked as ending the split, on disk).
    tok, _ = assets
    n0 = len(load_tokenizer(tok).encode(TRAIN[0])) + 1  # + EOS
    doc = json.dumps({"text": TRAIN[0]}).encode()
    _write_raw_shard(tmp_path / "c" / "en" / "c4-train.00000-of-00001.json.gz", [doc, doc])
    out = tmp_path / "out"
    m = run(tok, tmp_path / "c", out, splits=("train",), shard_tokens=n0)
    shards = m["splits"]["train"]["shards"]
    assert [(s["file"], s["tokens"], s["docs"]) for s in shards] == [
        ("train-00000.bin", n0, 1),
        ("train-00001.bin", n0, 1),
    ]
    assert [p.name for p in sorted(out.iterdir()) if p.name.startswith("train-")] == [
        "train-00000.bin",
        "train-00000.json",
        "train-00001.bin",
        "train-00001.json",
    ]
    first, last = _sidecar(out, "train-00000.bin"), _sidecar(out, "train-00001.bin")
    assert (first["closed_by"], first["start_cursor"], first["end_cursor"]) == ("size", None, [0, 1])
    assert (last["closed_by"], last["start_cursor"], last["end_cursor"]) == ("end", [0, 1], [0, 2])


def test_a_limit_stops_exactly_on_it_and_a_rerun_keeps_the_split(assets, tmp_path: pathlib.Path) -> None:
    tok, corpus = assets
    limit = len(expected_stream(tok, TRAIN[:5]))  # the first 5 documents end exactly on the limit
    out = tmp_path / "out"
    m = run(tok, corpus, out, splits=("train",), max_tokens=limit)
    assert (m["splits"]["train"]["tokens"], m["splits"]["train"]["docs"]) == (limit, 5)
    np.testing.assert_array_equal(split_tokens(out, "train"), expected_stream(tok, TRAIN[:5]))
    before = _mtimes(out)
    assert run(tok, corpus, out, splits=("train",), max_tokens=limit) == m  # complete: nothing is added
    assert _mtimes(out) == before


def test_an_interrupted_split_refuses_other_settings(assets, tmp_path: pathlib.Path) -> None:
    tok, corpus = assets
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(tok, corpus, out, splits=("train",), source=_Interrupting(LocalSource(corpus, "train"), 70))
    assert list(out.glob("train-*.bin"))
    with pytest.raises(DataError, match=r"different settings \(shard_tokens\)\. Fix: re-run with the original"):
        run(tok, corpus, out, splits=("train",), shard_tokens=5000)


def test_another_tokenizer_for_a_new_split_of_an_existing_out_is_an_error(assets, tmp_path: pathlib.Path) -> None:
    # train has no record yet, but validation (and the manifest) were tokenized with another tokenizer.
    tok, corpus = assets
    out = tmp_path / "out"
    run(tok, corpus, out, splits=("validation",))
    other = tiny_tokenizer(tmp_path / "other.model", TRAIN, vocab_size=350)
    with pytest.raises(DataError, match=rf"^{re.escape(str(out))} was tokenized with a different tokenizer"):
        run(other, corpus, out, splits=("train",))
    assert not list(out.glob("train-*"))


def test_a_shard_is_fsynced_before_it_is_renamed(assets, tmp_path: pathlib.Path, monkeypatch) -> None:
    tok, corpus = assets
    renames = record_durable_renames(monkeypatch)
    m = run(tok, corpus, tmp_path / "out", splits=("train",))
    shards = [(dst, durable) for src, dst, durable in renames if src.endswith(".bin.tmp")]
    assert shards == [(s["file"], True) for s in m["splits"]["train"]["shards"]]


def test_uint32_shards_through_workers_and_resumed(assets, tmp_path: pathlib.Path, monkeypatch) -> None:
    tok, corpus = assets
    monkeypatch.setattr(prepare_module, "token_dtype", lambda v: np.dtype(np.uint32))
    out = tmp_path / "out"
    m = run(tok, corpus, out, splits=("train",), workers=1)
    np.testing.assert_array_equal(split_tokens(out, "train"), expected_stream(tok, TRAIN))
    assert [(out / s["file"]).stat().st_size for s in m["splits"]["train"]["shards"]] == [
        4 * s["tokens"] for s in m["splits"]["train"]["shards"]
    ]
    before = _mtimes(out)
    logged: list[str] = []
    assert run(tok, corpus, out, splits=("train",), log=logged.append) == m
    assert _mtimes(out) == before  # the finished uint32 shards are kept, not redone
    assert not any("damaged" in line for line in logged), logged


def test_a_sidecar_without_closed_by_is_redone(assets, tmp_path: pathlib.Path) -> None:
    tok, corpus = assets
    out = tmp_path / "out"
    ref = run(tok, corpus, out, splits=("train",))
    last = ref["splits"]["train"]["shards"][-1]["file"]
    meta = _sidecar(out, last)
    del meta["closed_by"]
    (out / last).with_suffix(".json").write_text(json.dumps(meta))
    logged: list[str] = []
    assert run(tok, corpus, out, splits=("train",), log=logged.append) == ref
    assert any(f"{last} is damaged" in line for line in logged), logged
    assert _sidecar(out, last)["closed_by"] == "end"


def test_an_input_without_records_gives_an_empty_split(assets, tmp_path: pathlib.Path) -> None:
    tok, _ = assets
    _write_raw_shard(tmp_path / "c" / "en" / "c4-train.00000-of-00001.json.gz", [])
    m = run(tok, tmp_path / "c", tmp_path / "out", splits=("train",))
    train = m["splits"]["train"]
    assert (train["tokens"], train["docs"], train["skipped"]) == (0, 0, {})
    assert [(s["file"], s["tokens"]) for s in train["shards"]] == [("train-00000.bin", 0)]
    assert (tmp_path / "out" / "train-00000.bin").stat().st_size == 0


def test_an_interrupted_split_is_left_out_of_the_manifest(assets, tmp_path: pathlib.Path) -> None:
    tok, corpus = assets
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run(tok, corpus, out, splits=("train",), source=_Interrupting(LocalSource(corpus, "train"), 70))
    m = run(tok, corpus, out, splits=("validation",))
    assert list(m["splits"]) == ["validation"]
    assert m["splits"]["validation"]["docs"] == len(VAL)
