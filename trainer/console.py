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
    """Send every later write to the standard output to /dev/null; the standard error's too when it is the
    same pipe (`2>&1 | head`), where a message to it would meet the closed reader as well."""
    try:
        out_fd = sys.stdout.fileno()
        closed = os.fstat(out_fd)
        fds = [out_fd]
        err = os.fstat(sys.stderr.fileno())
        if (err.st_dev, err.st_ino) == (closed.st_dev, closed.st_ino):
            fds.append(sys.stderr.fileno())
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in fds:
            os.dup2(devnull, fd)
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
