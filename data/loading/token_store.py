"""Random access into a prepared split's token stream, via memory-mapped shards.

The split's shards, in order, form one concatenated stream of `n_tokens` tokens;
`read_into(out, start)` copies tokens [start, start + len(out)) even when the range
crosses a shard boundary. Memmaps are opened lazily and dropped when pickled, so a
store can be sent to DataLoader workers (each opens its own maps; np.memmap itself
would pickle its whole contents).

The files are not checked here: the split is opened through prepared_split.py, which
verifies them first (verify.py: presence, sizes and, unless data.verify=off, contents).
"""

from __future__ import annotations

import pathlib

import numpy as np


class TokenStore:
    def __init__(self, prepared_dir: pathlib.Path, split_info: dict, dtype: str):
        self.dtype = np.dtype(dtype)
        shards = [s for s in split_info["shards"] if s["tokens"] > 0]  # np.memmap cannot map empty files
        self.paths = [prepared_dir / s["file"] for s in shards]
        self.counts = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.n_tokens = int(self.starts[-1])
        self._maps: list[np.memmap] | None = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def _open(self) -> list[np.memmap]:
        if self._maps is None:
            self._maps = [np.memmap(p, dtype=self.dtype, mode="r") for p in self.paths]
        return self._maps

    def read_into(self, out: np.ndarray, start: int) -> None:
        """out[:] = stream[start : start + len(out)] (converted to out's dtype)."""
        maps = self._open()
        end = start + len(out)
        if start < 0 or end > self.n_tokens:
            raise IndexError(f"token range [{start}, {end}) outside the stream of {self.n_tokens} tokens")
        shard = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos = 0
        while pos < len(out):
            local = start + pos - int(self.starts[shard])
            take = min(len(out) - pos, int(self.counts[shard]) - local)
            out[pos : pos + take] = maps[shard][local : local + take]
            pos += take
            shard += 1

    def read(self, start: int, length: int) -> np.ndarray:
        out = np.empty(length, dtype=np.int64)
        self.read_into(out, start)
        return out
