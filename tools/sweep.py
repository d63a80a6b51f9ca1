"""Expand a sweep file into training commands (printed, or run one after another).

    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml                 # print the commands
    python tools/sweep.py configs/sweeps/210m_adamw_lr.yaml --run           # run them in turn
    python tools/sweep.py SWEEP --launcher "torchrun --nproc_per_node=8"    # how each is started

The sweep file format is described in trainer/sweep.py; every run's config is validated before
the first command is printed or started. With --run, `python` is this interpreter (the project's
venv, activated or not), and a stop (Ctrl-C, SIGTERM) lets the running trainer save before the sweep
ends: re-running the same command continues it (finished runs return at once, the stopped one resumes).
"""

from __future__ import annotations

import argparse
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.config import ConfigError
from trainer.console import exit_quietly_on_closed_stdout
from trainer.flag_parser import FlagParser
from trainer.sweep import expand_sweep

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--launcher", default="python", help='e.g. "torchrun --nproc_per_node=8"')
    parser.add_argument("--run", action="store_true", help="run the commands one after another")
    args = parser.parse_args(argv)
    launcher = shlex.split(args.launcher)
    if not launcher:
        parser.error('--launcher is empty: leave it out (python) or give a command, e.g. "torchrun --nproc_per_node=8"')
    try:
        runs = expand_sweep(args.sweep)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # The printed commands say `python`; the started ones use this interpreter, as `tools/study.py --run` does.
    started = [sys.executable if launcher == ["python"] else launcher[0], *launcher[1:]]
    for config, overrides in runs:
        config_arg = config.relative_to(REPO) if config.is_relative_to(REPO) else config
        tail = ["train.py", str(config_arg), *overrides]
        print(shlex.join(launcher + tail), flush=True)
        if args.run:
            code, stopped_by = run_to_the_end(started + tail)
            if stopped_by is not None:
                how = "saved and exited" if code == 0 else f"exited with {code} (its last checkpoint is whole)"
                print(
                    f"error: sweep stopped by {signal.Signals(stopped_by).name}: the running trainer {how}; re-run "
                    f"the same command to continue the sweep",
                    file=sys.stderr,
                )
                return 128 + stopped_by
            if code:
                print(f"error: run exited with {code}; stopping the sweep", file=sys.stderr)
                return code
    return 0


def run_to_the_end(cmd: list[str]) -> tuple[int, int | None]:
    """(the exit code of `cmd`, the stop signal that reached this process while it ran, or None).

    Not subprocess.call: on Ctrl-C it kills the child a quarter of a second later, before the trainer has saved.
    The child runs in its own session, so a terminal's Ctrl-C reaches only this process, which forwards one
    SIGTERM (the trainer's, and torchrun's, save-and-exit) and waits: two signals would cut torchrun's shutdown."""
    stopped_by: list[int] = []
    forwarded: list[bool] = []
    proc: subprocess.Popen | None = None

    def forward_once() -> None:
        if stopped_by and not forwarded and proc is not None:
            forwarded.append(True)
            proc.send_signal(signal.SIGTERM)

    def stop(signum: int, frame: FrameType | None) -> None:
        stopped_by.append(signum)
        forward_once()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}  # before the child
    try:
        proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True)
        forward_once()  # a stop that came while the child was starting
        code = proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, (stopped_by[0] if stopped_by else None)


if __name__ == "__main__":
    sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
