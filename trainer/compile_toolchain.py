"""What torch.compile needs on the machine: a compiler for the kernels it generates. Checked when a run starts
with train.compile or optim.compile, so that a missing one is one `error:` line before any work, not a
traceback from inside Inductor at the first step."""

from __future__ import annotations

import os
import shutil

import torch

# Inductor writes a CPU's kernels in C++ and builds them with $CXX, else g++ / clang++; on CUDA, Triton builds
# each kernel's launcher with a C compiler: $CC, else cc / gcc / clang.
COMPILERS = {"cpu": ("C++", "CXX", ("g++", "clang++")), "cuda": ("C", "CC", ("cc", "gcc", "clang"))}


def missing_compiler(device: torch.device) -> str | None:
    """None when the compiler torch.compile needs on `device` is on PATH (or named by $CXX / $CC); else the
    problem and its fix, as one line."""
    language, env, names = COMPILERS["cuda" if device.type == "cuda" else "cpu"]
    candidates = [os.environ[env].split()[0]] if os.environ.get(env) else list(names)
    if any(shutil.which(c) for c in candidates):
        return None
    return (
        f"train.compile / optim.compile need a {language} compiler on {device.type} (torch.compile builds its "
        f"kernels with one: ${env} or {' / '.join(names)}) and none is on PATH; install one (Debian: apt-get "
        f"install gcc g++) or set --train.compile=false --optim.compile=false"
    )
