"""The command-line tools end to end on a tiny corpus: train_tokenizer -> prepare_data -> TrainBatches."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import pathlib
import re
import runpy
import sys
import tomllib
from typing import Any, NoReturn

import numpy as np
import pytest
import torch

from data import DataConfig, DataError, TrainBatches, validation_batches
from data.paths import REPO_ROOT, check_output_path
from tests.helpers.corpus import make_texts, tiny_tokenizer, write_corpus


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_count_parser():
    count = load_tool("prepare_data").count
    assert count("4.2B") == 4_200_000_000 and count("8400M") == 8_400_000_000
    assert count("1_048_576") == 1_048_576 and count("1e6") == 1_000_000 and count("512k") == 512_000


def test_tools_end_to_end(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c4", make_texts(200, seed=41), make_texts(30, seed=42))
    model = tmp_path / "tok.model"
    assert (
        load_tool("train_tokenizer").main(
            [
                "--source",
                str(corpus),
                "--out",
                str(model),
                "--vocab_size",
                "400",
                "--character_coverage",
                "1.0",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    out = tmp_path / "tokens"
    prep = load_tool("prepare_data")
    args = [
        "--source",
        str(corpus),
        "--out",
        str(out),
        "--tokenizer",
        str(model),
        "--workers",
        "2",
        "--max-tokens",  # the benchmarks' spelling: either is accepted
        "3k",
        "--val_tokens",
        "500",
        "--shard_tokens",
        "1000",
        "--no-progress",
    ]
    assert prep.main(args) == 0
    printed = capsys.readouterr().out
    assert "summary [train]" in printed and "skipped records: none" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert 3000 <= manifest["splits"]["train"]["tokens"] < 3300
    assert prep.main(args) == 0  # re-run: resumes, nothing to do
    assert json.loads((out / "manifest.json").read_text()) == manifest
    cfg = DataConfig(prepared_dir=str(out), tokenizer=str(model), seq_len=32, val_tokens=500)
    x, y = next(itertools.islice(TrainBatches(cfg, global_batch=4).batches(0), 1))
    assert x.shape == (4, 32) and (x[:, 1:] == y[:, :-1]).all()
    assert sum(len(v) for v, _ in validation_batches(cfg, 8)) == (500 - 1) // 32
    # Bad settings come back as an error message, not a traceback.
    assert (
        prep.main(
            [
                "--source",
                str(tmp_path / "nothing"),
                "--out",
                str(tmp_path / "o2"),
                "--tokenizer",
                str(model),
                "--no_progress",
            ]
        )
        == 1
    )
    assert "no train shards found" in capsys.readouterr().err


def test_default_config_on_prepared_sample_corpus(sample_tokens):
    # The defaults (data.prepared_dir, data.tokenizer) open the sample tokens: each row is a window of
    # seq_len + 1 tokens at a multiple of seq_len in the stream the shard files hold, y shifted by one.
    x, y = next(TrainBatches(DataConfig(seq_len=256), global_batch=16).batches(0))
    assert x.shape == y.shape == (16, 256)
    manifest = json.loads((sample_tokens / "manifest.json").read_text())
    stream = np.concatenate(
        [np.fromfile(sample_tokens / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"]["train"]["shards"]]
    ).astype(np.int64)
    n = (len(stream) - 1) // 256
    windows = np.lib.stride_tricks.as_strided(stream, (n, 257), (256 * stream.itemsize, stream.itemsize))
    rows = torch.cat([x, y[:, -1:]], dim=1).numpy()
    assert torch.equal(x[:, 1:], y[:, :-1])
    found = [np.flatnonzero((windows == row).all(axis=1)) for row in rows]
    assert all(len(f) >= 1 for f in found)
    assert len({int(f[0]) for f in found}) == 16  # 16 different windows


def _error_line(capsys) -> str:
    """The one `error:` line a tool printed for bad input (nothing else on stderr)."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize(
    "flags",
    [
        ["--max_tokens", "-1"],
        ["--max_tokens", "0"],
        ["--max_docs", "0"],
        ["--max_docs", "-1"],
        ["--val_tokens", "0"],
        ["--shard_tokens", "0"],
        ["--shard_tokens", "0.4"],  # rounds to 0
    ],
)
def test_prepare_data_refuses_counts_below_one(flags, capsys):
    with pytest.raises(SystemExit) as exit:
        load_tool("prepare_data").main([*flags, "--no_progress"])
    assert exit.value.code == 2
    assert f"argument {flags[0]}: must be at least 1, got '{flags[1]}'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("tool", "flags", "message"),
    [
        ("prepare_data", ["--workers", "-1"], "must be at least 0, got -1"),
        ("train_tokenizer", ["--threads", "0"], "must be at least 1, got 0"),
        ("train_tokenizer", ["--max_docs", "-1"], "must be at least 1, got -1"),
        ("train_tokenizer", ["--vocab_size", "0"], "must be at least 1, got 0"),
        ("train_tokenizer", ["--threads", "two"], "'two' is not an integer"),
    ],
)
def test_process_and_size_flags_below_their_least_are_usage_errors(tool, flags, message, capsys):
    with pytest.raises(SystemExit) as exit:
        load_tool(tool).main(flags)
    assert exit.value.code == 2 and f"argument {flags[0]}: {message}" in capsys.readouterr().err


def test_prepare_data_refuses_a_count_that_is_no_number(capsys):
    with pytest.raises(SystemExit):
        load_tool("prepare_data").main(["--max_tokens", "inf"])
    assert "argument --max_tokens: 'inf' is not a count" in capsys.readouterr().err


def test_prepare_data_out_that_is_a_file(tmp_path, capsys):
    prep = load_tool("prepare_data")
    corpus = write_corpus(tmp_path / "c4", make_texts(20, seed=1), make_texts(5, seed=2))
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert prep.main(["--source", str(corpus), "--out", str(afile), "--no_progress"]) == 1
    assert f"error: --out {afile} is a file, not a directory. Fix:" in _error_line(capsys)
    assert prep.main(["--source", str(corpus), "--out", str(afile / "tokens"), "--no_progress"]) == 1
    assert f"cannot be created: {afile} is a file" in _error_line(capsys)
    assert afile.read_text() == "keep me"


def test_an_output_directory_that_is_not_writable_is_refused(tmp_path, monkeypatch):
    """An existing --out directory must itself be writable (its parent's permissions do not matter); root
    may write anywhere, so the permission is faked for the one directory."""
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: object, mode: int) -> bool:
        return not (pathlib.Path(str(path)) == locked and mode & os.W_OK) and real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    message = f"--out {locked} cannot be written: {locked} is not writable by this user. Fix: make it writable"
    with pytest.raises(DataError, match=f"^{re.escape(message)}"):
        check_output_path(locked, "--out", directory=True)
    with pytest.raises(DataError, match=re.escape(f"--out {locked / 'new'} cannot be written: {locked} is not")):
        check_output_path(locked / "new", "--out", directory=True)
    check_output_path(tmp_path / "new", "--out", directory=True)  # tmp_path itself is writable


def test_train_tokenizer_refuses_to_replace_a_model_without_force(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c4", make_texts(200, seed=41), make_texts(30, seed=42))
    model = tmp_path / "tok.model"
    tool = load_tool("train_tokenizer")
    base = ["--source", str(corpus), "--out", str(model), "--character_coverage", "1.0", "--threads", "1"]
    assert tool.main([*base, "--vocab_size", "400"]) == 0
    capsys.readouterr()
    first = model.read_bytes()
    # Prepared data records the model's sha256: replacing it silently would make training refuse that data.
    assert tool.main([*base, "--vocab_size", "380"]) == 1
    assert f"error: --out {model} already exists" in _error_line(capsys)
    assert model.read_bytes() == first
    assert tool.main([*base, "--vocab_size", "380", "--force"]) == 0
    assert model.read_bytes() != first and sorted(p.name for p in tmp_path.iterdir()) == ["c4", "tok.model"]


def test_train_tokenizer_out_that_is_a_directory(tmp_path, monkeypatch, capsys):
    corpus = write_corpus(tmp_path / "c4", make_texts(20, seed=41), make_texts(5, seed=42))
    tool = load_tool("train_tokenizer")
    # Refused before training (which used to run first, then crash on writing and leave <out>.tmp behind).
    monkeypatch.setattr(tool, "train_sentencepiece", lambda *a, **k: pytest.fail("trained before checking --out"))
    out = tmp_path / "models"
    out.mkdir()
    assert tool.main(["--source", str(corpus), "--out", str(out)]) == 1
    assert f"error: --out {out} is a directory, not a file. Fix:" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c4", "models"] and not any(out.iterdir())


def test_help_says_how_relative_paths_resolve(capsys):
    # --source is taken from the current directory, --out/--tokenizer from the repo root (and MEMOPT_CACHE).
    for name in ("prepare_data", "train_tokenizer"):
        with pytest.raises(SystemExit):
            load_tool(name).main(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "json.gz shards; a relative path is taken from the current directory" in text
        assert "a relative path is taken from the repo root (one starting with .cache/ from MEMOPT_CACHE" in text
    assert "The model depends on it" in text  # train_tokenizer's --threads


def test_counts_round_to_the_nearest_and_take_thousands_separators() -> None:
    count = load_tool("prepare_data").count
    assert count("1.005k") == 1005  # 1.005 * 1000 is 1004.999... in floating point
    assert count("1,048,576") == 1_048_576 and count("2,000k") == 2_000_000


def test_limits_of_each_split_and_the_default_out_of_a_source(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--max_docs limits the train split, --val_tokens the validation split (1 token: its first document), and
    without --out a --source goes to <cache>/tokens/c4 (MEMOPT_CACHE), not to the sample corpus' tokens."""
    monkeypatch.setenv("MEMOPT_CACHE", str(tmp_path / "cache"))
    train = make_texts(40, seed=5)
    tok = tiny_tokenizer(tmp_path / "tiny.model", train)
    corpus = write_corpus(tmp_path / "c4", train, make_texts(5, seed=6))
    args = ["--source", str(corpus), "--tokenizer", str(tok), "--max_docs", "7", "--val_tokens", "1"]
    assert load_tool("prepare_data").main([*args, "--workers", "0", "--no_progress"]) == 0
    manifest = json.loads((tmp_path / "cache" / "tokens" / "c4" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["docs"] == 7 and manifest["splits"]["validation"]["docs"] == 1
    assert sorted(p.name for p in (tmp_path / "cache" / "tokens").iterdir()) == ["c4"]


def test_prepare_data_interrupted_exits_130_and_says_how_to_resume(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    prep = load_tool("prepare_data")
    corpus = write_corpus(tmp_path / "c4", make_texts(5, seed=1), make_texts(2, seed=2))

    def interrupted(*args: object, **kwargs: object) -> NoReturn:
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "resolve_tokenizer_path", lambda name: tmp_path / "tok.model")
    monkeypatch.setattr(prep, "prepare", interrupted)
    assert prep.main(["--source", str(corpus), "--out", str(tmp_path / "tokens"), "--no_progress"]) == 130
    assert capsys.readouterr().err == ("interrupted: finished shards are kept; re-run the same command to resume\n")


def test_train_tokenizer_trains_on_the_train_splits_non_blank_documents_with_its_defaults(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    train = ["First doc.", "  \n ", "Second doc.", "Third doc.", "Fourth doc."]
    corpus = write_corpus(tmp_path / "c4", train, ["Validation doc."], train_shards=1)
    tool = load_tool("train_tokenizer")
    calls: list[tuple[list[str], dict[str, Any]]] = []

    def fake_train(docs: Any, out: pathlib.Path, **kwargs: Any) -> None:
        calls.append((list(docs), kwargs))
        out.write_bytes(b"model")

    monkeypatch.setattr(tool, "train_sentencepiece", fake_train)
    monkeypatch.setattr(tool, "load_tokenizer", lambda path: None)
    assert tool.main(["--source", str(corpus), "--out", str(tmp_path / "a.model"), "--max_docs", "3"]) == 0
    assert tool.main(["--source", str(corpus), "--out", str(tmp_path / "b.model"), "--threads", "2"]) == 0
    defaults = {
        "vocab_size": 32000,
        "model_type": "unigram",
        "character_coverage": 0.9995,
        "byte_fallback": True,
        "input_sentence_size": 2_000_000,
        "num_threads": os.cpu_count() or 1,
    }
    assert calls == [
        (["First doc.", "Second doc.", "Third doc."], defaults),
        (["First doc.", "Second doc.", "Third doc.", "Fourth doc."], {**defaults, "num_threads": 2}),
    ]


def _requirements(monkeypatch: pytest.MonkeyPatch, *extras: str) -> None:
    monkeypatch.setattr(sys, "argv", ["requirements.py", *extras])
    runpy.run_path(str(REPO_ROOT / "tools" / "requirements.py"), run_name="__main__")


def test_requirements_prints_core_then_each_extra_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    core, extras = project["dependencies"], project["optional-dependencies"]
    assert "datasets" in extras["test"] and "datasets" in extras["hf"]  # listed twice: printed once
    _requirements(monkeypatch)
    assert capsys.readouterr().out.splitlines() == core
    _requirements(monkeypatch, "test", "hf")
    printed = capsys.readouterr().out.splitlines()
    assert printed == core + [r for r in extras["test"] if r not in core] and printed.count("datasets") == 1
    with pytest.raises(SystemExit, match=re.escape(f"unknown extra 'gpu'; known: {sorted(extras)}")):
        _requirements(monkeypatch, "gpu")
