"""The run directory's lock (real processes: a holder, a refused second trainer, kill -9 recovery),
unique temporary names, the cleanup of temporary files left by dead writers, atomic writes."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from data.files import unique_temp_path
from tests.helpers.disk import fill, small_tmpfs
from trainer import run_lock
from trainer.run_lock import RunDirError, RunDirLocked, lock_run_dir, remove_stale_temp_files

REPO = Path(__file__).resolve().parents[2]

HOLDER = """
import sys, time
from pathlib import Path
from trainer.run_lock import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_process_is_refused_until_the_holder_dies(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked) as refused:
            lock_run_dir(run_dir)
        message = str(refused.value)
        assert f"{run_dir} is in use by another trainer: pid {holder.pid} on host {socket.gethostname()}" in message
        assert "Wait for that run to finish (or stop it), or train in another directory with --run.dir" in message
        assert isinstance(refused.value, RunDirError)  # what train.py prints as `error:`
        holder.kill()  # SIGKILL: no clean-up runs; the OS drops the lock with the process
        holder.wait(timeout=10)
        with lock_run_dir(run_dir) as lock:
            assert lock.locked
            info = json.loads((run_dir / ".lock").read_text())
            assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()


FORKING_HOLDER = """
import os, sys, time
from pathlib import Path
from trainer.run_lock import lock_run_dir
lock = lock_run_dir(Path(sys.argv[1]))
worker = os.fork()  # like a data loader worker: outlives a holder killed with -9 for a while
if worker == 0:
    # The child reports itself: fork() returns here only after the after-fork hooks ran (which
    # close the child's copy of the lock), so the test cannot race them.
    print(os.getpid(), flush=True)
    time.sleep(120)
    os._exit(0)
time.sleep(120)
"""


def test_a_process_forked_by_the_holder_does_not_keep_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", FORKING_HOLDER, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    worker = None
    try:
        assert holder.stdout is not None
        worker = int(holder.stdout.readline())
        with pytest.raises(RunDirLocked, match=f"pid {holder.pid} on host"):
            lock_run_dir(run_dir)
        holder.kill()
        holder.wait(timeout=10)
        os.kill(worker, 0)  # still running
        lock_run_dir(run_dir).release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_a_second_lock_in_the_same_process_is_refused(tmp_path):
    run_dir = tmp_path / "new" / "run"
    lock = lock_run_dir(run_dir)  # creates the directory
    assert lock.locked and (run_dir / ".lock").is_file()
    with pytest.raises(RunDirLocked, match=rf"already locked by this process \(pid {os.getpid()} on host "):
        lock_run_dir(run_dir)
    lock.release()
    lock.release()  # idempotent
    with lock_run_dir(run_dir):
        pass
    lock_run_dir(run_dir).release()  # the `with` released it


@pytest.mark.parametrize("content", ["", '{"host": "elsewhere"}\n'])  # nothing yet; a record without a pid
def test_a_holder_that_wrote_nothing_yet_is_named_unknown(tmp_path, monkeypatch, content):
    monkeypatch.setattr(run_lock.time, "sleep", lambda s: None)
    (tmp_path / ".lock").write_text(content)
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirLocked, match="an unknown process holds its lock"):
            lock_run_dir(tmp_path)
    finally:
        os.close(fd)


HOLDER_PID = 4242
KILL_ERRORS: dict[str, type[OSError] | None] = {
    "alive": None,
    "gone": ProcessLookupError,
    "not permitted": PermissionError,  # a process of another user: alive
}


@pytest.mark.parametrize(
    ("host", "kill", "where"),
    [
        ("this", "alive", ""),
        ("other-machine", "alive", " (another machine: the run directory is on a shared filesystem)"),
        (
            "this",
            "gone",
            " (not a running process here: it runs in another container, or a process it started holds the lock)",
        ),
        ("this", "not permitted", ""),
    ],
)
def test_the_refusal_names_the_holder_and_where_it_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: str, kill: str, where: str
) -> None:
    host = socket.gethostname() if host == "this" else host
    record = {"pid": HOLDER_PID, "host": host, "started": "2026-01-02T03:04:05+00:00", "command": "train.py c.yaml"}
    (tmp_path / ".lock").write_text(json.dumps(record) + "\n")
    real_kill = os.kill

    def fake_kill(pid: int, sig: int) -> None:
        error = KILL_ERRORS[kill]
        if pid != HOLDER_PID:
            real_kill(pid, sig)
        elif error is not None:
            raise error(errno.ESRCH if error is ProcessLookupError else errno.EPERM, "fake")

    monkeypatch.setattr(run_lock.os, "kill", fake_kill)
    fd = os.open(tmp_path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(RunDirLocked) as refused:
            lock_run_dir(tmp_path)
    finally:
        os.close(fd)
    assert str(refused.value) == (
        f"{tmp_path} is in use by another trainer: pid {HOLDER_PID} on host {host}{where}, started "
        f"2026-01-02T03:04:05+00:00: train.py c.yaml holds its lock {tmp_path / '.lock'}. Wait for that run to "
        "finish (or stop it), or train in another directory with --run.dir."
    )


def test_the_lock_file_holds_only_the_new_holders_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py", "configs/tiny.yaml"])
    previous = {"pid": 1, "host": "old", "started": "2020-01-01T00:00:00+00:00", "command": "train.py " + "-x " * 200}
    (tmp_path / ".lock").write_text(json.dumps(previous) + "\n")  # longer than the new record
    with lock_run_dir(tmp_path):
        info = json.loads((tmp_path / ".lock").read_text())
    assert sorted(info) == ["command", "host", "pid", "started"]
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["command"] == "train.py configs/tiny.yaml"
    assert datetime.fromisoformat(info["started"]).tzinfo is not None


def test_a_lock_error_other_than_no_support_is_an_error_not_an_unlocked_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(fd: int, op: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(run_lock.fcntl, "flock", broken)
    warnings: list[str] = []
    with pytest.raises(RunDirError) as failed:
        lock_run_dir(tmp_path, warn=warnings.append)
    assert str(failed.value) == (
        f"cannot lock {tmp_path / '.lock'}: Input/output error. Fix {tmp_path} (see the error) and re-run the same "
        "command, or train in another --run.dir."
    )
    assert warnings == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM, errno.EROFS])
def test_a_directory_that_cannot_be_written_gets_the_permission_fix(tmp_path: Path, code: int) -> None:
    assert run_lock.os_error_fix(OSError(code, os.strerror(code)), tmp_path) == (
        f"Make {tmp_path} writable by this user and re-run the same command, or train in another --run.dir"
    )


def test_a_filesystem_without_locks_trains_unlocked_with_a_warning(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(run_lock.fcntl, "flock", no_locks)
    warnings: list[str] = []
    lock = lock_run_dir(tmp_path, warn=warnings.append)
    assert not lock.locked
    assert warnings and "does not support file locks" in warnings[0] and str(tmp_path) in warnings[0]


def test_temporary_names_are_unique_per_writer(tmp_path):
    final = tmp_path / "step_00000100.pt"
    a, b = unique_temp_path(final), unique_temp_path(final)
    assert a != b and a.parent == tmp_path
    assert a.name.startswith(f"step_00000100.pt.{os.getpid()}.") and a.name.endswith(".tmp")
    assert run_lock.is_temp_file(a.name) and not run_lock.is_temp_file(final.name)


def test_stale_temporary_files_are_removed_and_nothing_else(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    stale = [
        checkpoints / "step_00000002.pt.4242.0123abcd.tmp",  # this version's name, writer killed
        checkpoints / "step_00000003.pt.tmp",  # the fixed name earlier versions used
        tmp_path / "metrics.jsonl.tmp",
        tmp_path / "metrics.jsonl.777.deadbeef.tmp",
    ]
    kept = [checkpoints / "step_00000001.pt", tmp_path / "metrics.jsonl", tmp_path / "notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x" * 10)
    assert sorted(remove_stale_temp_files(tmp_path, checkpoints, tmp_path / "absent")) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in kept)
    assert remove_stale_temp_files(tmp_path, checkpoints) == []


def test_a_symlink_with_a_temporary_name_is_left_alone(tmp_path: Path) -> None:
    run_dir, elsewhere, notes = tmp_path / "run", tmp_path / "elsewhere", tmp_path / "notes.txt"
    run_dir.mkdir()
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("keep")
    notes.write_text("notes")
    to_dir, to_file = run_dir / "step_00000002.pt.4242.0123abcd.tmp", run_dir / "metrics.jsonl.tmp"
    to_dir.symlink_to(elsewhere)
    to_file.symlink_to(notes)
    assert remove_stale_temp_files(run_dir) == []
    assert to_dir.is_symlink() and to_file.is_symlink()
    assert (elsewhere / "keep").read_text() == "keep" and notes.read_text() == "notes"


def test_an_atomic_write_leaves_another_writers_temporary_file_alone(tmp_path: Path) -> None:
    target, other = tmp_path / "config.yaml", tmp_path / "config.yaml.tmp"  # the fixed name of earlier versions
    other.write_bytes(b"half of another writer's file")
    run_lock.write_file_atomic(target, b"new\n")
    assert target.read_bytes() == b"new\n" and other.read_bytes() == b"half of another writer's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "config.yaml.tmp"]


def test_an_atomic_write_on_a_full_disk_leaves_the_file_and_no_temporary(tmp_path):
    with small_tmpfs(tmp_path / "disk", "1m") as disk:
        target = disk / "config.yaml"
        target.write_text("old\n")
        filler = disk / "filler"
        fill(filler)
        with pytest.raises(RunDirError, match=rf"cannot write {target} .*No space left on device\. It is unchanged"):
            run_lock.write_file_atomic(target, b"new\n" * 100_000)
        assert sorted(p.name for p in disk.iterdir()) == ["config.yaml", "filler"]
        assert target.read_text() == "old\n"
        filler.unlink()
        run_lock.write_file_atomic(target, b"new\n")
        assert target.read_text() == "new\n"


@pytest.mark.parametrize("where", ["run_dir", "parent"])
def test_a_run_dir_that_is_a_file_names_the_file(tmp_path, where):
    file = tmp_path / "notes.md"
    file.write_text("keep me")
    run_dir = file if where == "run_dir" else file / "run"
    with pytest.raises(RunDirError, match=rf"cannot be created: {file} is a file\. Pass another --run\.dir"):
        lock_run_dir(run_dir)
    assert file.read_text() == "keep me"
