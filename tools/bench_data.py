"""Measure the data path on the sample corpus (prints figures; asserts nothing).

    python tools/fetch_assets.py && python tools/prepare_data.py   # once
    python tools/bench_data.py [--seq_len 512 --global_batch 64 --steps 300]

1. Tokenization: the pipeline's per-worker encode (ids + EOS into a uint16 array) vs raw
   `sentencepiece.encode` on the same texts in the same process (target >= 0.9x), and
   end-to-end prepare throughput (read gzip, tokenize, write shards) with 1 and 2 workers.
2. Loader: tokens/s delivered as ready (inputs, targets) batches from the prepared
   shards (target > 5M tokens/s), and cold start -> first batch time, for 0 and 2
   DataLoader workers.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import pathlib
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np

from data.config import DataConfig
from data.paths import sample_corpus_dir
from data.preparation.encoding import encode_texts
from data.preparation.prepare import PrepareOptions, SplitPlan, prepare
from data.preparation.sources import LocalSource
from data.tokenizer import load_tokenizer, resolve_tokenizer_path


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def prepare_sample_train(tokenizer_path: pathlib.Path, workers: int) -> None:
    """tools/prepare_data.py's work on the sample corpus's train split, into a temp dir."""
    with tempfile.TemporaryDirectory() as tmp:
        prepare(
            [SplitPlan("train", LocalSource(sample_corpus_dir(), "train"))],
            PrepareOptions(
                out=pathlib.Path(tmp),
                tokenizer_path=tokenizer_path,
                workers=workers,
                progress=False,
                log=lambda *_: None,
            ),
        )


def bench_tokenization(tokenizer: str, repeats: int) -> None:
    path = resolve_tokenizer_path(tokenizer)
    sp = load_tokenizer(path)
    texts = [t for _, t, _ in LocalSource(sample_corpus_dir(), "train").events() if t]
    batches = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    n_tokens = sum(len(x) + 1 for x in sp.encode(texts))
    raw = raw1 = ours = float("inf")
    for _ in range(repeats):  # interleaved, best of: the machine may be shared
        raw = min(raw, best_of(lambda: [sp.encode(b) for b in batches], 1))
        raw1 = min(raw1, best_of(lambda: [sp.encode(b, num_threads=1) for b in batches], 1))
        ours = min(ours, best_of(lambda: [encode_texts(sp, b, np.dtype(np.uint16)) for b in batches], 1))
    print(f"tokenization, {len(texts):,} docs / {n_tokens:,} tokens, batches of 256 docs, best of {repeats}:")
    print(f"  raw sentencepiece.encode (default threads): {n_tokens / raw / 1e6:6.2f} M tok/s")
    print(f"  raw sentencepiece.encode (num_threads=1)  : {n_tokens / raw1 / 1e6:6.2f} M tok/s")
    print(
        f"  pipeline encode per worker (+EOS, uint16) : {n_tokens / ours / 1e6:6.2f} M tok/s = "
        f"{raw1 / ours:.2f}x raw single-thread, {raw / ours:.2f}x raw default"
    )
    rates = {}
    for workers in (1, 2):
        rates[workers] = n_tokens / best_of(functools.partial(prepare_sample_train, path, workers), repeats)
        print(f"  prepare end to end, {workers} worker(s): {rates[workers] / 1e6:6.2f} M tok/s")
    print(f"  scaling 1 -> 2 workers: {rates[2] / rates[1]:.2f}x")


def bench_loader(cfg: DataConfig, global_batch: int, steps: int) -> None:
    # Imported here, after the tokenization benchmark, so its forked prepare workers start from a
    # process without torch, as under tools/prepare_data.py.
    from data import TrainBatches

    print(f"loader, seq_len {cfg.seq_len}, global batch {global_batch}, {steps} steps:")
    for workers in (0, 2):
        c = dataclasses.replace(cfg, num_workers=workers)
        t0 = time.perf_counter()
        tb = TrainBatches(c, global_batch=global_batch)
        it = tb.batches(0)
        next(it)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in itertools.islice(it, steps):
            pass
        dt = time.perf_counter() - t0
        print(
            f"  {workers} DataLoader workers: cold start -> first batch {first * 1e3:7.1f} ms, "
            f"{steps * tb.tokens_per_step / dt / 1e6:7.1f} M tok/s ({steps / dt:,.0f} batches/s)"
        )
        del it


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="t5")
    ap.add_argument("--prepared_dir", default=DataConfig.prepared_dir)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--global_batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    bench_tokenization(args.tokenizer, args.repeats)
    bench_loader(
        DataConfig(prepared_dir=args.prepared_dir, tokenizer=args.tokenizer, seq_len=args.seq_len),
        args.global_batch,
        args.steps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
