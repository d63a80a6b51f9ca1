"""A small, really full disk for tests: a tmpfs mounted for the test (root on Linux; the test is
skipped, with the reason, where mounting is not permitted, e.g. an unprivileged container)."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(directory: Path, size: str = "4m") -> Iterator[Path]:
    """`directory` (created) as a tmpfs of `size` (mount's syntax) until the block ends."""
    if sys.platform != "linux":
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs Linux")
    if os.geteuid() != 0:
        pytest.skip("a full disk is simulated with a tmpfs mount, which needs root")
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("a full disk is simulated with a tmpfs mount: no mount/umount command here")
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)  # busy: detach it anyway


def fill(path: Path, chunk: int = 64 * 1024) -> int:
    """Write zeros to `path` until its filesystem is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        block = b"\0" * chunk
        while True:
            try:
                written += f.write(block) or 0
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if chunk == 1:
                    return written
                block = b"\0" * (chunk := max(1, chunk // 16))


def record_durable_renames(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, bool]]:
    """Spy on os.fsync and os.replace (patched on the os module, so for every caller): each rename as (source
    name, target name, whether the renamed file was the last one fsynced before it). A rename is durable only
    once the file's data reached the disk first."""
    synced: list[int] = []  # inodes, in fsync order
    renames: list[tuple[str, str, bool]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        synced.append(os.fstat(fd).st_ino)
        real_fsync(fd)

    def replace(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        renames.append((Path(src).name, Path(dst).name, bool(synced) and synced[-1] == os.stat(src).st_ino))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return renames
