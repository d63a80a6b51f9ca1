"""Run a function on W CPU ranks (gloo) inside a test, without torchrun: `run_ranks(fn, world=2)`.

Each rank is a spawned process with an initialised default process group (a FileStore in a temp
dir, so parallel tests never share a port); `fn(rank, world, *args)` runs there and its return
value (anything torch.save can write: tensors, dicts, numbers) comes back as one list, rank order.
A rank that raises fails the call with that rank's traceback. Cheaper than torchrun (no agent, one
start-up per rank), so many optimizer x engine cases fit in one call.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, store_path: str, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        result: dict[str, Any] = {"ok": fn(rank, world, *args)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    try:
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        if dist.is_initialized():  # `fn` may have ended it (the trainer shuts its group down)
            dist.destroy_process_group()
    # The result is saved and the group ended: leave without the interpreter's finalization. With
    # torch 2.13 it aborts once in a few hundred runs ("terminate called without an active exception",
    # SIGABRT, after the atexit handlers have run), which failed a CI run whose ranks had all finished.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """`fn(rank, world, *args)` on `world` gloo ranks; the return values in rank order. `fn` must be a
    module-level function (spawn pickles it by name)."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _worker, args=(world, str(Path(tmp) / "store"), tmp, fn, args), nprocs=world, start_method="spawn"
        )
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]
    errors = [f"rank {r}:\n{res['error']}" for r, res in enumerate(results) if "error" in res]
    if errors:
        raise AssertionError("\n".join(errors))
    return [res["ok"] for res in results]
