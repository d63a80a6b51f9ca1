"""Every bad input of the issue-13 probes, through the CLI's entry point (train.main): one `error:`
line naming the key (or file) and the fix, exit status 1, no traceback, nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train
from data import DataWarning
from tests.helpers.runs import tiny_overrides
from trainer.compile_toolchain import missing_compiler

# (overrides, text the error must contain). Each is refused when the config loads.
CONFIG_PROBES = [
    (["--optim.name=adamm"], "unknown optimizer optim.name='adamm'. Did you mean"),
    (["--optim.name=adalomo", "--optim.update_norm=layer"], "optim.update_norm='layer' is not one of"),
    (["--optim.name=adamem", "--optim.variant=variant3"], "optim.variant='variant3' is not one of"),
    (["--optim.name=galore_adamw", "--optim.proj_type=diag"], "optim.proj_type='diag' is not one of"),
    (["--optim.name=galore_adamw", "--optim.svd_method=fast"], "optim.svd_method='fast' is not one of"),
    (["--optim.name=adamem", "--optim.moments_on_proj_change=drop"], "optim.moments_on_proj_change='drop'"),
    (["--optim.name=galore_adamw", "--optim.update_proj_gap=0"], "optim.update_proj_gap=0 is out of range"),
    (["--optim.lr=-1e-3"], "optim.lr=-0.001 is out of range: it must be > 0"),
    (["--optim.beta2=1.0"], "optim.beta2=1.0 is out of range: it must be in (0, 1)"),
    (["--optim.name=adafactor", "--optim.beta2=1.5"], "optim.beta2=1.5 is out of range"),
    (["--optim.name=galore_adamw", "--optim.rank=0"], "optim.rank=0 is out of range"),
    (["--optim.name=adamem", "--optim.rank=65"], "optim.rank=65 exceeds the smaller side"),
    (["--optim.name=galore_adamw", "--optim.delta=0.5"], "optim.delta=0.5 is not read by galore_adamw"),
    (["--train.precision=fp16"], "train.precision='fp16' is not one of"),
    (["--train.fused_update=true"], "max_grad_norm=0"),
    (["--train.global_batch=6", "--train.micro_batch=4"], "must split into 1 rank(s) x whole micro-batches"),
    (["--model.d_model=100"], "model.d_model=100 is not a positive multiple of the head dimension 64"),
    (["--data.seq_len=64"], "data.seq_len=64 exceeds model.max_seq_len=32"),
    (["--trian.max_steps=3"], "unknown config section 'trian'. Did you mean 'train'"),
    (["--optim.lrr=1"], "unknown config key optim.lrr. Did you mean 'lr'"),
]


@pytest.mark.parametrize("overrides,expected", CONFIG_PROBES, ids=[" ".join(o) for o, _ in CONFIG_PROBES])
def test_bad_config_is_one_error_line(tmp_path, sample_tokens, capsys, overrides, expected):
    run_dir = tmp_path / "run"
    code = train.main(["configs/tiny.yaml", *tiny_overrides(run_dir, sample_tokens), *overrides])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: "), err
    assert expected in err, err
    assert not run_dir.exists()  # refused before any work: nothing written


def test_missing_config_file_and_no_arguments(tmp_path, capsys):
    assert train.main([str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err.startswith("error: config file not found")
    assert train.main([]) == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize("key", ["--optim.compile=true", "--train.compile=true"])
def test_compile_without_a_compiler_is_one_error_line(tmp_path, sample_tokens, capsys, monkeypatch, key):
    """torch.compile builds its kernels with a C/C++ compiler: with none on PATH the run stops before any work with
    the fix, not at the first step with a traceback from inside Inductor."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.delenv("CC", raising=False)
    run_dir = tmp_path / "run"
    overrides = [*tiny_overrides(run_dir, sample_tokens), "--optim.name=adafactor", key]
    assert train.main(["configs/tiny.yaml", *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: train.compile / optim.compile need a C++ compiler on cpu"), err
    assert "apt-get install gcc g++" in err and not run_dir.exists()


def _path_with(tmp_path: Path, *names: str) -> str:
    """A PATH of one directory holding an executable stub for each of `names`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in names:
        stub = bin_dir / name
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize(
    ("device", "on_path", "env", "found"),
    [
        ("cpu", ["clang++"], {}, True),  # either C++ compiler will do
        ("cpu", ["gcc"], {}, False),  # a C compiler builds no C++ kernels
        ("cpu", ["ccache", "mycxx"], {"CXX": "ccache mycxx"}, True),  # $CXX may carry a wrapper before the compiler
        ("cpu", ["g++"], {"CXX": "nocxx"}, False),  # $CXX names the one that is used
        ("cuda", ["cc"], {}, True),  # Triton's launchers need a C compiler
        ("cuda", ["g++"], {}, False),
        ("cuda", ["mycc"], {"CC": "mycc"}, True),
    ],
)
def test_the_compiler_torch_compile_needs_is_found_on_path_or_in_the_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str, on_path: list[str], env: dict[str, str], found: bool
):
    monkeypatch.setenv("PATH", _path_with(tmp_path, *on_path))
    for var in ("CC", "CXX"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    problem = missing_compiler(torch.device(device))
    assert (problem is None) == found, problem


def test_a_missing_cuda_compiler_names_cc_and_both_fixes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", _path_with(tmp_path))
    monkeypatch.delenv("CC", raising=False)
    assert missing_compiler(torch.device("cuda")) == (
        "train.compile / optim.compile need a C compiler on cuda (torch.compile builds its kernels with one: $CC or "
        "cc / gcc / clang) and none is on PATH; install one (Debian: apt-get install gcc g++) or set "
        "--train.compile=false --optim.compile=false"
    )


@pytest.mark.parametrize("main_rank", [True, False])
def test_a_data_warning_is_one_warning_line_on_the_main_rank_only(capsys, main_rank: bool):
    """Every rank opens the data, so a DataWarning is printed once (rank 0) as `warning: ...`; other warnings go to
    the usual printer on every rank."""
    passed: list[tuple[object, type[Warning]]] = []
    show = train.data_warning_printer(
        DataWarning, main_rank, lambda message, cat, *a, **k: passed.append((message, cat))
    )
    show(DataWarning("old tokens"), DataWarning, "data.py", 1)
    other = UserWarning("something else")
    show(other, UserWarning, "x.py", 2)
    assert capsys.readouterr().err == ("warning: old tokens\n" if main_rank else "")
    assert passed == [(other, UserWarning)]
