"""trainer/console.py: a command whose output's reader exits (`| head`) ends without a traceback."""

import os
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
