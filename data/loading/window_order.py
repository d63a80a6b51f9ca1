"""Which windows make up the global batch at a step: the sampling order.

Windows: window w covers tokens [w*L, w*L + L + 1) of the split's concatenated token
stream (L = seq_len): L+1 tokens, inputs = the first L, targets = the last L (the same
tokens shifted by one). Consecutive windows overlap by one token, so every token after
the first is a target exactly once per epoch, and n_windows = (n_tokens - 1) // L (the
remainder is dropped). Windows run across document (EOS) and shard boundaries: the
shards are one stream.

Order: the infinite sequence of window ids is perm(seed, 0) ++ perm(seed, 1) ++ ...,
perm(seed, e) = numpy.random.default_rng([seed, e]).permutation(n_windows). The global
batch at step s is positions s*B .. s*B+B-1 of that sequence, and rank r of W takes the
contiguous slice [r*B/W, (r+1)*B/W). The windows of a step therefore depend only on
(seed, n_windows, B, s): not on the number of ranks, gradient-accumulation micro-steps
or DataLoader workers, and resuming at step s needs no other state.
"""

from __future__ import annotations

import hashlib

import numpy as np


def count_windows(n_tokens: int, seq_len: int) -> int:
    return max(0, (n_tokens - 1) // seq_len)


def epoch_permutation(seed: int, epoch: int, n_windows: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n_windows)


def permutation_fingerprint(seed: int, n_windows: int) -> str:
    """A short hash of the start of epoch 0's order: resume refuses a numpy whose RNG draws differently."""
    head = epoch_permutation(seed, 0, n_windows)[:64].astype(np.int64)
    return hashlib.sha256(head.tobytes()).hexdigest()[:16]


def rank_slice(global_batch: int, rank: int, world_size: int) -> tuple[int, int]:
    per = global_batch // world_size
    return rank * per, (rank + 1) * per


class WindowOrder:
    """Window ids at global positions, caching the last few epochs' permutations."""

    def __init__(self, n_windows: int, seed: int, cache: int = 2):
        self.n_windows, self.seed, self.cache = n_windows, seed, cache
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self):  # sent to DataLoader workers: ship the recipe, not cached permutations
        return {**self.__dict__, "_perms": {}}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = epoch_permutation(self.seed, epoch, self.n_windows)
            if len(self._perms) >= self.cache:
                self._perms.pop(min(self._perms))
            self._perms[epoch] = perm
        return perm

    def windows(self, start: int, stop: int) -> np.ndarray:
        """Window ids at positions [start, stop) of the infinite order (may span epochs)."""
        out = np.empty(stop - start, dtype=np.int64)
        pos = start
        while pos < stop:
            epoch, offset = divmod(pos, self.n_windows)
            take = min(stop - pos, self.n_windows - offset)
            out[pos - start : pos - start + take] = self.permutation(epoch)[offset : offset + take]
            pos += take
        return out
