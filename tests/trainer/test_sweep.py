"""Sweep files -> (config, overrides) per run, every run validated (trainer/sweep.py), and the tools/sweep.py
command that prints or runs them. The shipped sweep files themselves: test_sweep_files.py."""

import shlex
import signal
import sys
from pathlib import Path

import pytest

from tests.helpers.runs import REPO
from tools import sweep as sweep_tool
from trainer.config import ConfigError, load_config
from trainer.sweep import expand_sweep


def test_grid_points_become_overrides_and_fill_the_run_dir(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"config: {REPO / 'configs/tiny.yaml'}\n"
        "grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0, 0.1]}\n"
        "run_dir: runs/s/{config}_lr{optim.lr}_wd{optim.weight_decay}\n"
        "overrides: {train.max_steps: 7}\n"
    )
    runs = expand_sweep(sweep)
    assert len(runs) == 4
    config, overrides = runs[1]
    assert config == REPO / "configs/tiny.yaml"
    assert overrides == [
        "--train.max_steps=7",
        "--optim.lr=0.001",
        "--optim.weight_decay=0.1",
        "--run.dir=runs/s/tiny_lr0.001_wd0.1",
    ]
    assert load_config(config, overrides).optim.weight_decay == 0.1


@pytest.mark.parametrize(
    "body,match",
    [
        ("grid: {optim.lrr: [1]}\nrun_dir: x\n", r"optim\.lrr"),
        ("grid: {}\n", "needs 'config' and 'run_dir'"),
        # a misspelt top-level key would silently drop its grid: 1 run instead of the sweep
        ("gird: {optim.lr: [1.0e-3, 3.0e-3]}\nrun_dir: x\n", r"unknown: \['gird'\]"),
    ],
)
def test_a_bad_sweep_fails_before_any_run(tmp_path, body, match):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: {REPO / 'configs/tiny.yaml'}\n" + body)
    with pytest.raises(ConfigError, match=match):
        expand_sweep(sweep)


def write_sweep(tmp_path: Path, body: str) -> Path:
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: {REPO / 'configs/tiny.yaml'}\n" + body)
    return sweep


def test_zipped_keys_vary_together_and_are_crossed_with_the_grid(tmp_path):
    sweep = write_sweep(
        tmp_path,
        "zip: {train.global_batch: [8, 16], train.max_steps: [20, 10]}\n"
        "grid: {optim.lr: [1.0e-3, 3.0e-3]}\n"
        "run_dir: runs/s/bs{train.global_batch}_lr{optim.lr}\n"
        "overrides: {train.micro_batch: 4}\n",
    )
    runs = expand_sweep(sweep)
    expected = [
        ["--train.micro_batch=4", f"--train.global_batch={b}", f"--train.max_steps={s}", f"--optim.lr={lr}"]
        + [f"--run.dir=runs/s/bs{b}_lr{lr}"]
        for b, s in ((8, 20), (16, 10))  # the zip rows, outside the grid points
        for lr in (0.001, 0.003)
    ]
    assert [overrides for _, overrides in runs] == expected
    pairs = {(c.train.global_batch, c.train.max_steps) for c in (load_config(p, o) for p, o in runs)}
    assert pairs == {(8, 20), (16, 10)}  # linked, never crossed: no (8, 10) or (16, 20)


def test_zipped_values_are_validated_like_any_override(tmp_path):
    """A zip row that makes an invalid config (12 sequences do not split into micro-batches of 8) stops the sweep."""
    sweep = write_sweep(tmp_path, "zip: {train.global_batch: [8, 12]}\nrun_dir: runs/s/bs{train.global_batch}\n")
    with pytest.raises(ConfigError, match=r"train.global_batch=12 must split"):
        expand_sweep(sweep)


@pytest.mark.parametrize(
    "body,match",
    [
        (
            "zip: {train.global_batch: [8, 16], train.max_steps: [20, 10, 5]}\nrun_dir: x{train.global_batch}\n",
            r"need equal lengths: train.global_batch has 2, train.max_steps has 3",
        ),
        ("zip: {train.max_steps: 20}\nrun_dir: x\n", r"zip.train.max_steps must be a non-empty list"),
        ("grid: {optim.lr: []}\nrun_dir: x\n", r"grid.optim.lr must be a non-empty list"),
        ("zip: [1, 2]\nrun_dir: x\n", r"'zip' must map dotted keys to lists"),
        (
            "zip: {optim.lr: [1.0e-3]}\ngrid: {optim.lr: [1.0e-3]}\nrun_dir: x{optim.lr}\n",
            r"optim.lr is set in both grid and zip",
        ),
        ("overrides: {run.dir: x}\nrun_dir: x\n", r"top-level 'run_dir' template, not run.dir"),
        (  # otherwise the grid value would silently win over the fixed override in every run
            "overrides: {optim.lr: 1.0e-3}\ngrid: {optim.lr: [1.0e-3, 3.0e-3]}\nrun_dir: x/{optim.lr}\n",
            r"optim.lr is set in both overrides and grid; keep it in one of them",
        ),
        ("overrides: [train.max_steps]\nrun_dir: x\n", r"'overrides' must map dotted keys to values"),
        ("grid: {optim.lr: [1.0e-3, 3.0e-3]}\nrun_dir: x/{optim.lrr}\n", r"placeholder\(s\) \{optim.lrr\} name no"),
        (
            "grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0]}\nrun_dir: x/{optim.weight_decay}\n",
            r"several runs share x/0.0; .* add \{optim.lr\}",
        ),
        (  # the fix names only the keys that vary: weight_decay has one value, so adding it tells no runs apart
            "grid: {optim.lr: [1.0e-3, 3.0e-3], optim.weight_decay: [0.0]}\nrun_dir: x/{config}\n",
            r"several runs share x/tiny; the run_dir template 'x/\{config\}' must tell them apart: add \{optim.lr\}$",
        ),
        (
            "grid: {optim.lr: [1.0e-3, 0.001]}\nrun_dir: x/{optim.lr}\n",
            r"grid optim.lr lists 0.001 more than once: \[0.001, 0.001\]; drop the repeat",
        ),
        (  # YAML reads 1e-3 (no dot) as the string '1e-3': another directory, the same run
            "grid: {optim.lr: [1.0e-3, 1e-3]}\nrun_dir: x/lr{optim.lr}\n",
            r"runs x/lr0.001 and x/lr1e-3 are the same run .*spelled two ways",
        ),
        ("grid: {5: [1]}\nrun_dir: x/{5}\n", r"grid key 5 is not a dotted config key"),
    ],
)
def test_a_malformed_grid_or_zip_is_a_config_error_naming_the_fix(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        expand_sweep(write_sweep(tmp_path, body))


def test_config_must_name_files(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: [{REPO / 'configs/tiny.yaml'}, 7]\nrun_dir: x/{{config}}\n")
    with pytest.raises(ConfigError, match=r"'config' must be a config file or a list of them"):
        expand_sweep(sweep)


def test_the_sweep_command_stops_at_the_first_failed_run_and_starts_this_python(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """--run: `python` is started as this interpreter, the config path is printed relative to the repo, and a run
    that exits non-zero ends the sweep with its exit code before the next run starts."""
    sweep = write_sweep(tmp_path, "grid: {optim.lr: [1.0e-3, 3.0e-3]}\nrun_dir: runs/s/lr{optim.lr}\n")
    started: list[list[str]] = []

    def fail(cmd: list[str]) -> tuple[int, int | None]:
        started.append(cmd)
        return 3, None

    monkeypatch.setattr(sweep_tool, "run_to_the_end", fail)
    assert sweep_tool.main([str(sweep), "--run"]) == 3
    out, err = capsys.readouterr()
    assert out == "python train.py configs/tiny.yaml --optim.lr=0.001 --run.dir=runs/s/lr0.001\n"
    assert started == [
        [sys.executable, "train.py", "configs/tiny.yaml", "--optim.lr=0.001", "--run.dir=runs/s/lr0.001"]
    ]
    assert err == "error: run exited with 3; stopping the sweep\n"


def test_a_sweep_run_starts_in_its_own_session_and_the_signal_handlers_are_restored() -> None:
    """The child's own session keeps a terminal's Ctrl-C from reaching it directly (the sweep forwards one SIGTERM);
    the sweep's own SIGINT / SIGTERM handlers are back once the run has ended."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    own_session = "import os, sys; sys.exit(0 if os.getsid(0) == os.getpid() else 3)"
    assert sweep_tool.run_to_the_end([sys.executable, "-c", own_session]) == (0, None)
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_printed_commands_can_be_pasted_into_a_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run directory with a space is quoted, so the printed line splits back into the very arguments."""
    sweep = write_sweep(tmp_path, "grid: {optim.lr: [1.0e-3]}\nrun_dir: runs/my sweep/lr{optim.lr}\n")
    assert sweep_tool.main([str(sweep), "--launcher", "torchrun --nproc_per_node=8"]) == 0
    line = capsys.readouterr().out.strip()
    assert (
        line
        == "torchrun --nproc_per_node=8 train.py configs/tiny.yaml --optim.lr=0.001 '--run.dir=runs/my sweep/lr0.001'"
    )
    assert shlex.split(line)[-1] == "--run.dir=runs/my sweep/lr0.001"
