"""trainer/console.py: a command whose output's reader exits (`| head`) ends without a traceback."""

import os
import socket
import subprocess
import sys

from tests.helpers.runs import REPO

PROGRAM = """
import sys
from trainer.console import exit_quietly_on_closed_stdout

def main(argv):
    for i in range(int(argv[0])):  # more than a pipe's buffer (64 KiB): the writer meets the closed end
        print(f"line {i} " + "x" * 60)
    print("finished", file=sys.stderr)
    return 0

sys.exit(exit_quietly_on_closed_stdout(main, sys.argv[1:]))
"""


def start(lines: int) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", PROGRAM, str(lines)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_closed_reader_ends_the_command_with_code_1_and_no_traceback():
    proc = start(100_000)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    proc.stdout.close()  # what `| head -1` does
    err = proc.stderr.read()
    assert first.startswith("line 0 ") and proc.wait(timeout=60) == 1
    assert err == "", err  # no BrokenPipeError, not even at the interpreter's last flush


def test_short_output_and_an_early_reader_exit_is_quiet_too():
    """`| true`: the output fits the buffer and is written at the end, after the reader is gone (buffered stdout:
    without PYTHONUNBUFFERED, which this environment sets)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    read, write = os.pipe()
    os.close(read)  # the reader has exited before the first write
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, "3"], cwd=REPO, stdout=write, stderr=subprocess.PIPE, text=True, env=env
    )
    os.close(write)
    assert proc.returncode == 1 and proc.stderr == "finished\n", proc.stderr  # not 120 with "Exception ignored"


def test_a_reader_that_reads_everything_sees_no_change():
    out, err = start(3).communicate(timeout=60)
    assert out.count("line ") == 3 and err == "finished\n"


def quiet_env() -> dict[str, str]:
    """Buffered stdout (this environment sets PYTHONUNBUFFERED): the output is written at the end."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


def test_a_socket_as_stdout_whose_reader_went_away_is_quiet_too():
    """A socket (`ssh`, a supervisor's socket) breaks like a pipe: it is redirected as well."""
    ours, theirs = socket.socketpair()
    theirs.close()  # the reader is gone
    proc = subprocess.run(
        [sys.executable, "-c", PROGRAM, "3"],
        cwd=REPO,
        stdout=ours.fileno(),
        stderr=subprocess.PIPE,
        text=True,
        env=quiet_env(),
    )
    ours.close()
    assert proc.returncode == 1 and proc.stderr == "finished\n", proc.stderr


STDERR_AFTER = """
import sys
from trainer.console import silence_closed_stdout

try:
    for i in range(100_000):
        print("x" * 60)
except BrokenPipeError:
    silence_closed_stdout()
    print("a later message", file=sys.stderr, flush=True)  # 2>&1: the same closed pipe, now /dev/null
    sys.exit(7)
"""


def test_stderr_on_the_same_closed_pipe_is_silenced_too():
    """`2>&1 | head`: after silence_closed_stdout, a message to stderr does not raise (exit 7, not a traceback's 1)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", STDERR_AFTER], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    proc.stdout.close()
    assert first == "x" * 60 + "\n" and proc.wait(timeout=60) == 7


def test_print_to_stderr_with_its_reader_gone_does_not_raise_nor_change_the_exit_code():
    """train.py's `print_to_stderr(...); sys.exit(130)` after `2>&1 | tee log` lost its tee: the code stays 130 (here
    5), not 120 from the interpreter's last flush of the unwritten message (buffered stderr: no PYTHONUNBUFFERED)."""
    program = "\n".join(
        ["import sys", "from trainer.console import print_to_stderr", "print_to_stderr('lost')", "print('went on')"]
    )
    program += "\nsys.exit(5)"
    read, write = os.pipe()
    os.close(read)
    proc = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, stdout=subprocess.PIPE, stderr=write, text=True, env=quiet_env()
    )
    os.close(write)
    assert proc.returncode == 5 and proc.stdout == "went on\n"
