"""Tokenizer resolution, identity check, dtype choice, training, and T5 ids through the pipeline."""

from __future__ import annotations

import hashlib
import os
import pathlib

import numpy as np
import pytest
import sentencepiece as spm

from data import DataConfig, files
from data.errors import DataError
from data.files import sha256_file
from data.paths import REPO_ROOT, resolve_path, sample_tokens_dir, t5_tokenizer_path
from data.preparation.encoding import encode_texts
from data.preparation.tokenizer_training import train_sentencepiece
from data.tokenizer import EOS_ID, check_tokenizer_matches, load_tokenizer, resolve_tokenizer_path, token_dtype
from tests.helpers.corpus import make_texts, tiny_tokenizer

TEXTS = make_texts(60, seed=31) + ["Ünïcödé café 中文 — and emoji 🙂.", "", "  two  spaces\nand a newline "]


def test_paths_are_relative_to_the_repo_and_follow_memopt_cache(monkeypatch, tmp_path):
    assert resolve_path("configs/x.yaml") == REPO_ROOT / "configs" / "x.yaml"
    monkeypatch.delenv("MEMOPT_CACHE", raising=False)
    assert resolve_path(".cache/tokens/sample") == REPO_ROOT / ".cache" / "tokens" / "sample"
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    assert resolve_path(".cache/tokens/sample") == tmp_path / "tokens" / "sample"
    assert t5_tokenizer_path() == tmp_path / "tokenizers" / "t5" / "spiece.model"
    assert resolve_path(tmp_path / "abs") == tmp_path / "abs"


def test_a_home_relative_path_or_cache_is_expanded(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_path("~/tokens/c4") == tmp_path / "tokens" / "c4"
    monkeypatch.setenv("MEMOPT_CACHE", "~/big/cache")
    assert resolve_path(".cache/tokens/sample") == tmp_path / "big" / "cache" / "tokens" / "sample"


def test_the_default_data_config_opens_what_prepare_data_writes_by_default(monkeypatch, tmp_path):
    """tools/prepare_data.py with no --out writes <cache>/tokens/sample; a run with no data.prepared_dir reads
    it there, wherever MEMOPT_CACHE points; quick verification is the documented default."""
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    assert sample_tokens_dir() == tmp_path / "tokens" / "sample"
    assert resolve_path(DataConfig().prepared_dir) == tmp_path / "tokens" / "sample"
    assert DataConfig().verify == "quick"


def test_resolve_tokenizer_path(monkeypatch, tmp_path):
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path))
    with pytest.raises(DataError, match="fetch_assets.py"):
        resolve_tokenizer_path("t5")
    t5 = t5_tokenizer_path()
    t5.parent.mkdir(parents=True)
    t5.write_bytes(b"x")
    assert resolve_tokenizer_path("t5") == t5
    assert resolve_tokenizer_path(str(t5)) == t5
    with pytest.raises(DataError, match="not found.*train_tokenizer.py"):
        resolve_tokenizer_path(str(tmp_path / "none.model"))


def test_token_dtype():
    assert token_dtype(32000) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535
    assert token_dtype(65537) == np.uint32
    assert token_dtype(1 << 32) == np.uint32  # ids 0..2**32-1
    with pytest.raises(DataError, match="vocab_size=4294967297 does not fit uint32"):
        token_dtype((1 << 32) + 1)


def test_trained_model_has_t5_ids_and_pipeline_matches_sentencepiece(tmp_path):
    path = train_sentencepiece(
        TEXTS, tmp_path / "bpe.model", vocab_size=400, model_type="bpe", character_coverage=1.0, byte_fallback=True
    )
    sp = load_tokenizer(path)
    assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
    assert sp.vocab_size() == 400
    flat, lengths = encode_texts(sp, TEXTS, np.dtype(np.uint16))
    expected = [i for t in TEXTS for i in sp.encode(t) + [EOS_ID]]
    assert flat.tolist() == expected and lengths.tolist() == [len(sp.encode(t)) + 1 for t in TEXTS]
    assert sp.decode(sp.encode("café 中文")) == "café 中文"  # byte fallback round-trips unseen characters


def test_tokenizer_without_t5_ids_is_rejected(tmp_path):
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS), model_prefix=str(tmp_path / "plain"), vocab_size=120, minloglevel=2
    )  # default ids: unk 0, bos 1, eos 2
    with pytest.raises(DataError, match="eos_id=2.*train_tokenizer.py"):
        load_tokenizer(tmp_path / "plain.model")


def test_tokenizer_with_t5_eos_but_no_pad_is_rejected(tmp_path: pathlib.Path) -> None:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS),
        model_prefix=str(tmp_path / "nopad"),
        vocab_size=120,
        eos_id=1,
        bos_id=-1,
        unk_id=0,
        pad_id=-1,
        minloglevel=2,
    )
    with pytest.raises(DataError, match="eos_id=1, pad_id=-1.*train_tokenizer.py"):
        load_tokenizer(tmp_path / "nopad.model")


def test_a_rewritten_model_is_loaded_again(tmp_path: pathlib.Path) -> None:
    path = tiny_tokenizer(tmp_path / "m.model", TEXTS, vocab_size=400)
    os.utime(path, ns=(10**18, 10**18))
    assert load_tokenizer(path).vocab_size() == 400
    tiny_tokenizer(path, TEXTS, vocab_size=350)
    os.utime(path, ns=(2 * 10**18, 2 * 10**18))  # a distinct mtime even on a coarse clock
    assert load_tokenizer(path).vocab_size() == spm.SentencePieceProcessor(model_file=str(path)).vocab_size() == 350


def test_train_sentencepiece_defaults_to_byte_fallback_and_creates_the_folder(tmp_path: pathlib.Path) -> None:
    path = train_sentencepiece(TEXTS, tmp_path / "new" / "dir" / "m.model", vocab_size=400, hard_vocab_limit=False)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sum(sp.is_byte(i) for i in range(sp.vocab_size())) == 256  # <0x00>..<0xFF>
    assert sp.decode(sp.encode("中文")) == "中文"


def test_documents_longer_than_a_sentencepiece_sentence_are_trained_on_line_by_line(tmp_path: pathlib.Path) -> None:
    # C4 documents often exceed sentencepiece's 4192-byte max_sentence_length: whole, they would all be dropped.
    docs = ["\n".join(TEXTS[i : i + 30]) for i in (0, 30)]
    assert min(len(d.encode()) for d in docs) > 4192
    sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer(tmp_path / "m.model", docs)))
    assert sp.vocab_size() > 256 + 3  # pieces learned from the text, beyond the byte pieces and pad/eos/unk


def test_an_interrupted_tokenizer_write_keeps_the_old_model(tmp_path: pathlib.Path, monkeypatch) -> None:
    path = tmp_path / "m.model"
    path.write_bytes(b"old")

    def interrupted(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tiny_tokenizer(path, TEXTS)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["m.model"]


def test_hash_check(tmp_path):
    a = tiny_tokenizer(tmp_path / "a.model", TEXTS)
    check_tokenizer_matches(sha256_file(a), a, "x")
    with pytest.raises(DataError, match="different tokenizer.*Fix"):
        check_tokenizer_matches("0" * 64, a, "x")
    actual = hashlib.sha256(a.read_bytes()).hexdigest()
    with pytest.raises(DataError, match="different tokenizer"):  # the whole digest counts, not the shown prefix
        check_tokenizer_matches(actual[:-1] + ("1" if actual[-1] == "0" else "0"), a, "x")


def test_real_t5_ids_through_the_pipeline():
    path = t5_tokenizer_path()
    if not path.is_file():
        pytest.skip("T5 tokenizer not cached (run tools/fetch_assets.py; the test command does)")
    direct = spm.SentencePieceProcessor(model_file=str(path))
    sp = load_tokenizer(path)
    assert sp.vocab_size() == 32000 and token_dtype(sp.vocab_size()) == np.uint16
    flat, _ = encode_texts(sp, TEXTS, np.dtype(np.uint16))
    assert flat.tolist() == [i for t in TEXTS for i in direct.encode(t) + [1]]
    assert direct.encode("Hello world.") == [8774, 296, 5]
