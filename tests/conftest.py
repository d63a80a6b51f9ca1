"""Shared fixtures. Layout: tests/<package>/ holds the unit tests of each package (model, data,
optim, trainer); tests/e2e/ the end-to-end runs of train.py and the tools (subprocesses, torchrun),
all marked `e2e` (`pytest -m "not e2e"` for the fast loop); tests/helpers/ the shared helpers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def sample_tokens() -> Path:
    """The prepared sample corpus (real English, T5 tokenizer), made by `make data`; the test
    command runs that first."""
    from data.paths import sample_tokens_dir

    tokens = sample_tokens_dir()
    if not (tokens / "manifest.json").exists():
        pytest.fail(f"{tokens} is missing: run `make data` (the test command `make test` does)")
    return tokens
