"""The command-line tools end to end on a tiny corpus: train_tokenizer -> prepare_data -> TrainBatches."""

from __future__ import annotations

import importlib.util
import itertools
import json

import pytest

from data import DataConfig, TrainBatches, validation_batches
from data.paths import REPO_ROOT, sample_tokens_dir
from tests.helpers.corpus import make_texts, write_corpus


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


@pytest.mark.skipif(
    not (sample_tokens_dir() / "manifest.json").is_file(),
    reason="sample corpus not prepared (tools/fetch_assets.py + tools/prepare_data.py)",
)
def test_default_config_on_prepared_sample_corpus():
    x, y = next(TrainBatches(DataConfig(seq_len=256), global_batch=16).batches(0))
    assert x.shape == y.shape == (16, 256)
