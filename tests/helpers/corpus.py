"""Tiny, deterministic fixtures for tests and benchmarks: C4-format corpora, SentencePiece models,
prepared token directories.

Made in a temp dir in about a second, so most tests need neither the network nor the
real T5 model.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from data.preparation import c4_format
from data.preparation.prepare import PrepareOptions, SplitPlan, prepare
from data.preparation.sources import LocalSource
from data.preparation.tokenizer_training import train_sentencepiece

_WORDS = (
    "the of and to in a is that for it as was with be by on not he this are or his from at which but have "
    "an they you were her she there been one all we their has would when if so no will more about can its "
    "model data train token window batch shard river city music history garden engine paper winter light "
    "café naïve résumé Zürich über"
).split()


def make_texts(n_docs: int, seed: int = 0, min_words: int = 5, max_words: int = 120) -> list[str]:
    """Pseudo-English documents of varying length (a few with accents/multi-line)."""
    rng = np.random.default_rng(seed)
    texts = []
    for i in range(n_docs):
        n = int(rng.integers(min_words, max_words))
        words = [_WORDS[j] for j in rng.integers(0, len(_WORDS), n)]
        words[0] = words[0].capitalize()
        text = " ".join(words) + "."
        if i % 7 == 3:
            text = text.replace(" the ", ".\nThe ", 1)
        texts.append(text)
    return texts


def write_corpus(
    root: pathlib.Path, train: list[str], validation: list[str], train_shards: int = 3, validation_shards: int = 1
) -> pathlib.Path:
    """C4-format shards under root/en/; returns root."""

    def records(texts, split):
        return [
            {"text": t, "timestamp": "2019-04-25T12:57:54Z", "url": f"https://example.com/{split}/{i}"}
            for i, t in enumerate(texts)
        ]

    c4_format.write_shards(records(train, "train"), root / "en", "train", train_shards)
    c4_format.write_shards(records(validation, "validation"), root / "en", "validation", validation_shards)
    return root


def tiny_tokenizer(path: pathlib.Path, texts: list[str], vocab_size: int = 400, **kw) -> pathlib.Path:
    """A small unigram model (byte fallback needs vocab > ~300; soft limit for tiny corpora)."""
    kw.setdefault("hard_vocab_limit", False)
    return train_sentencepiece(
        texts, path, vocab_size=vocab_size, model_type="unigram", character_coverage=1.0, byte_fallback=True, **kw
    )


def prepare_quietly(
    corpus: pathlib.Path,
    tokenizer: pathlib.Path,
    out: pathlib.Path,
    *,
    shard_tokens: int,
    splits: Sequence[str] = ("train", "validation"),
    reader: str = "gzip",
) -> dict:
    """Prepare a local corpus into `out` in this process (no workers), printing nothing; returns the manifest."""
    return prepare(
        [SplitPlan(split, LocalSource(corpus, split, reader)) for split in splits],
        PrepareOptions(
            out=out, tokenizer_path=tokenizer, workers=0, shard_tokens=shard_tokens, progress=False, log=lambda *_: None
        ),
    )


def split_tokens(out: pathlib.Path, split: str) -> np.ndarray:
    """A prepared split's token stream (int64), read straight from its shard files (not through TokenStore)."""
    manifest = json.loads((out / "manifest.json").read_text())
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in shards]).astype(np.int64)
