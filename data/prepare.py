"""Documents -> token shards + manifest.json (the library behind tools/prepare_data.py).

- Tokenization runs in N worker processes (each loads the SentencePiece model once);
  results come back in input order, so the output never depends on N.
- Every document gets EOS (id 1) appended; empty documents are skipped and counted.
- A split's token stream is cut into shards of about `shard_tokens` tokens, always at a
  document boundary (`train-00000.bin`, raw little-endian uint16/uint32), each with a
  sidecar `train-00000.json` (tokens, docs, skipped records, sha256, source cursors).
- Resumable: a shard is written as `*.bin.tmp` and renamed only when complete, then its
  sidecar is written; a shard counts as finished only if both exist and the size
  matches. Re-running the same command skips finished shards and restarts from the last
  one's source cursor. Changing the settings for an existing --out is an error (not a
  silent mix).
- Limits: train stops at the first document boundary with >= max_tokens tokens or
  max_docs documents; validation at >= val_tokens tokens, so every run that uses the
  same prepared dir evaluates on identical tokens.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import multiprocessing as mp
import os
import pathlib
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from data import manifest as mf
from data.errors import DataError
from data.tokenizer import EOS_ID, PAD_ID, check_tokenizer_matches, load_tokenizer, sha256_file, token_dtype

EMPTY = "empty"  # a record whose text is empty/whitespace: nothing to train on


# ---------------------------------------------------------------- tokenization (workers)

_worker_sp = None
_worker_dtype = None


def _init_worker(model_path: str, dtype: str) -> None:
    global _worker_sp, _worker_dtype
    _worker_sp = load_tokenizer(model_path)
    _worker_dtype = np.dtype(dtype)


def encode_texts(sp, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(flat ids with EOS after each doc, per-doc lengths incl. EOS)."""
    # EOS_ID is checked on load; add_eos avoids a Python loop. One thread: parallelism comes from
    # worker processes (sentencepiece's default would start a thread per core in every worker).
    ids = sp.encode(texts, add_eos=True, num_threads=1)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    if not ids:
        return np.empty(0, dtype=dtype), lengths
    # Per-doc np.array + one concatenate is the cheapest flatten (~5% of encode time).
    flat = np.concatenate([np.array(doc, dtype=dtype) for doc in ids])
    return flat, lengths


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(_worker_sp, texts, _worker_dtype)


# ---------------------------------------------------------------- settings and state

@dataclass
class SplitPlan:
    split: str
    source: object                      # data.sources.LocalSource | HubSource
    max_tokens: int | None = None
    max_docs: int | None = None


@dataclass
class PrepareOptions:
    out: pathlib.Path
    tokenizer_path: pathlib.Path
    workers: int = max(1, (os.cpu_count() or 1))
    shard_tokens: int = 100_000_000
    batch_docs: int = 256               # documents per worker task
    progress: bool = True
    log: object = print


@dataclass
class _Shard:
    """The shard being filled: a temp file that grows, hashed as written."""
    path: pathlib.Path
    start_cursor: object
    tokens: int = 0
    docs: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    end_cursor: object = None

    def __post_init__(self):
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.hash = hashlib.sha256()

    def append(self, ids: np.ndarray) -> None:
        data = ids.tobytes()  # native little-endian on all supported hosts
        self.file.write(data)
        self.hash.update(data)
        self.tokens += len(ids)

    def finish(self, dtype: np.dtype, closed_by: str) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        meta = {"file": self.path.name, "tokens": self.tokens, "docs": self.docs,
                "skipped": dict(self.skipped), "sha256": self.hash.hexdigest(),
                "start_cursor": self.start_cursor, "end_cursor": self.end_cursor,
                "closed_by": closed_by, "dtype": dtype.name}
        mf.write_json_atomic(self.path.with_suffix(".json"), meta)
        return meta


def _state_path(out: pathlib.Path, split: str) -> pathlib.Path:
    return out / f"{split}.prepare.json"


def _finished_shards(out: pathlib.Path, split: str, dtype: np.dtype) -> list[dict]:
    """Consecutive finished shards from index 0 (a shard without sidecar or of wrong size is not finished)."""
    shards = []
    for i in itertools.count():
        bin_path = out / f"{split}-{i:05d}.bin"
        meta_path = bin_path.with_suffix(".json")
        if not (bin_path.is_file() and meta_path.is_file()):
            break
        meta = json.loads(meta_path.read_text())
        if bin_path.stat().st_size != meta["tokens"] * dtype.itemsize:
            break
        shards.append(meta)
    return shards


# ---------------------------------------------------------------- main loop

def _doc_batches(events, batch_docs: int):
    """Group source events into (texts, cursors, skips-before-each-doc, trailing skips)."""
    texts, cursors, skips = [], [], []
    pending = collections.Counter()
    for cursor, text, skip in events:
        if text is not None and not text.strip():
            text, skip = None, EMPTY
        if text is None:
            pending[skip] += 1
            continue
        texts.append(text)
        cursors.append(cursor)
        skips.append(pending)
        pending = collections.Counter()
        if len(texts) >= batch_docs:
            yield texts, cursors, skips, None
            texts, cursors, skips = [], [], []
    yield texts, cursors, skips, pending  # last (possibly empty) batch carries trailing skips


def _encoded(batches, opts: PrepareOptions, dtype: np.dtype):
    """Encode batches in order: in-process for workers=0, else a bounded-in-flight process pool."""
    if opts.workers <= 0:
        sp = load_tokenizer(opts.tokenizer_path)
        for batch in batches:
            yield batch, encode_texts(sp, batch[0], dtype)
        return
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(method)
    pool = ctx.Pool(opts.workers, initializer=_init_worker, initargs=(str(opts.tokenizer_path), dtype.name))
    try:
        inflight = collections.deque()
        for batch in batches:
            inflight.append((batch, pool.apply_async(_encode_in_worker, (batch[0],))))
            if len(inflight) >= 2 * opts.workers + 2:  # bound memory: never read far ahead of the writer
                b, res = inflight.popleft()
                yield b, res.get()
        while inflight:
            b, res = inflight.popleft()
            yield b, res.get()
    finally:
        pool.terminate()
        pool.join()


def prepare_split(plan: SplitPlan, opts: PrepareOptions, dtype: np.dtype, tok_sha: str) -> dict:
    """Tokenize one split into shards (resuming finished ones); returns its manifest entry."""
    out, split = opts.out, plan.split
    key = {"tool": mf.TOOL_VERSION, "tokenizer_sha256": tok_sha, "dtype": dtype.name,
           "source": plan.source.describe(), "shard_tokens": opts.shard_tokens,
           "max_tokens": plan.max_tokens, "max_docs": plan.max_docs}
    state_path = _state_path(out, split)
    if state_path.is_file():
        old = json.loads(state_path.read_text())
        check_tokenizer_matches(old["key"]["tokenizer_sha256"], opts.tokenizer_path, f"{out} ({split})")
        if old["key"] != key:
            diff = sorted(k for k in key if old["key"].get(k) != key[k])
            raise DataError(
                f"{out} already holds a {split} split prepared with different settings ({', '.join(diff)}). "
                "Fix: re-run with the original settings to resume, or choose a new --out (or delete the old one)."
            )
    mf.write_json_atomic(state_path, {"key": key, "complete": False})

    shards = _finished_shards(out, split, dtype)
    complete = bool(shards) and shards[-1]["closed_by"] in ("limit", "end")  # the last shard ended the split
    totals = {"tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards)}
    skipped = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    if shards:
        opts.log(f"[{split}] resuming: {len(shards)} finished shard(s), {totals['tokens']:,} tokens kept")

    if not complete:
        t0 = time.perf_counter()
        new_tokens, new_docs = _run(plan, opts, dtype, shards, totals, skipped)
        dt = time.perf_counter() - t0
        opts.log(f"[{split}] {new_docs:,} docs, {new_tokens:,} tokens in {dt:.1f}s "
                 f"({new_docs / max(dt, 1e-9):,.0f} docs/s, {new_tokens / max(dt, 1e-9):,.0f} tokens/s, "
                 f"{max(opts.workers, 1)} worker(s))")

    entry_shards = [{k: s[k] for k in ("file", "tokens", "docs", "sha256")} for s in shards]
    entry = {"tokens": totals["tokens"], "docs": totals["docs"], "skipped": dict(skipped),
             "source": plan.source.describe(),
             "limits": {"max_tokens": plan.max_tokens, "max_docs": plan.max_docs, "shard_tokens": opts.shard_tokens},
             "checksum": mf.split_checksum(dtype.name, tok_sha, entry_shards), "shards": entry_shards}
    mf.write_json_atomic(state_path, {"key": key, "complete": True, "entry": entry})
    return entry


def _run(plan, opts, dtype, shards, totals, skipped) -> tuple[int, int]:
    from tqdm import tqdm

    split, out = plan.split, opts.out
    cursor = shards[-1]["end_cursor"] if shards else None
    new_tokens = new_docs = 0
    bar = tqdm(total=plan.max_tokens, initial=totals["tokens"], unit="tok", unit_scale=True,
               desc=f"{split}", disable=not opts.progress, dynamic_ncols=True, file=sys.stderr)
    t0 = time.perf_counter()
    shard = _Shard(out / f"{split}-{len(shards):05d}.bin", start_cursor=cursor, end_cursor=cursor)

    def close(closed_by: str) -> None:
        nonlocal shard
        shards.append(shard.finish(dtype, closed_by))
        if closed_by == "size":  # more to come: open the next shard
            shard = _Shard(out / f"{split}-{len(shards):05d}.bin", start_cursor=shard.end_cursor,
                           end_cursor=shard.end_cursor)

    def limit_reached() -> bool:
        return (plan.max_tokens is not None and totals["tokens"] >= plan.max_tokens) or \
               (plan.max_docs is not None and totals["docs"] >= plan.max_docs)

    done = False
    batches = _doc_batches(plan.source.events(cursor), opts.batch_docs)
    try:
        for (texts, cursors, skips, trailing), (flat, lengths) in _encoded(batches, opts, dtype):
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i in range(len(texts)):
                shard.skipped.update(skips[i])
                skipped.update(skips[i])
                shard.append(flat[offsets[i]:offsets[i + 1]])
                shard.docs += 1
                shard.end_cursor = cursors[i]
                n = int(lengths[i])
                totals["tokens"] += n
                totals["docs"] += 1
                new_tokens += n
                new_docs += 1
                if limit_reached():
                    close("limit")
                    done = True
                    break
                if shard.tokens >= opts.shard_tokens:
                    close("size")
            if done:
                break
            if trailing is not None:  # end of input
                shard.skipped.update(trailing)
                skipped.update(trailing)
            elapsed = max(time.perf_counter() - t0, 1e-9)
            bar.update(totals["tokens"] - bar.n)
            if plan.max_tokens is None:
                frac = plan.source.progress()
                if frac > 0:  # estimate the total from the fraction of input files read
                    bar.total = int(totals["tokens"] / frac)
            bar.set_postfix_str(f"{new_docs / elapsed:,.0f} docs/s, {new_tokens / elapsed:,.0f} tok/s", refresh=False)
        if not done:
            if shard.docs or shard.skipped or not shards:
                close("end")
            else:  # the previous shard happened to end exactly at the end of input
                shard.file.close()
                shard.tmp.unlink()
                last = out / shards[-1]["file"]
                shards[-1]["closed_by"] = "end"
                mf.write_json_atomic(last.with_suffix(".json"), shards[-1])
    finally:
        bar.close()
        if not shard.file.closed:
            shard.file.close()  # interrupted: the .tmp stays and is never taken for a finished shard
    return new_tokens, new_docs


def build_manifest(out: pathlib.Path, tokenizer_path: pathlib.Path, tok_sha: str, vocab_size: int,
                   dtype: np.dtype) -> dict:
    """manifest.json from every split whose preparation completed."""
    splits = {}
    for split in ("train", "validation"):
        path = _state_path(out, split)
        if path.is_file():
            state = json.loads(path.read_text())
            if state.get("complete"):
                splits[split] = state["entry"]
    manifest = {"format": mf.FORMAT, "format_version": mf.FORMAT_VERSION, "tool_version": mf.TOOL_VERSION,
                "dtype": dtype.name,
                "tokenizer": {"path": str(tokenizer_path), "sha256": tok_sha, "vocab_size": vocab_size,
                              "eos_id": EOS_ID, "pad_id": PAD_ID},
                "splits": splits, "checksum": mf.overall_checksum(splits)}
    mf.write_json_atomic(out / mf.MANIFEST, manifest)
    return manifest


def prepare(plans: list[SplitPlan], opts: PrepareOptions) -> dict:
    """Prepare the given splits into opts.out and (re)write its manifest."""
    opts.out.mkdir(parents=True, exist_ok=True)
    sp = load_tokenizer(opts.tokenizer_path)
    vocab = sp.vocab_size()
    dtype = token_dtype(vocab)
    tok_sha = sha256_file(opts.tokenizer_path)
    existing = opts.out / mf.MANIFEST
    if existing.is_file():
        check_tokenizer_matches(mf.read_manifest(opts.out)["tokenizer"]["sha256"], opts.tokenizer_path, str(opts.out))
    for plan in plans:
        prepare_split(plan, opts, dtype, tok_sha)
    manifest = build_manifest(opts.out, opts.tokenizer_path, tok_sha, vocab, dtype)
    for split, info in manifest["splits"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items())) or "none"
        opts.log(f"summary [{split}]: {info['docs']:,} docs, {info['tokens']:,} tokens in {len(info['shards'])} "
                 f"shard(s) ({dtype.name}); skipped records: {skipped}")
    opts.log(f"manifest: {existing} (checksum {manifest['checksum'][:16]})")
    return manifest
