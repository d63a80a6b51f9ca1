"""Expand a sweep file into training commands (printed, or run one after another).

    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml                 # print the commands
    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml --run           # run them in turn
    python tools/sweep.py SWEEP --launcher "torchrun --nproc_per_node=8"    # how each is started

The sweep file format is described in trainer/sweep.py; every run's config is validated before
the first command is printed or started.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import ConfigError
from trainer.console import exit_quietly_on_closed_stdout
from trainer.sweep import expand_sweep

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--launcher", default="python", help='e.g. "torchrun --nproc_per_node=8"')
    parser.add_argument("--run", action="store_true", help="run the commands one after another")
    args = parser.parse_args(argv)
    try:
        runs = expand_sweep(args.sweep)
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
    sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
