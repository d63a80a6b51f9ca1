"""Expand a sweep file into training commands (printed, or run one after another).

    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml                 # print the commands
    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml --run           # run them in turn
    python tools/sweep.py SWEEP --launcher "torchrun --nproc_per_node=8"    # how each is started

A sweep file names a config (relative to itself) or a list of them, a grid of dotted keys and a
run directory template; the commands are the cartesian product of configs and grid, each config
validated up front. `{config}` in run_dir is the config file's stem, `{optim.lr}` a grid value:

    config: [../paper/210m_galore_r64.yaml, ../paper/210m_galore_r128.yaml]
    grid:
      optim.lr: [3.16e-4, 1.0e-3, 3.16e-3]
      optim.scale: [0.125, 0.25]
    run_dir: runs/sweeps/{config}/lr{optim.lr}_alpha{optim.scale}
    overrides: {train.max_grad_norm: 1.0}      # optional fixed overrides
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from trainer.config import ConfigError, load_config  # noqa: E402


def expand(sweep_path: Path) -> list[tuple[Path, list[str]]]:
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


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--launcher", default="python", help='e.g. "torchrun --nproc_per_node=8"')
    parser.add_argument("--run", action="store_true", help="run the commands one after another")
    args = parser.parse_args(argv)
    try:
        runs = expand(args.sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for config, overrides in runs:
        config_arg = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        cmd = shlex.split(args.launcher) + ["train.py", str(config_arg), *overrides]
        print(shlex.join(cmd), flush=True)
        if args.run:
            code = subprocess.call(cmd, cwd=REPO)
            if code:
                print(f"error: run exited with {code}; stopping the sweep", file=sys.stderr)
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
