"""The standard output after its reader went away (`python tools/study.py STUDY | head`).

Python raises BrokenPipeError at the first write after the reader exits, and again at the interpreter's last
flush. `silence_closed_stdout` points the descriptor at /dev/null (the recipe of Python's `signal` docs, which
advise against restoring SIGPIPE's default: it would kill the process mid-write), so a program can finish its
work quietly. `exit_quietly_on_closed_stdout` wraps a command-line `main` with it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def silence_closed_stdout() -> None:
    """Send every later write to the standard output to /dev/null."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # a replaced sys.stdout without a descriptor (a test's capture)
        pass


def exit_quietly_on_closed_stdout(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """main(argv)'s exit code, or 1 without a traceback when its output's reader went away (Python's docs)."""
    try:
        return main(argv)
    except BrokenPipeError:
        silence_closed_stdout()
        return 1
