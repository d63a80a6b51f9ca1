"""Tokenizer resolution, identity check, dtype choice, training, and T5 ids through the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import sentencepiece as spm

from data.errors import DataError
from data.files import sha256_file
from data.paths import REPO_ROOT, resolve_path, t5_tokenizer_path
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


def test_hash_check(tmp_path):
    a = tiny_tokenizer(tmp_path / "a.model", TEXTS)
    check_tokenizer_matches(sha256_file(a), a, "x")
    with pytest.raises(DataError, match="different tokenizer.*Fix"):
        check_tokenizer_matches("0" * 64, a, "x")


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
