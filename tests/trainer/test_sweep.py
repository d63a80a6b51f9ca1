"""Sweep files -> (config, overrides) per run, every run validated (trainer/sweep.py)."""

import pytest

from tests.helpers.runs import REPO
from trainer.config import ConfigError, load_config
from trainer.sweep import expand_sweep

SHIPPED = sorted((REPO / "configs").rglob("sweeps/*.yaml"))


def test_there_are_shipped_sweeps():
    assert len(SHIPPED) >= 5


@pytest.mark.parametrize("sweep", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_sweep_expands_into_valid_runs_with_their_own_directories(sweep):
    runs = expand_sweep(sweep)  # raises ConfigError on any invalid run
    assert len(runs) >= 2
    run_dirs = [overrides[-1].removeprefix("--run.dir=") for _, overrides in runs]
    assert len(set(run_dirs)) == len(run_dirs), sweep


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
    [("grid: {optim.lrr: [1]}\nrun_dir: x\n", r"optim\.lrr"), ("grid: {}\n", "needs 'config' and 'run_dir'")],
)
def test_a_bad_sweep_fails_before_any_run(tmp_path, body, match):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: {REPO / 'configs/tiny.yaml'}\n" + body)
    with pytest.raises(ConfigError, match=match):
        expand_sweep(sweep)
