"""Training batches: a map-style dataset indexed by step, read through a torch DataLoader.

See window_order.py for the windows and their order. Item `s` of the dataset is this
rank's slice of global batch s, as (inputs, targets) int64 tensors of shape
(global_batch // world_size, seq_len), targets = inputs shifted by one token. A sampler
counting up from start_step drives a DataLoader (cfg.num_workers workers, pinned memory
on CUDA): batches arrive in step order whatever the worker count, and resuming is just
starting the count at the checkpoint's step. A train split with fewer windows than one
global batch is an error (the windows of a step would repeat).

As a checkpoint component TrainBatches has nothing to restore: the order is a function of
the config and the data. state_dict() is the identity of that order (no step; the trainer
stores the step once and passes it to batches()), and load_state_dict() refuses a
checkpoint whose order differs.
"""

from __future__ import annotations

import itertools
import signal
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.config import DataConfig
from data.errors import DataError
from data.loading.prepared_split import open_split
from data.loading.token_store import TokenStore
from data.loading.window_order import WindowOrder, count_windows, permutation_fingerprint, rank_slice
from data.paths import resolve_path


class StepDataset(Dataset):
    """step -> this rank's (inputs, targets) of the global batch at that step."""

    def __init__(
        self, store: TokenStore, n_windows: int, seed: int, seq_len: int, global_batch: int, rank: int, world_size: int
    ):
        self.store, self.seq_len, self.global_batch = store, seq_len, global_batch
        self.order = WindowOrder(n_windows, seed)
        self.lo, self.hi = rank_slice(global_batch, rank, world_size)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        base = step * self.global_batch
        windows = self.order.windows(base + self.lo, base + self.hi)
        rows = np.empty((len(windows), self.seq_len + 1), dtype=np.int64)
        for row, w in zip(rows, windows, strict=True):
            self.store.read_into(row, int(w) * self.seq_len)
        tokens = torch.from_numpy(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def _ignore_stop_signals(worker_id: int) -> None:
    """Workers leave SIGINT/SIGTERM to the main process: a Ctrl-C or preemption sent to the
    whole process group must not kill a worker mid-step, or the main process could not finish
    the step and save. The workers exit with the main process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _StepsFrom(Sampler):
    """start, start+1, ... forever."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self):
        return itertools.count(self.start)


class TrainBatches:
    """This rank's training batches for `global_batch` windows per step (see module doc)."""

    def __init__(
        self, cfg: DataConfig, *, global_batch: int, rank: int = 0, world_size: int = 1, pin_memory: bool = False
    ):
        if global_batch < 1 or world_size < 1 or global_batch % world_size:
            raise DataError(
                f"global_batch={global_batch} is not divisible by world_size={world_size}. Fix: choose a global "
                "batch that is a multiple of the number of ranks (each rank takes an equal slice)."
            )
        if not 0 <= rank < world_size:
            raise DataError(f"rank={rank} outside [0, world_size={world_size})")
        self.manifest, info, self.store = open_split(cfg, "train")
        self.cfg, self.global_batch, self.rank, self.world_size = cfg, global_batch, rank, world_size
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.n_windows = count_windows(self.store.n_tokens, cfg.seq_len)
        if self.n_windows < 1:
            raise DataError(
                f"the train split has {self.store.n_tokens} tokens, too few for one window of seq_len+1="
                f"{cfg.seq_len + 1}. Fix: prepare more data (raise --max_tokens/--max_docs) or lower data.seq_len."
            )
        if self.n_windows < global_batch:
            raise DataError(
                f"the train split of {resolve_path(cfg.prepared_dir)} has {self.n_windows} windows of "
                f"seq_len={cfg.seq_len} ({self.store.n_tokens} tokens), fewer than one global batch of "
                f"{global_batch} windows: every step would repeat windows. Fix: prepare more data "
                "(`python tools/prepare_data.py --out <new dir> --max_tokens <more>` with the same --source), "
                f"or lower --train.global_batch (to at most {self.n_windows}) or --data.seq_len."
            )
        self.tokens_per_step = global_batch * cfg.seq_len
        self.checksum = info["checksum"]
        self._fingerprint = permutation_fingerprint(cfg.seed, self.n_windows)
        self.dataset = StepDataset(self.store, self.n_windows, cfg.seed, cfg.seq_len, global_batch, rank, world_size)

    def batches(self, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's (inputs, targets) for steps start_step, start_step+1, ... (forever)."""
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_StepsFrom(start_step),
            num_workers=self.cfg.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            worker_init_fn=_ignore_stop_signals if self.cfg.num_workers else None,
            # Creating the iterator draws a worker base seed: from a private generator, not torch's
            # global RNG, so a resumed run (whose iterator starts after the RNG is restored) leaves
            # the global stream where the checkpoint had it (e.g. LoRA dropout masks stay exact).
            generator=torch.Generator().manual_seed(0),
        )
        return iter(loader)

    def state_dict(self) -> dict[str, str | int]:
        """The identity of the sample order, for the checkpoint (plain str/int values).

        Only what fixes which windows every step reads: the data (manifest checksum, window
        count), the order's recipe (seed, seq_len, global batch) and a fingerprint of numpy's
        permutation. No step: the checkpoint stores it once, and batches(step) resumes there.
        """
        return {
            "manifest_checksum": self.checksum,
            "n_windows": self.n_windows,
            "seed": self.cfg.seed,
            "seq_len": self.cfg.seq_len,
            "global_batch": self.global_batch,
            "permutation": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Raise DataError if resuming from `state` would not continue the same sample order.

        Nothing is restored (the order is a function of the config and the data); only the keys
        of state_dict() are compared, so older checkpoints' extra keys (step, epoch, position,
        tokens_seen) are accepted and ignored.
        """
        now = self.state_dict()
        diffs = [f"{k}: checkpoint {state[k]!r} != now {v!r}" for k, v in now.items() if k in state and state[k] != v]
        if diffs:
            raise DataError(
                "the data changed since this checkpoint, so resuming would not continue its sample order ("
                + "; ".join(diffs)
                + "). Fix: resume with the checkpoint's data config (prepared_dir, seq_len, "
                "seed, global batch) and data, or start a new run."
            )
