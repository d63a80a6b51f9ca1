"""Tokenize C4-format text into token shards + manifest.json for training.

Sample corpus (after `python tools/fetch_assets.py`), into .cache/tokens/sample:
    python tools/prepare_data.py
C4 from the HF hub (needs `pip install datasets` and internet), one pass for every paper run (the longest,
550m_galore_r80 FLOP-matched, reads 11.4B tokens):
    python tools/prepare_data.py --source hf --out /data/tokens/c4 --max_tokens 11.4B --workers 32
A folder of C4 json.gz shards (en/c4-train.*.json.gz, en/c4-validation.*.json.gz):
    python tools/prepare_data.py --source /data/c4 --out /data/tokens/c4 --max_tokens 11.4B

Re-running the same command resumes: finished shards are re-hashed and kept, a damaged one is
redone with those after it, and manifest.json is rewritten, so it is also the repair that a
training run's "damaged prepared data" error names. Train with data.prepared_dir=<--out> and
data.tokenizer=<--tokenizer>; each run verifies the data as data.verify says.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from data.config import DataConfig
from data.errors import DataError
from data.manifest import DEFAULT_SHARD_TOKENS
from data.paths import cache_root, check_output_path, resolve_path, sample_corpus_dir, sample_tokens_dir
from data.preparation.prepare import PrepareOptions, SplitPlan, prepare
from data.preparation.sources import make_source
from data.tokenizer import resolve_tokenizer_path
from trainer.flag_parser import FlagParser, int_at_least

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def count(text: str) -> int:
    """'4.2B', '8400M', '1_048_576', '1e6' -> int."""
    t = text.strip().lower().replace("_", "").replace(",", "")
    if t and t[-1] in _SUFFIX:
        return int(round(float(t[:-1]) * _SUFFIX[t[-1]]))
    return int(float(t))


def positive_count(text: str) -> int:
    """count(), refused unless >= 1: a limit of 0 or less would not mean "no limit" (leave the flag out for
    that) but stop after one document, and a shard size of 0 would give one shard per document."""
    try:
        n = count(text)
    except (ValueError, OverflowError):  # OverflowError: 'inf'
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 4.2B, 8400M, 1_048_576, 1e6)") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return n


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--source",
        default=None,
        help="'hf' (allenai/c4 'en' streamed from the hub) or a folder/glob of C4 json.gz shards; a relative "
        "path is taken from the current directory (default: the sample corpus)",
    )
    ap.add_argument(
        "--reader",
        choices=["gzip", "hf"],
        default="gzip",
        help="reader for local shards: plain gzip+json (default) or HF datasets' json builder",
    )
    ap.add_argument("--split", choices=["train", "validation", "both"], default="both")
    ap.add_argument(
        "--out",
        default=None,
        help="output dir; a relative path is taken from the repo root (one starting with .cache/ from MEMOPT_CACHE "
        "when set) (default: .cache/tokens/sample for the sample corpus, .cache/tokens/c4 otherwise)",
    )
    ap.add_argument(
        "--tokenizer",
        default="t5",
        help="'t5' (cached T5 spiece.model) or a SentencePiece .model path; a relative path is taken from the repo "
        "root (one starting with .cache/ from MEMOPT_CACHE when set)",
    )
    ap.add_argument(
        "--workers",
        type=int_at_least(0),
        default=os.cpu_count() or 1,
        help="tokenizer processes (0 = tokenize in this process)",
    )
    ap.add_argument(
        "--max_tokens", type=positive_count, default=None, help="train split: stop after this many tokens (e.g. 4.2B)"
    )
    ap.add_argument("--max_docs", type=positive_count, default=None, help="train split: stop after this many documents")
    ap.add_argument(
        "--val_tokens",
        type=positive_count,
        default=DataConfig.val_tokens,
        help="validation split: stop after this many tokens (default: DataConfig.val_tokens; no validation "
        "split: --split train)",
    )
    ap.add_argument(
        "--shard_tokens", type=positive_count, default=DEFAULT_SHARD_TOKENS, help="tokens per output shard (about)"
    )
    ap.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)

    source = args.source or str(sample_corpus_dir())
    if args.out:
        out = resolve_path(args.out)
    else:
        out = sample_tokens_dir() if args.source is None else cache_root() / "tokens" / "c4"
    splits = ["train", "validation"] if args.split == "both" else [args.split]
    try:
        check_output_path(out, "--out", directory=True)  # before loading the tokenizer and opening the source
        tokenizer_path = resolve_tokenizer_path(args.tokenizer)
        plans = []
        for split in splits:
            src = make_source(source, split, args.reader)
            if split == "train":
                plans.append(SplitPlan(split, src, max_tokens=args.max_tokens, max_docs=args.max_docs))
            else:
                plans.append(SplitPlan(split, src, max_tokens=args.val_tokens))
        print(
            f"preparing {', '.join(splits)} from {source} -> {out} (tokenizer {tokenizer_path}, "
            f"{f'{args.workers} worker(s)' if args.workers else 'tokenized in this process'})"
        )
        prepare(
            plans,
            PrepareOptions(
                out=out,
                tokenizer_path=tokenizer_path,
                workers=args.workers,
                shard_tokens=args.shard_tokens,
                progress=not args.no_progress,
            ),
        )
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
