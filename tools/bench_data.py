"""Measure the data path on the sample corpus (prints figures; asserts nothing).

    python tools/fetch_assets.py && python tools/prepare_data.py   # once
    python tools/bench_data.py [--seq_len 512 --global_batch 64 --steps 300]

1. Tokenization: the pipeline's per-worker encode (ids + EOS into a uint16 array) vs raw
   `sentencepiece.encode` on the same texts in the same process (target >= 0.9x), and
   end-to-end prepare throughput (read gzip, tokenize, write shards) with 1 and 2 workers.
2. Loader: tokens/s delivered as ready (inputs, targets) batches from the prepared
   shards (target > 5M tokens/s), and cold start -> first batch time, for 0 and 2
   DataLoader workers.

Start-up verification (data.verify), instead of the above:

    python tools/bench_data.py --verify_bench .cache/tokens/sample
    python tools/bench_data.py --verify_synthetic 1.1e9 [--tmp_dir /big/disk]

times data/loading/verify.py on a split: full (cold and warm page cache, 1 and the default
number of threads), quick (first open: hashes and fills the cache; second open: from the
cache) and off, as a table of seconds and GB/s of shard data. "cold" drops the shards from
the OS page cache first (fsync + posix_fadvise DONTNEED): cold-ish, a VM host's or the
disk's own cache may still serve them. Nothing is written into the prepared directory (the
quick-mode cache goes to a temp file). --verify_synthetic writes a set of N random valid
tokens (T5 vocabulary) with the preparation's own shard and manifest writers into a temp
dir, benchmarks it and deletes it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import os
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import numpy as np

from data import manifest as mf
from data.config import DataConfig
from data.files import sha256_file
from data.loading import verify
from data.paths import resolve_path, sample_corpus_dir
from data.preparation.encoding import encode_texts
from data.preparation.manifest_writer import write_manifest
from data.preparation.prepare import PrepareOptions, SplitPlan, prepare
from data.preparation.shard_files import ShardWriter, shard_path
from data.preparation.sources import LocalSource
from data.tokenizer import load_tokenizer, resolve_tokenizer_path, token_dtype
from trainer.flag_parser import FlagParser


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


def drop_page_cache(paths: list[pathlib.Path]) -> bool:
    """Ask the OS to drop these files from its page cache (fsync, then POSIX_FADV_DONTNEED); False if it cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def write_synthetic(out: pathlib.Path, tokenizer_path: pathlib.Path, n_tokens: int, shard_tokens: int) -> dict:
    """A prepared dir whose train split is n_tokens random valid ids, written with preparation's shard and
    manifest writers (so verification sees exactly what tools/prepare_data.py would write); returns the manifest."""
    vocab = load_tokenizer(tokenizer_path).vocab_size()
    dtype = token_dtype(vocab)
    rng = np.random.default_rng(0)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, n_tokens, shard_tokens)):
        writer = ShardWriter(shard_path(out, "train", index), start_cursor=start)
        size = min(shard_tokens, n_tokens - start)
        for lo in range(0, size, 1 << 23):
            writer.append(rng.integers(0, vocab, min(1 << 23, size - lo), dtype=dtype))
        writer.docs, writer.end_cursor = 1, start + size
        shards.append(writer.finish(dtype, "end" if start + size == n_tokens else "size"))
    tok_sha = sha256_file(tokenizer_path)
    entry_shards = [{k: s[k] for k in ("file", "tokens", "docs", "sha256")} for s in shards]
    entry = {
        "tokens": n_tokens,
        "docs": len(shards),
        "skipped": {},
        "source": {"kind": "synthetic", "generator": "numpy default_rng(0).integers(0, vocab)"},
        "limits": {"max_tokens": n_tokens, "max_docs": None, "shard_tokens": shard_tokens},
        "checksum": mf.split_checksum(dtype.name, tok_sha, entry_shards),
        "shards": entry_shards,
    }
    return write_manifest(out, {"train": entry}, tokenizer_path, tok_sha, vocab, dtype)


def bench_verify(
    prepared_dir: pathlib.Path, split: str, repeats: int, tokenizer: str = "t5"
) -> list[tuple[str, float, int]]:
    """Time verify_split per mode (see the module doc); prints the table, returns (mode, seconds, shards hashed)."""
    from data.loading.prepared_split import open_split

    cfg = DataConfig(prepared_dir=str(prepared_dir), tokenizer=tokenizer, verify="off")
    base = best_of(lambda: open_split(cfg, split), repeats)  # everything but the shard checks
    manifest = mf.read_manifest(prepared_dir)
    shards = [prepared_dir / s["file"] for s in manifest["splits"][split]["shards"]]
    n_bytes = sum(p.stat().st_size for p in shards)
    rows: list[tuple[str, float, int]] = []
    verify.RACY_NS = 0  # cache even files written a moment ago (a fresh copy or synthetic set): we time the cache
    with tempfile.TemporaryDirectory() as tmp:
        cache = pathlib.Path(tmp) / "verified.json"

        def timed(label: str, mode: verify.VerifyMode, cold: bool = False, threads: int | None = None) -> None:
            best, hashed = float("inf"), 0
            saved = verify.MAX_THREADS
            verify.MAX_THREADS = threads or saved
            try:
                for _ in range(1 if cold else repeats):
                    if mode == "quick" and cold:
                        cache.unlink(missing_ok=True)  # a first open: nothing cached yet
                    if cold and not drop_page_cache(shards):
                        label = label.replace("cold", "page cache not dropped")
                    t0 = time.perf_counter()
                    hashed = verify.verify_split(prepared_dir, manifest, split, mode, cache=cache)["hashed"]
                    best = min(best, time.perf_counter() - t0)
            finally:
                verify.MAX_THREADS = saved
            rows.append((label, best, hashed))

        timed("full, cold", "full", cold=True)
        timed("full, warm", "full")
        timed("full, warm, 1 thread", "full", threads=1)
        timed("quick, first open, cold", "quick", cold=True)
        timed("quick, second open", "quick")
        timed("off", "off")
    n_tokens = manifest["splits"][split]["tokens"]
    print(
        f"verification of {prepared_dir} [{split}]: {len(shards)} shard(s), {n_bytes / 1e9:.3f} GB "
        f"({n_tokens:,} {manifest['dtype']} tokens), {os.cpu_count()} CPU(s), {verify.hash_threads(len(shards))} "
        f"hashing thread(s); warm rows best of {repeats}. The rest of opening the split (manifest, tokenizer "
        f"identity) takes {base:.4f} s."
    )
    print(f"  {'mode':<26}{'seconds':>10}{'GB/s':>10}{'hashed':>8}")
    for label, seconds, hashed in rows:
        print(f"  {label:<26}{seconds:>10.4f}{n_bytes / seconds / 1e9:>10.2f}{hashed:>8}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default="t5")
    ap.add_argument("--prepared_dir", default=DataConfig.prepared_dir)
    ap.add_argument("--seq_len", type=int, default=512)
    ap.add_argument("--global_batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--verify_bench", "--verify-bench", metavar="DIR", help="time start-up verification of DIR")
    ap.add_argument(
        "--verify_synthetic",
        metavar="N",
        type=lambda t: int(float(t)),
        help="time verification of a synthetic set of N tokens (e.g. 1.1e9), made in and deleted from --tmp_dir",
    )
    ap.add_argument("--verify_split", default="train")
    ap.add_argument("--shard_tokens", type=lambda t: int(float(t)), default=mf.DEFAULT_SHARD_TOKENS)
    ap.add_argument("--tmp_dir", default=None, help="where --verify_synthetic writes (default: the system temp dir)")
    args = ap.parse_args(argv)
    if args.verify_bench:
        bench_verify(resolve_path(args.verify_bench), args.verify_split, args.repeats, args.tokenizer)
        return 0
    if args.verify_synthetic:
        tmp = pathlib.Path(tempfile.mkdtemp(prefix="verify-bench-", dir=args.tmp_dir))
        try:
            t0 = time.perf_counter()
            write_synthetic(tmp, resolve_tokenizer_path(args.tokenizer), args.verify_synthetic, args.shard_tokens)
            print(f"wrote a synthetic prepared set in {time.perf_counter() - t0:.1f}s: {tmp}")
            bench_verify(tmp, "train", args.repeats, args.tokenizer)
        finally:
            shutil.rmtree(tmp)
        return 0
    bench_tokenization(args.tokenizer, args.repeats)
    bench_loader(
        DataConfig(prepared_dir=args.prepared_dir, tokenizer=args.tokenizer, seq_len=args.seq_len),
        args.global_batch,
        args.steps,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
