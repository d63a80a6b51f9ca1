"""Training a SentencePiece model with the ids this pipeline expects (T5 convention).

pad = 0, eos = 1, unk = 2, no bos: the same layout as T5's spiece.model, so a custom
model is a drop-in replacement (data/tokenizer.py checks these ids on load).
"""

from __future__ import annotations

import io
import pathlib
from collections.abc import Iterable
from typing import Any

import sentencepiece as spm

from data.files import write_bytes_atomic


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | pathlib.Path,
    *,
    vocab_size: int = 32000,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 1,
    **extra: Any,
) -> pathlib.Path:
    """Train on `texts` (one document per item) and write `model_path` (a .model file)."""
    model_path = pathlib.Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=(line for text in texts for line in text.splitlines() if line.strip()),
        model_writer=proto,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
        **extra,
    )
    write_bytes_atomic(model_path, proto.getvalue())
    return model_path
