"""Counting device-to-host reads (host syncs) in a block of code: `with count_host_syncs() as syncs: ...`.

A read of a tensor's value on the host (`.item()`, `float(t)`, `bool(t)`, `if t:`, `.tolist()`,
`.numpy()`; on CUDA also `.cpu()` and the like) makes the host wait until the GPU has computed it: the
GPU then idles while the host prepares the next kernels. A training step should contain none (the
trainer reads its metrics at its check points: trainer/trainer.py).

On CUDA, torch's own detector counts every synchronising call (`torch.cuda.set_sync_debug_mode`,
which warns on each; the warnings are counted). Elsewhere (CPU: no device, nothing ever waits) the
reads that this project's code makes are counted by instrumenting those Tensor methods, which shows
what would stall on a GPU. Reads made by torch itself are not counted there: on CPU they read host
tensors that stay on the host on CUDA too (torch AdamW's step counter; on CUDA the trainer runs fused
AdamW, which reads nothing), and the CUDA count sees any that do sync. `sites` says where each read
was made (file:line), to find them.
"""

from __future__ import annotations

import contextlib
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Tensor methods that read a value on the host.
_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


@dataclass
class HostSyncs:
    sites: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.sites.values())


def _caller() -> str | None:
    """file:line of the code that made the read, or None when torch itself made it."""
    frame = traceback.extract_stack(limit=3)[0]  # [caller, read, _caller]
    if "/torch/" in frame.filename:
        return None
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} ({frame.name})"


@contextlib.contextmanager
def count_host_syncs(device: torch.device | None = None) -> Iterator[HostSyncs]:
    """Count host reads of tensor values inside the block (see the module docstring)."""
    found = HostSyncs()
    if device is not None and device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield found
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        for w in caught:
            if "synchroniz" in str(w.message):
                found.sites[f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"] += 1
        return
    originals: dict[str, Callable[..., Any]] = {name: getattr(torch.Tensor, name) for name in _READS}
    own = {name for name in _READS if name in vars(torch.Tensor)}  # the others are inherited from TensorBase

    def counted(name: str) -> Callable[..., Any]:
        original = originals[name]

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            site = _caller()
            if site is not None and not self.is_meta:
                found.sites[site] += 1
            return original(self, *args, **kwargs)

        return read

    try:
        for name in _READS:
            setattr(torch.Tensor, name, counted(name))
        yield found
    finally:
        for name, original in originals.items():
            if name in own:
                setattr(torch.Tensor, name, original)
            else:
                delattr(torch.Tensor, name)
