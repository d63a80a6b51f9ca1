"""Fetch the T5 tokenizer and build the sample corpus into the cache (idempotent).

    python tools/fetch_assets.py            # both
    python tools/fetch_assets.py --only tokenizer

Cache root: <repo>/.cache, or $MEMOPT_CACHE.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from data.assets.sample_corpus import fetch_sample_corpus
from data.assets.t5_tokenizer import fetch_t5_tokenizer
from data.errors import DataError
from trainer.flag_parser import FlagParser


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["tokenizer", "corpus"], help="fetch just one asset")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        if args.only in (None, "tokenizer"):
            fetch_t5_tokenizer()
        if args.only in (None, "corpus"):
            fetch_sample_corpus()
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"assets ready in {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
