"""The preparation driver: documents -> token shards + manifest.json (the library behind tools/prepare_data.py).

- Tokenization runs in N worker processes (encoding.py); results come back in input
  order, so the output never depends on N.
- Every document gets EOS (id 1) appended; empty documents are skipped and counted.
- A split's token stream is cut into shards of about `shard_tokens` tokens, always at a
  document boundary (shard_files.py: `train-00000.bin` + sidecar `train-00000.json`).
- Resumable: a shard is final only when complete (shard_files.py). Re-running the same
  command skips finished shards (after re-hashing them against their sidecars) and restarts
  from the last good one's source cursor: a damaged shard is redone, with those after it. So
  re-running the preparation command is also the repair for damaged prepared data (the
  fix that loading's errors name, data/manifest.py rebuild_hint); a damaged manifest.json is
  rewritten from the split records.
  `<split>.prepare.json` records the split's settings: changing them for an existing
  --out is an error (not a silent mix). A record that cannot be read (e.g. truncated) counts
  as missing: a split being prepared gets it rewritten (its shards are kept as far as their
  sidecars vouch for them), another split keeps its entry of the existing manifest.json (when
  that is readable; else it is left out of the manifest until it is prepared again).
- Limits: train stops at the first document boundary with >= max_tokens tokens or
  max_docs documents; validation at >= val_tokens tokens, so every run that uses the
  same prepared dir evaluates on identical tokens.
"""

from __future__ import annotations

import collections
import os
import pathlib
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from data import manifest as mf
from data.errors import DataError
from data.files import sha256_file, write_json_atomic
from data.preparation.encoding import encode_in_order
from data.preparation.manifest_writer import write_manifest
from data.preparation.shard_files import ShardWriter, finished_shards, shard_path, sidecar_path
from data.preparation.sources import Event, Source
from data.tokenizer import check_tokenizer_matches, load_tokenizer, token_dtype

EMPTY = "empty"  # a record whose text is empty/whitespace: nothing to train on


@dataclass
class SplitPlan:
    split: str
    source: Source
    max_tokens: int | None = None
    max_docs: int | None = None


@dataclass
class PrepareOptions:
    out: pathlib.Path
    tokenizer_path: pathlib.Path
    workers: int = max(1, (os.cpu_count() or 1))
    shard_tokens: int = mf.DEFAULT_SHARD_TOKENS
    batch_docs: int = 256  # documents per worker task
    progress: bool = True
    log: Callable[[str], object] = print


def completed_splits(
    out: pathlib.Path, previous: dict[str, dict] | None = None, log: Callable[[str], object] = print
) -> dict[str, dict]:
    """The manifest entries of the splits whose preparation completed (in this run or an earlier one).

    A split whose record is unreadable keeps its entry in `previous` (the splits of the manifest.json
    found before this run, when it was readable) rather than disappear from the manifest; without one
    it is left out, with a note.
    """
    splits = {}
    for split in mf.SPLITS:
        state = mf.read_record(out, split)
        if state is None and mf.state_path(out, split).exists():
            if previous and split in previous:
                splits[split] = previous[split]
                continue
            log(
                f"[{split}] {mf.state_path(out, split)} is unreadable or damaged: the {split} split is left out of "
                f"manifest.json; prepare it again (--split {split} or both, same settings) to restore it"
            )
        elif state is not None and state.get("complete"):
            splits[split] = state["entry"]
    return splits


DocBatch = tuple[list[str], list[object], list[collections.Counter[str]], collections.Counter[str] | None]
"""(texts, cursor after each doc, skipped records before each doc, trailing skips: set on the last batch only)."""


def _doc_batches(events: Iterable[Event], batch_docs: int) -> Iterator[DocBatch]:
    """Group source events into (texts, cursors, skips-before-each-doc, trailing skips)."""
    texts: list[str] = []
    cursors: list[object] = []
    skips: list[collections.Counter[str]] = []
    pending: collections.Counter[str] = collections.Counter()
    for cursor, text, skip in events:
        if text is not None and not text.strip():
            text, skip = None, EMPTY
        if text is None:
            assert skip is not None, "a source says why it skipped a record"
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


def prepare_split(plan: SplitPlan, opts: PrepareOptions, dtype: np.dtype, tok_sha: str) -> dict:
    """Tokenize one split into shards (resuming finished ones); returns its manifest entry."""
    out, split = opts.out, plan.split
    key = {
        "tool": mf.TOOL_VERSION,
        "tokenizer_sha256": tok_sha,
        "dtype": dtype.name,
        "source": plan.source.describe(),
        "shard_tokens": opts.shard_tokens,
        "max_tokens": plan.max_tokens,
        "max_docs": plan.max_docs,
    }
    state_path = mf.state_path(out, split)
    old = mf.read_record(out, split)
    if old is None and state_path.exists():
        opts.log(f"[{split}] {state_path} is unreadable or damaged: rewriting it (no settings to compare with)")
    if old is not None:
        check_tokenizer_matches(old["key"]["tokenizer_sha256"], opts.tokenizer_path, f"{out} ({split})")
        if old["key"] != key:
            diff = sorted(k for k in key if old["key"].get(k) != key[k])
            changed = mf.changed_source_files(old["key"].get("source"))
            if changed:  # the same files, rewritten: "the original settings" cannot be had again
                raise DataError(
                    f"{out} holds a {split} split prepared from source files that have changed since: "
                    f"{'; '.join(changed)}. Fix: prepare into a new --out, or delete {out} (prepared data only) "
                    "and re-run."
                )
            raise DataError(
                f"{out} already holds a {split} split prepared with different settings ({', '.join(diff)}). "
                "Fix: re-run with the original settings to resume, or choose a new --out (or delete the old one)."
            )
    record = {"key": key, "tokenizer_path": str(opts.tokenizer_path)}  # the path: for the rebuild command only
    write_json_atomic(state_path, {**record, "complete": False})

    shards = finished_shards(out, split, dtype)
    complete = bool(shards) and shards[-1]["closed_by"] in ("limit", "end")  # the last shard ended the split
    totals = {"tokens": sum(s["tokens"] for s in shards), "docs": sum(s["docs"] for s in shards)}
    skipped: collections.Counter[str] = collections.Counter()
    for s in shards:
        skipped.update(s["skipped"])
    if shards:
        opts.log(f"[{split}] resuming: {len(shards)} finished shard(s), {totals['tokens']:,} tokens kept")
    bad = shard_path(out, split, len(shards))
    if not complete and bad.is_file():
        opts.log(f"[{split}] {bad.name} is damaged (size, sha256 or sidecar): redoing it and the shards after it")

    if not complete:
        t0 = time.perf_counter()
        new_tokens, new_docs = _run(plan, opts, dtype, shards, totals, skipped)
        dt = time.perf_counter() - t0
        opts.log(
            f"[{split}] {new_docs:,} docs, {new_tokens:,} tokens in {dt:.1f}s "
            f"({new_docs / max(dt, 1e-9):,.0f} docs/s, {new_tokens / max(dt, 1e-9):,.0f} tokens/s, "
            f"{max(opts.workers, 1)} worker(s))"
        )

    entry_shards = [{k: s[k] for k in ("file", "tokens", "docs", "sha256")} for s in shards]
    entry = {
        "tokens": totals["tokens"],
        "docs": totals["docs"],
        "skipped": dict(skipped),
        "source": plan.source.describe(),
        "limits": {"max_tokens": plan.max_tokens, "max_docs": plan.max_docs, "shard_tokens": opts.shard_tokens},
        "checksum": mf.split_checksum(dtype.name, tok_sha, entry_shards),
        "shards": entry_shards,
    }
    write_json_atomic(state_path, {**record, "complete": True, "entry": entry})
    return entry


def _run(
    plan: SplitPlan,
    opts: PrepareOptions,
    dtype: np.dtype,
    shards: list[dict],
    totals: dict[str, int],
    skipped: collections.Counter[str],
) -> tuple[int, int]:
    """Read, tokenize and write from the last finished shard on; updates shards/totals/skipped in place."""
    split, out = plan.split, opts.out
    cursor = shards[-1]["end_cursor"] if shards else None
    new_tokens = new_docs = 0
    bar = tqdm(
        total=plan.max_tokens,
        initial=totals["tokens"],
        unit="tok",
        unit_scale=True,
        desc=f"{split}",
        disable=not opts.progress,
        dynamic_ncols=True,
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    shard = ShardWriter(shard_path(out, split, len(shards)), start_cursor=cursor)

    def close(closed_by: str) -> None:
        nonlocal shard
        shards.append(shard.finish(dtype, closed_by))
        if closed_by == "size":  # more to come: open the next shard
            shard = ShardWriter(shard_path(out, split, len(shards)), start_cursor=shard.end_cursor)

    def limit_reached() -> bool:
        return (plan.max_tokens is not None and totals["tokens"] >= plan.max_tokens) or (
            plan.max_docs is not None and totals["docs"] >= plan.max_docs
        )

    done = False
    batches = _doc_batches(plan.source.events(cursor), opts.batch_docs)
    try:
        encoded = encode_in_order(batches, opts.tokenizer_path, dtype, opts.workers)
        for (texts, cursors, skips, trailing), (flat, lengths) in encoded:
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for i in range(len(texts)):
                shard.skipped.update(skips[i])
                skipped.update(skips[i])
                shard.append(flat[offsets[i] : offsets[i + 1]])
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
                shard.discard()
                shards[-1]["closed_by"] = "end"
                write_json_atomic(sidecar_path(out / shards[-1]["file"]), shards[-1])
    finally:
        bar.close()
        shard.abandon()  # no-op when finished; interrupted: the .tmp stays, never taken for a finished shard
    return new_tokens, new_docs


def prepare(plans: list[SplitPlan], opts: PrepareOptions) -> dict:
    """Prepare the given splits into opts.out and (re)write its manifest."""
    opts.out.mkdir(parents=True, exist_ok=True)
    sp = load_tokenizer(opts.tokenizer_path)
    vocab = sp.vocab_size()
    dtype = token_dtype(vocab)
    tok_sha = sha256_file(opts.tokenizer_path)
    existing = opts.out / mf.MANIFEST
    previous: dict[str, dict] = {}  # the splits of the manifest found, for a split whose record is unreadable
    if existing.is_file():
        try:
            old_manifest = mf.read_manifest(opts.out)
            recorded = [old_manifest["tokenizer"]["sha256"]]
            previous = old_manifest["splits"]
        except DataError:  # damaged (e.g. truncated): rewritten below; each split's record names its tokenizer
            records = [mf.read_record(opts.out, s) for s in mf.SPLITS]  # an unreadable one is rewritten or left out
            recorded = [r["key"]["tokenizer_sha256"] for r in records if r is not None]
        for sha in recorded:
            check_tokenizer_matches(sha, opts.tokenizer_path, str(opts.out))
    for plan in plans:
        prepare_split(plan, opts, dtype, tok_sha)
    splits = completed_splits(opts.out, previous, opts.log)
    manifest = write_manifest(opts.out, splits, opts.tokenizer_path, tok_sha, vocab, dtype)
    for split, info in manifest["splits"].items():
        skipped = ", ".join(f"{k}={v}" for k, v in sorted(info["skipped"].items())) or "none"
        opts.log(
            f"summary [{split}]: {info['docs']:,} docs, {info['tokens']:,} tokens in {len(info['shards'])} "
            f"shard(s) ({dtype.name}); skipped records: {skipped}"
        )
    opts.log(f"manifest: {existing} (checksum {manifest['checksum'][:16]})")
    return manifest
