"""`python -m trainer.launch [torchrun options] train.py CONFIG [--section.key=value ...]`

torchrun with a clean stop. torchrun's agent turns a SIGTERM or SIGINT that it receives itself
into a `SignalException`: it forwards SIGTERM to the workers, gives them 30 s, and exits 1 with a
traceback even when every worker finished its step, saved and exited 0. Preemption (SLURM's
scancel, `kill` of the job's process group, Ctrl-C) signals the agent too, so a clean stop looked
like a crash to schedulers and scripts.

This launcher runs torchrun (`python -m torch.distributed.run`, every option passed through) with
SIGTERM and SIGINT ignored in the agent (an ignored disposition survives exec, and
`--signals-to-handle` keeps the agent from installing its own handlers for them) and forwards a
stop request to the workers itself: each worker's trainer finishes the current step, rank 0
saves once, every rank exits 0, and the agent sees a normal completion, so the job exits 0.
The workers install their own handlers (trainer.trainer.StopFlag), so the inherited "ignore"
does not reach them once training has started; a request that arrives earlier (during start-up)
is sent again every few seconds until the job ends. A worker that fails still fails the job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

RESEND_SECONDS = 5.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def worker_pids(agent_pid: int) -> list[int]:
    """The agent's child processes (the workers), from /proc (Linux)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we looked
        if int(fields[1]) == agent_pid:  # fields: state, ppid, ...
            pids.append(int(stat.parent.name))
    return pids


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--signals-to-handle=SIGHUP,SIGQUIT", *argv]

    def agent_ignores_stop_signals() -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    agent = subprocess.Popen(cmd, preexec_fn=agent_ignores_stop_signals)
    stop_requested_at: list[float] = []

    def forward(signum: int, frame: FrameType | None) -> None:
        stop_requested_at.append(time.monotonic())
        for pid in worker_pids(agent.pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    for sig in STOP_SIGNALS:
        signal.signal(sig, forward)
    while True:
        try:  # a timeout even before any request: one that arrives during this wait must be resent too
            return agent.wait(timeout=RESEND_SECONDS)
        except subprocess.TimeoutExpired:
            if stop_requested_at:
                forward(signal.SIGTERM, None)  # workers still starting up ignored the first request


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
