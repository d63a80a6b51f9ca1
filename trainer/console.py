"""The standard output after its reader went away (`python tools/study.py STUDY | head`).

Python raises BrokenPipeError at the first write after the reader exits, and again at the interpreter's last
flush. `silence_closed_stdout` points the descriptor at /dev/null (the recipe of Python's `signal` docs, which
advise against restoring SIGPIPE's default: it would kill the process mid-write), so a program can finish its
work quietly. `exit_quietly_on_closed_stdout` wraps a command-line `main` with it.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Callable


def _is_pipe(fd: int) -> bool:
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def silence_closed_stdout() -> None:
    """Send every later write to the standard output to /dev/null; the standard error's too when it is the
    same pipe (`2>&1 | head`), where a message to it would meet the closed reader as well. Only a pipe or a
    socket is redirected (only those break): a terminal or a test's capture file is left alone."""
    try:
        out_fd = sys.stdout.fileno()
        if out_fd != 1 or not _is_pipe(out_fd):
            return
        closed = os.fstat(out_fd)
        fds = [out_fd]
        err = os.fstat(2)
        if (err.st_dev, err.st_ino) == (closed.st_dev, closed.st_ino):
            fds.append(2)
        _to_devnull(fds)
    except (OSError, ValueError, AttributeError):  # a replaced sys.stdout without a descriptor (a test's capture)
        pass


def print_to_stderr(message: str) -> None:
    """Best effort: stderr's reader may be gone too (`ssh host train.py` after the client died, or the Ctrl-C that
    stopped the run also ended `2>&1 | tee log`)."""
    try:
        print(message, file=sys.stderr, flush=True)
    except OSError:
        # The unwritten message stays in stderr's buffer, and the interpreter's last flush would fail on it again
        # and turn the exit code into 120: later writes to the standard error go to /dev/null instead.
        with contextlib.suppress(OSError):
            _to_devnull([2])


def _to_devnull(fds: list[int]) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    for fd in fds:
        os.dup2(devnull, fd)
    os.close(devnull)


def exit_quietly_on_closed_stdout(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """main(argv)'s exit code, or 1 without a traceback when its output's reader went away (Python's docs)."""
    try:
        code = main(argv)
        sys.stdout.flush()  # here, not at exit: output that fit the buffer meets the closed reader now
        return code
    except BrokenPipeError:
        silence_closed_stdout()
        return 1
