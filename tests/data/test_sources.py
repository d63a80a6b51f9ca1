"""Document sources: the HF `datasets` json path and the gzip reader give the same documents in order."""

from __future__ import annotations

import builtins
import gzip
import hashlib
import json
import pathlib
import re
import sys
import types
from collections.abc import Iterator

import pytest

from data.errors import DataError
from data.preparation import c4_format
from data.preparation.sources import HubSource, LocalSource, make_source, resolve_local_files
from tests.helpers.corpus import make_texts, prepare_quietly, tiny_tokenizer, write_corpus

TRAIN = make_texts(90, seed=11)
VAL = make_texts(12, seed=12)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("src") / "c4", TRAIN, VAL, train_shards=4, validation_shards=2)


def texts(source, cursor=None):
    return [t for _, t, _ in source.events(cursor) if t is not None]


def test_resolve_local_files(corpus):
    files = resolve_local_files(corpus, "train")
    assert [p.name for p in files] == [c4_format.shard_name("train", i, 4) for i in range(4)]
    assert [p.name for p in resolve_local_files(str(corpus / "en" / "c4-validation.*.json.gz"), "validation")] == [
        c4_format.shard_name("validation", i, 2) for i in range(2)
    ]
    assert resolve_local_files(str(corpus / "en" / "c4-validation.*.json.gz"), "train") == []
    with pytest.raises(DataError, match="no train shards found.*fetch_assets"):
        LocalSource(corpus / "missing", "train")


def test_gzip_reader_reads_documents_in_order(corpus):
    assert texts(LocalSource(corpus, "train")) == TRAIN
    assert texts(LocalSource(corpus, "validation")) == VAL


def test_hf_json_path_equals_gzip_reader(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for split, expected in (("train", TRAIN), ("validation", VAL)):
        gz = LocalSource(corpus, split, reader="gzip")
        hf = LocalSource(corpus, split, reader="hf")
        assert texts(hf) == texts(gz) == expected
    # Resume cursors work on both paths.
    hf = LocalSource(corpus, "train", reader="hf")
    events = list(hf.events())
    assert texts(hf, events[40][0]) == TRAIN[41:]
    gz_events = list(LocalSource(corpus, "train").events())
    assert texts(LocalSource(corpus, "train"), gz_events[40][0]) == TRAIN[41:]


def test_prepare_via_hf_reader_equals_gzip_reader(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    tok = tiny_tokenizer(tmp_path / "tiny.model", TRAIN)
    sums = []
    for reader in ("gzip", "hf"):
        m = prepare_quietly(corpus, tok, tmp_path / reader, shard_tokens=800, splits=("train",), reader=reader)
        sums.append(m["splits"]["train"]["checksum"])
    assert sums[0] == sums[1]


def test_hub_source_uses_the_same_loader(monkeypatch):
    """`--source hf` calls load_dataset('allenai/c4', 'en', streaming=True) through the same function."""
    import datasets  # the optional `hf` extra: only the tests that need it import it

    calls = []

    def fake_load_dataset(path, name=None, data_files=None, split=None, streaming=False):
        calls.append((path, name, data_files, split, streaming))
        return datasets.IterableDataset.from_generator(lambda: iter([{"text": "a b"}, {"text": None}, {"text": "c"}]))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    src = make_source("hf", "validation")
    assert isinstance(src, HubSource)
    events = list(src.events())
    assert calls == [("allenai/c4", "en", None, "validation", True)]
    assert [(c, t, s) for c, t, s in events] == [(1, "a b", None), (2, None, "missing_text"), (3, "c", None)]
    assert json.dumps(src.describe())


def test_missing_datasets_package_names_the_fix(corpus, monkeypatch):
    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(DataError, match="pip install datasets"):
        next(LocalSource(corpus, "train", reader="hf").events())


def _hf_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _copy_corpus(corpus, dest):
    (dest / "en").mkdir(parents=True)
    for p in (corpus / "en").glob("c4-train.*.json.gz"):
        (dest / "en" / p.name).write_bytes(p.read_bytes())
    return dest


def test_hf_reader_names_the_file_with_a_bad_record(corpus, tmp_path, monkeypatch):
    # The gzip reader skips and counts a bad record; the HF reader cannot, so it stops naming the file and the
    # reader that can (not a pyarrow traceback).
    _hf_offline(tmp_path, monkeypatch)
    src = _copy_corpus(corpus, tmp_path / "c")
    bad = src / "en" / c4_format.shard_name("train", 2, 4)
    lines = gzip.decompress(bad.read_bytes()).splitlines(keepends=True)
    bad.write_bytes(gzip.compress(b"".join(lines[:3] + [b'{"text": "unterminated\n'] + lines[3:])))
    assert texts(LocalSource(src, "train")) == TRAIN  # the gzip reader: skipped
    with pytest.raises(DataError, match=rf"^{re.escape(str(bad))}: the HF reader cannot read a record.*--reader gzip"):
        list(LocalSource(src, "train", reader="hf").events())


@pytest.mark.parametrize("index", [0, 3])
def test_hf_reader_on_a_truncated_gzip_says_what_the_gzip_reader_says(corpus, tmp_path, monkeypatch, index):
    _hf_offline(tmp_path, monkeypatch)
    src = _copy_corpus(corpus, tmp_path / "c")
    bad = src / "en" / c4_format.shard_name("train", index, 4)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as gz:
        list(LocalSource(src, "train").events())
    with pytest.raises(DataError) as hf:
        list(LocalSource(src, "train", reader="hf").events())
    assert str(hf.value) == str(gz.value)
    assert str(hf.value).startswith(f"{bad}: corrupt or truncated gzip data")


def test_a_truncated_gzip_error_counts_the_lines_read_before_it(tmp_path: pathlib.Path) -> None:
    # Hex text barely compresses, so the cut lands well inside the line stream, after many whole lines.
    lines = [json.dumps({"text": hashlib.sha256(str(i).encode()).hexdigest() * 4}).encode() for i in range(3000)]
    path = tmp_path / c4_format.shard_name("train", 0, 1)
    data = gzip.compress(b"".join(line + b"\n" for line in lines))
    path.write_bytes(data[: len(data) // 2])
    read: list[int] = []
    with pytest.raises(DataError) as err:
        for line_no, text, _ in c4_format.iter_records(path):
            assert text == json.loads(lines[line_no])["text"]
            read.append(line_no)
    assert read == list(range(len(read))) and len(read) > 100
    assert f"corrupt or truncated gzip data after line {len(read)} (" in str(err.value)


def test_written_shards_are_byte_reproducible(tmp_path: pathlib.Path) -> None:
    (path,) = c4_format.write_shards([{"text": "a"}], tmp_path, "train", 1)
    assert path.name == "c4-train.00000-of-00001.json.gz" and not list(tmp_path.glob("*.tmp"))
    header = path.read_bytes()[:10]
    assert header[:3] == b"\x1f\x8b\x08" and header[4:8] == b"\x00\x00\x00\x00"  # RFC 1952: MTIME = 0
    assert gzip.decompress(path.read_bytes()) == b'{"text": "a"}\n'


class _FakeStream:
    """What `datasets.load_dataset(..., streaming=True)` returns, as far as the hub source uses it."""

    def __init__(self, records: list[dict]):
        self.records = records

    def skip(self, n: int) -> _FakeStream:
        return _FakeStream(self.records[n:])

    def __iter__(self) -> Iterator[dict]:
        return iter(self.records)


def test_hub_source_resumes_after_its_cursor(monkeypatch) -> None:
    records: list[dict] = [{"text": "a b"}, {"text": None}, {"text": "c"}, {"text": "d"}]
    hub = types.SimpleNamespace(load_dataset=lambda *args, **kwargs: _FakeStream(records))
    monkeypatch.setitem(sys.modules, "datasets", hub)
    assert list(HubSource("train").events(2)) == [(3, "c", None), (4, "d", None)]


def test_unreachable_hub_names_the_fix(monkeypatch) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(DataError) as err:
        list(HubSource("train").events())
    assert str(err.value) == (
        "cannot reach 'allenai/c4' on the HF hub (no route to host). Fix: run where the hub is reachable, or "
        "download the C4 json.gz shards (e.g. `huggingface-cli download allenai/c4 --repo-type dataset --include "
        "'en/c4-train.0000*'`) and pass that folder as --source."
    )


def test_a_glob_of_other_names_splits_on_validation_in_the_name(tmp_path) -> None:
    for name in ("b-validation-0.json.gz", "a-part-0.json.gz", "c-part-1.json.gz"):
        (tmp_path / name).write_bytes(b"")
    pattern = str(tmp_path / "*.json.gz")
    assert [p.name for p in resolve_local_files(pattern, "validation")] == ["b-validation-0.json.gz"]
    assert [p.name for p in resolve_local_files(pattern, "train")] == ["a-part-0.json.gz", "c-part-1.json.gz"]


def test_an_unknown_reader_is_refused(corpus) -> None:
    with pytest.raises(ValueError, match=r"^reader must be 'gzip' or 'hf', got 'arrow'$"):
        LocalSource(corpus, "train", reader="arrow")
