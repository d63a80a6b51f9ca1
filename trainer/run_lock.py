"""The run directory's lock, and the rules every writer into a run directory follows.

One trainer at a time: `lock_run_dir(run_dir)` takes an exclusive OS lock (`fcntl.flock`, LOCK_EX |
LOCK_NB) on `<run_dir>/.lock`; a second trainer on the same directory gets `RunDirLocked` at once,
naming the holder (pid, host, start time, command: informational content of the lock file,
overwritten by each new holder). The OS drops the lock when the holding process exits in any way,
kill -9 included, so a lock left by a dead process is no obstacle: the next trainer simply takes
it (processes forked by the holder, e.g. data loader workers, close their copy of the lock at once,
so they do not keep it after the holder dies). The lock file itself is never deleted (deleting it
would let two processes lock two different files of one name). Under torchrun only rank 0 takes
the lock; the other ranks write nothing into the run directory.

NFS and other shared filesystems: on Linux, flock on NFS is emulated with a POSIX byte-range lock
that the server arbitrates, so it also excludes trainers on other machines (the error then names
the other host). It does not where the mount uses `local_lock=flock` / `local_lock=all` or `nolock`
(the lock is then local to one machine), and some filesystems (Lustre mounted without `-o flock`,
some FUSE filesystems) do not support flock at all: there the run goes on unlocked, with a warning.
A lock held by a machine that crashed is released only when the NFS server expires its lease (up
to about 90 s with NFSv4).

Temporary files: every writer writes `<final name>.<pid>.<8 hex digits>.tmp` (data/files.py's
`unique_temp_path`, also used by the checkpoints), fsyncs it and renames it over the final name,
so two writers never share a temporary file. Files
left by a writer that died (kill -9, power loss) are removed by `remove_stale_temp_files`, which
the lock holder calls once it holds the lock, so an orphaned temporary file never keeps a disk
full across re-runs.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import sys
import time
import weakref
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from data.files import write_bytes_atomic

LOCK_NAME = ".lock"
# data.files.unique_temp_path's <final>.<pid>.<8 hex>.tmp; and the fixed names of earlier versions.
_TEMP = re.compile(r"^.+\.\d+\.[0-9a-f]{8}\.tmp$")
_LEGACY_TEMP = re.compile(r"^(step_\d{8}\.pt|metrics\.jsonl|config\.yaml)\.tmp$")
# flock unsupported by the filesystem (e.g. Lustre without -o flock, some FUSE filesystems).
_NO_LOCKING = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class RunDirError(RuntimeError):
    """A run directory that cannot be used as it is: in use by another trainer, full, not writable,
    or holding a damaged metrics.jsonl. The message names the path and the fix."""


class RunDirLocked(RunDirError):
    """Another trainer (or this process) holds the run directory's lock."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_space(directory: Path) -> int | None:
    """Bytes available in `directory`'s filesystem, or None if it cannot be asked."""
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def os_error_fix(e: OSError, directory: Path) -> str:
    """What to do about an OSError while writing into `directory` (one sentence)."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_space(directory)
        where = f" ({format_bytes(free)} free now)" if free is not None else ""
        return (
            f"Free space on the filesystem of {directory}{where} and re-run the same command to resume, "
            f"or train in another --run.dir"
        )
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"Make {directory} writable by this user and re-run the same command, or train in another --run.dir"
    return f"Fix {directory} (see the error) and re-run the same command, or train in another --run.dir"


def is_temp_file(name: str) -> bool:
    return bool(_TEMP.match(name) or _LEGACY_TEMP.match(name))


def remove_stale_temp_files(*directories: Path) -> list[Path]:
    """Delete the temporary files (see `unique_temp_path`, plus the fixed `.tmp` names of earlier
    versions) that dead writers left in `directories` (not recursive); returns what was removed.

    Only safe while holding the run directory's lock, before anything writes into it: a temporary
    file in the locked run directory can then only belong to a writer that is gone."""
    removed = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in sorted(directory.iterdir()):
            if is_temp_file(path.name) and not path.is_symlink() and (path.is_file() or path.is_dir()):
                try:
                    if path.is_dir():  # a sharded checkpoint whose commit never came (trainer/dist_checkpoint.py)
                        shutil.rmtree(path)
                    else:
                        path.unlink()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise RunDirError(
                        f"cannot remove {path}, a temporary file left by an interrupted write: {e.strerror or e}. "
                        f"Delete it by hand and re-run."
                    ) from None
                removed.append(path)
    return removed


def write_file_atomic(path: Path, data: bytes) -> None:
    """Replace `path` by `data` atomically (data.files.write_bytes_atomic with a unique temporary
    file, fsynced). An OSError (disk full, not writable) is a RunDirError; the temporary file is
    removed and `path` is unchanged."""
    try:
        write_bytes_atomic(path, data, unique_tmp=True)
    except OSError as e:
        raise RunDirError(
            f"cannot write {path} ({format_bytes(len(data))}): {e.strerror or e}. It is unchanged. "
            f"{os_error_fix(e, path.parent)}."
        ) from None


def _print_warning(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


_HELD: weakref.WeakSet[RunLock] = weakref.WeakSet()


def _close_in_forked_child() -> None:
    for lock in list(_HELD):
        lock.release()  # in a child: closes its copy of the descriptor, the parent keeps the lock


os.register_at_fork(after_in_child=_close_in_forked_child)


class RunLock:
    """The held lock of one run directory (see the module docstring). `release()` (or leaving a
    `with` block) releases it; it is idempotent. `locked` is False where the filesystem does not
    support locking and the run goes on unlocked."""

    def __init__(self, run_dir: Path, path: Path, fd: int | None):
        self.run_dir, self.path, self._fd = run_dir, path, fd
        self._owner_pid = os.getpid()
        if fd is not None:
            _HELD.add(self)

    @property
    def locked(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # A forked child (e.g. a data loader worker) shares the lock with its parent: only the process
        # that took it unlocks; a child only closes its copy of the descriptor.
        if os.getpid() == self._owner_pid:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            except OSError:
                pass  # closing the last descriptor below releases it anyway
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # at interpreter shutdown; the OS releases the lock at exit anyway
            pass

    def __repr__(self) -> str:
        return f"RunLock({str(self.run_dir)!r}, locked={self.locked})"


def _holder_info() -> bytes:
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv)[:500],
    }
    return (json.dumps(info) + "\n").encode()


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder's informational record; it writes it right after locking, so wait a moment for it."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0))
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.025)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _locked_message(run_dir: Path, lock_path: Path, holder: dict[str, Any] | None) -> str:
    fix = "Wait for that run to finish (or stop it), or train in another directory with --run.dir."
    if holder is None:
        return (
            f"{run_dir} is in use by another trainer: an unknown process holds its lock {lock_path} (it wrote "
            f"no pid into it). {fix}"
        )
    pid, host = holder.get("pid"), holder.get("host", "?")
    this_host = host == socket.gethostname()
    if this_host and pid == os.getpid():
        return (
            f"{run_dir} is already locked by this process (pid {pid} on host {host}): a second trainer on the "
            f"same run directory in one process. Release the first one's lock, or use another --run.dir."
        )
    since = f", started {holder['started']}" if holder.get("started") else ""
    command = f": {holder['command']}" if holder.get("command") else ""
    where = ""
    if not this_host:
        where = " (another machine: the run directory is on a shared filesystem)"
    elif isinstance(pid, int) and not _pid_alive(pid):
        where = " (not a running process here: it runs in another container, or a process it started holds the lock)"
    return (
        f"{run_dir} is in use by another trainer: pid {pid} on host {host}{where}{since}{command} holds its lock "
        f"{lock_path}. {fix}"
    )


def _file_in_the_way(run_dir: Path) -> Path | None:
    """The run directory or the parent of it that exists as something else than a directory, if any."""
    for path in (run_dir, *run_dir.parents):
        with contextlib.suppress(OSError):  # e.g. an unsearchable parent: the caller reports mkdir's error
            if path.exists() and not path.is_dir():
                return path
    return None


def lock_run_dir(run_dir: Path, *, warn: Callable[[str], None] | None = None) -> RunLock:
    """Lock `run_dir` (created if needed) for this process; a RunDirLocked naming the holder if
    another process (or this one, through another RunLock) holds it. Use as a context manager or
    call `release()`; the OS releases it when the process exits in any way. Under torchrun only
    rank 0 calls this. Where the filesystem does not support locking, `warn` (default: print to
    stderr) gets a warning and the returned lock has `locked == False`."""
    lock_path = run_dir / LOCK_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        file = _file_in_the_way(run_dir)  # mkdir's "File exists" / "Not a directory" do not say which path
        if file is not None:
            raise RunDirError(
                f"the run directory {run_dir} cannot be created: {file} is a file. Pass another --run.dir "
                f"(e.g. runs/<name>)"
            ) from None
        raise RunDirError(
            f"cannot create the run directory's lock file {lock_path}: {e.strerror or e}. {os_error_fix(e, run_dir)}."
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_holder(fd)
        os.close(fd)
        raise RunDirLocked(_locked_message(run_dir, lock_path, holder)) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKING:
            raise RunDirError(f"cannot lock {lock_path}: {e.strerror or e}. {os_error_fix(e, run_dir)}.") from None
        (warn or _print_warning)(
            f"warning: the filesystem of {run_dir} does not support file locks ({e.strerror or e}); training "
            f"unlocked: make sure no other trainer uses this run directory"
        )
        return RunLock(run_dir, lock_path, None)
    try:  # informational only: a full disk must not stop the run from taking its lock
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_info(), 0)
    except OSError:
        pass
    return RunLock(run_dir, lock_path, fd)
