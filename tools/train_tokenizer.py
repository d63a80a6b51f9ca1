"""Train your own SentencePiece model on local C4-format shards (T5's model stays the default).

    python tools/train_tokenizer.py --source .cache/corpus/sample --out my.model --vocab_size 8000
    python tools/prepare_data.py --tokenizer my.model --out .cache/tokens/mytok
    # then train with data.tokenizer=my.model, data.prepared_dir=.cache/tokens/mytok

The model uses T5's id layout (pad 0, eos 1, unk 2, no bos), which the pipeline expects. An existing
--out is refused unless --force is given: data prepared with it records its sha256, so training refuses
that data once the model is replaced. The model depends on --threads (SentencePiece's trainer gives
different models on 1 and 2 threads): pass the same --threads to train the same model again.
"""

from __future__ import annotations

import argparse
import itertools
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from data.errors import DataError
from data.files import sha256_file
from data.paths import check_output_path, resolve_path, sample_corpus_dir
from data.preparation.sources import LocalSource
from data.preparation.tokenizer_training import train_sentencepiece
from data.tokenizer import load_tokenizer
from trainer.flag_parser import FlagParser, int_at_least


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--source",
        default=str(sample_corpus_dir()),
        help="folder/glob of C4 json.gz shards; a relative path is taken from the current directory "
        "(default: the sample corpus)",
    )
    ap.add_argument(
        "--out",
        required=True,
        help="output .model path; a relative path is taken from the repo root (one starting with .cache/ from "
        "MEMOPT_CACHE when set). An existing file is refused unless --force",
    )
    ap.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out (data prepared with the old model is then refused by training)",
    )
    ap.add_argument("--vocab_size", type=int_at_least(1), default=32000)
    ap.add_argument("--model_type", choices=["unigram", "bpe"], default="unigram")
    ap.add_argument("--character_coverage", type=float, default=0.9995)
    ap.add_argument(
        "--byte_fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encode unknown characters as UTF-8 bytes instead of <unk> (default: on)",
    )
    ap.add_argument("--max_docs", type=int_at_least(1), default=1_000_000, help="documents read from the train split")
    ap.add_argument(
        "--input_sentence_size", type=int_at_least(1), default=2_000_000, help="lines sampled by SentencePiece"
    )
    ap.add_argument(
        "--threads",
        type=int_at_least(1),
        default=os.cpu_count() or 1,
        help="trainer threads (default: this machine's CPU count). The model depends on it: pass the same "
        "--threads to train the same model on another machine or again",
    )
    args = ap.parse_args(argv)
    out = resolve_path(args.out)
    try:
        # Checked before training (minutes to hours), which would otherwise fail or overwrite only at its end.
        check_output_path(out, "--out", directory=False)
        if out.exists() and not args.force:
            raise DataError(
                f"--out {out} already exists; data prepared with it records its sha256, and training refuses "
                "that data once the model is replaced. Fix: choose a new --out, or pass --force to replace it."
            )
        source = LocalSource(args.source, "train")
        docs = (t for _, t, _ in source.events() if t is not None and t.strip())
        t0 = time.perf_counter()
        train_sentencepiece(
            itertools.islice(docs, args.max_docs),
            out,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            input_sentence_size=args.input_sentence_size,
            num_threads=args.threads,
        )
        load_tokenizer(out)  # validates the id layout
    except (DataError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"wrote {out} ({args.model_type}, vocab {args.vocab_size}) in {time.perf_counter() - t0:.1f}s, "
        f"sha256 {sha256_file(out)[:16]}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
