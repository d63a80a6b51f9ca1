"""On-the-fly mode: tokenize while training, no preparation (quick experiments only).

Order: the source's documents in their order (no shuffling: a global permutation needs
random access, which is what prepared shards are for), each followed by EOS, the
stream repeating from the start when the source ends. Windows and batches are defined
as for prepared data: window k = stream tokens [k*L, k*L + L + 1), global batch at
step s = windows s*B .. s*B+B-1, rank r takes its contiguous slice. Every rank reads
and tokenizes the whole stream (keeps it identical for any rank count; fine for a
quick experiment, wasteful at scale).

Resumable state: state(step) gives the source cursor of the document holding the
step's first token, the token offset inside it and the pass over the source, so
batches(step, state) continues there without re-reading what came before. Without a
state, batches(step) replays the stream up to the step (exact, but slow).
"""

from __future__ import annotations

import collections
import json
from typing import Iterator

import numpy as np
import torch

from data.config import DataConfig
from data.sources import make_source
from data.tokenizer import DataError, load_tokenizer, resolve_tokenizer_path
from data.windows import rank_slice


class StreamingBatches:
    def __init__(self, cfg: DataConfig, source: str, *, global_batch: int, rank: int = 0, world_size: int = 1,
                 reader: str = "gzip", split: str = "train", encode_batch: int = 64):
        if global_batch < 1 or world_size < 1 or global_batch % world_size:
            raise DataError(f"global_batch={global_batch} is not divisible by world_size={world_size}. Fix: "
                            "choose a multiple of the number of ranks.")
        self.cfg, self.global_batch, self.encode_batch = cfg, global_batch, encode_batch
        self.source_spec, self.reader, self.split = source, reader, split
        self.source = make_source(source, split, reader)
        self.sp = load_tokenizer(resolve_tokenizer_path(cfg.tokenizer))
        self.lo, self.hi = rank_slice(global_batch, rank, world_size)
        self.tokens_per_step = global_batch * cfg.seq_len
        self._marks: collections.OrderedDict[int, dict] = collections.OrderedDict()  # step -> resume point

    def _docs(self, cursor, passes: int) -> Iterator[tuple[object, int, np.ndarray]]:
        """(cursor before the doc, pass, ids + EOS) forever, starting at cursor in the given pass."""
        while True:
            prev, texts, befores, n = cursor, [], [], 0
            for cur, text, _ in self.source.events(cursor):
                if text is not None and text.strip():
                    texts.append(text)
                    befores.append(prev)
                    n += 1
                    if len(texts) == self.encode_batch:
                        yield from self._encode(texts, befores, passes)
                        texts, befores = [], []
                prev = cur
            yield from self._encode(texts, befores, passes)
            if n == 0 and cursor is None:
                raise DataError(f"streaming source {self.source_spec} ({self.split}) has no documents")
            cursor, passes = None, passes + 1

    def _encode(self, texts, befores, passes):
        for before, ids in zip(befores, self.sp.encode(texts, add_eos=True)):
            yield before, passes, np.asarray(ids, dtype=np.int64)

    def batches(self, start_step: int = 0, state: dict | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        L, B = self.cfg.seq_len, self.global_batch
        if state is not None:
            self.check_resume(state)
            if state["step"] != start_step:
                raise DataError(f"state is for step {state['step']}, not {start_step}")
            docs = self._docs(json.loads(state["cursor"]), state["pass"])
            skip = state["offset"]
        else:
            docs = self._docs(None, 0)
            skip = start_step * B * L  # replay: exact, proportional to the steps skipped
        # buf holds the stream from token position `pos`; `owners` maps buf offsets to their documents.
        buf, owners, pos = np.empty(0, dtype=np.int64), collections.deque(), start_step * B * L
        need = B * L + 1
        step = start_step
        while True:
            while len(buf) < need:
                before, passes, ids = next(docs)
                if skip:
                    drop = min(skip, len(ids))
                    skip -= drop
                    if drop == len(ids):
                        continue
                    owners.append((pos + len(buf), before, passes, drop))
                    ids = ids[drop:]
                else:
                    owners.append((pos + len(buf), before, passes, 0))
                buf = np.concatenate([buf, ids])
            while len(owners) > 1 and owners[1][0] <= pos:
                owners.popleft()
            start, before, passes, first = owners[0]
            self._mark(step, {"cursor": before, "pass": passes, "offset": first + pos - start})
            rows = np.lib.stride_tricks.sliding_window_view(buf[: need], L + 1)[::L][self.lo : self.hi]
            rows = torch.from_numpy(np.ascontiguousarray(rows))
            yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous()
            buf, pos, step = buf[B * L :], pos + B * L, step + 1

    def _mark(self, step: int, point: dict) -> None:
        self._marks[step] = point
        while len(self._marks) > 4096:
            self._marks.popitem(last=False)

    def state(self, step: int) -> dict:
        """Resume point for `step` (must be a step this object has reached, e.g. the next one to run)."""
        if step not in self._marks:
            raise DataError(f"no resume point for step {step}: state() works for steps the stream has reached")
        m = self._marks[step]
        return {"mode": "streaming", "step": step, "source": self.source_spec, "reader": self.reader,
                "split": self.split, "seq_len": self.cfg.seq_len, "global_batch": self.global_batch,
                "tokenizer": self.cfg.tokenizer, "cursor": json.dumps(m["cursor"]), "pass": m["pass"],
                "offset": m["offset"]}

    def check_resume(self, state: dict) -> None:
        keys = ("source", "reader", "split", "seq_len", "global_batch", "tokenizer")
        now = {"source": self.source_spec, "reader": self.reader, "split": self.split,
               "seq_len": self.cfg.seq_len, "global_batch": self.global_batch, "tokenizer": self.cfg.tokenizer}
        diffs = [f"{k}: checkpoint {state.get(k)!r} != now {now[k]!r}" for k in keys if state.get(k) != now[k]]
        if state.get("mode") != "streaming" or diffs:
            raise DataError("streaming state does not match this stream (" + "; ".join(diffs or ["not a streaming "
                            "state"]) + "). Fix: resume with the checkpoint's source and data config.")
