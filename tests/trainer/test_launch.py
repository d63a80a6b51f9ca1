"""trainer/launch.py without torchrun: the command it runs, the agent's ignored stop signals (a real child
process reads them back), the workers it finds in /proc, and a stop request forwarded to the workers as SIGTERM
until the agent ends (the agent stood in for by a clock-driven fake: no sleeps). The real 2-rank job stopped by
a signal is tests/e2e/test_distributed_run.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from trainer import launch


@pytest.fixture(autouse=True)
def _restore_stop_handlers() -> Iterator[None]:
    """launch.main installs its forwarding handler in the calling process: the test's own handlers come back."""
    saved = {sig: signal.getsignal(sig) for sig in launch.STOP_SIGNALS}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class FakeAgent:
    """A torchrun agent that exits with `code` at `exit_at` seconds of a virtual clock, and receives a stop signal
    (SIGTERM to this process, as `kill` of the job's process group does) at `signal_at`, during a wait."""

    def __init__(self, exit_at: float, code: int, signal_at: float | None) -> None:
        self.pid = 424242
        self.clock, self.exit_at, self.code, self.signal_at = 0.0, exit_at, code, signal_at
        self.timeouts: list[float | None] = []

    def wait(self, timeout: float | None = None) -> int:
        self.timeouts.append(timeout)
        end = self.exit_at if timeout is None else min(self.exit_at, self.clock + timeout)
        if self.signal_at is not None and self.clock <= self.signal_at < end:
            self.signal_at = None
            signal.raise_signal(signal.SIGTERM)  # the handler runs here, inside the blocking wait
        self.clock = end
        if end < self.exit_at:
            raise subprocess.TimeoutExpired("torchrun", timeout or 0.0)
        return self.code


def _launch_with(
    monkeypatch: pytest.MonkeyPatch, agent: FakeAgent, argv: list[str]
) -> tuple[int, list[tuple[list[str], Callable[[], None]]], list[tuple[int, int]]]:
    """Run launch.main(argv) with `agent` as the started process; (exit code, Popen calls, signals sent)."""
    started: list[tuple[list[str], Callable[[], None]]] = []
    sent: list[tuple[int, int]] = []

    def popen(cmd: list[str], preexec_fn: Callable[[], None]) -> FakeAgent:
        started.append((cmd, preexec_fn))
        return agent

    def kill(pid: int, sig: int) -> None:
        sent.append((pid, sig))

    # The launcher's own names only: this process's subprocess and os stay real.
    monkeypatch.setattr(launch, "subprocess", SimpleNamespace(Popen=popen, TimeoutExpired=subprocess.TimeoutExpired))
    monkeypatch.setattr(launch, "os", SimpleNamespace(kill=kill))
    monkeypatch.setattr(launch, "worker_pids", lambda agent_pid: [11, 12] if agent_pid == agent.pid else [])
    return launch.main(argv), started, sent


def test_help_exits_zero_and_no_arguments_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert launch.main(["--help"]) == 0
    assert launch.main([]) == 2
    out = capsys.readouterr().out
    assert out.count("python -m trainer.launch [torchrun options] train.py CONFIG") == 2


def test_the_agent_is_torchrun_with_every_option_and_its_stop_signals_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    argv = ["--standalone", "--nproc_per_node=2", "train.py", "configs/tiny.yaml", "--train.max_steps=3"]
    code, started, sent = _launch_with(monkeypatch, FakeAgent(exit_at=12.0, code=0, signal_at=None), argv)
    assert code == 0 and sent == []
    [(cmd, preexec_fn)] = started
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--signals-to-handle=SIGHUP,SIGQUIT", *argv]
    # The disposition set before exec is what the agent starts with: a real child process reads it back.
    show = "import signal; print([signal.getsignal(s) is signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGINT)])"
    child = subprocess.run([sys.executable, "-c", show], preexec_fn=preexec_fn, capture_output=True, text=True)
    assert child.stdout.strip() == "[True, True]", child.stderr


def test_a_failing_job_fails_the_launcher_and_no_worker_is_signalled(monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, sent = _launch_with(monkeypatch, FakeAgent(exit_at=30.0, code=1, signal_at=None), ["train.py", "c.yaml"])
    assert code == 1 and sent == []


def test_a_stop_request_reaches_every_worker_as_sigterm_and_is_sent_again_until_the_agent_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The request arrives while the launcher waits on the agent (where it spends its whole life); workers still
    starting up ignore it, so it is sent again every RESEND_SECONDS until the agent exits."""
    agent = FakeAgent(exit_at=12.0, code=0, signal_at=1.0)
    code, _, sent = _launch_with(monkeypatch, agent, ["train.py", "c.yaml"])
    assert code == 0 and agent.clock == 12.0
    assert set(sent) == {(11, signal.SIGTERM), (12, signal.SIGTERM)}
    rounds = len(sent) // 2
    assert rounds >= 1 + int((12.0 - 1.0) // launch.RESEND_SECONDS), agent.timeouts  # 1 s, then at least 2 resends


def test_the_workers_are_the_agents_children_read_from_proc() -> None:
    """A child in its own session (its process group is not ours): found as our child, and it has none itself."""
    reads = [sys.executable, "-c", "import sys; sys.stdin.read()"]
    child = subprocess.Popen(reads, stdin=subprocess.PIPE, start_new_session=True)
    try:
        assert child.pid in launch.worker_pids(os.getpid())
        assert launch.worker_pids(child.pid) == []
    finally:
        child.kill()
        child.wait()
