"""Sweep files: a grid of `--section.key=value` overrides over one or more configs.

A sweep file names a config (relative to itself) or a list of them, a grid of dotted keys and a
run directory template; the runs are the cartesian product of configs and grid, each config
validated (load_config) before anything runs. `{config}` in run_dir is the config file's stem,
`{optim.lr}` a grid value:

    config: [../paper/210m_galore_r64.yaml, ../paper/210m_galore_r128.yaml]
    grid:
      optim.lr: [3.16e-4, 1.0e-3, 3.16e-3]
      optim.scale: [0.125, 0.25]
    run_dir: runs/sweeps/{config}/lr{optim.lr}_alpha{optim.scale}
    overrides: {train.max_grad_norm: 1.0}      # optional fixed overrides
"""

from __future__ import annotations

import itertools
from pathlib import Path

import yaml

from trainer.config import ConfigError, load_config


def expand_sweep(sweep_path: Path) -> list[tuple[Path, list[str]]]:
    """(config path, overrides) per run of the sweep."""
    spec = yaml.safe_load(sweep_path.read_text()) or {}
    unknown = set(spec) - {"config", "grid", "run_dir", "overrides"}
    if unknown or "config" not in spec or "run_dir" not in spec:
        raise ConfigError(
            f"{sweep_path}: a sweep needs 'config' and 'run_dir' (+ 'grid', 'overrides'); unknown: {sorted(unknown)}"
        )
    configs = spec["config"] if isinstance(spec["config"], list) else [spec["config"]]
    grid = spec.get("grid") or {}
    fixed = spec.get("overrides") or {}
    runs = []
    for name, values in itertools.product(configs, itertools.product(*grid.values())):
        config = (sweep_path.parent / name).resolve()
        point = dict(zip(grid, values, strict=True))
        run_dir = spec["run_dir"].replace("{config}", config.stem)
        for key, value in point.items():  # "{optim.lr}" placeholders (dotted, so not str.format)
            run_dir = run_dir.replace("{" + key + "}", str(value))
        overrides = [f"--{k}={v}" for k, v in {**fixed, **point}.items()] + [f"--run.dir={run_dir}"]
        load_config(config, overrides)  # fail on a typo before anything runs
        runs.append((config, overrides))
    return runs
