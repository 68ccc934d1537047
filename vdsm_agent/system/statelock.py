"""One agent per state directory: an exclusive lock on ``STATE_DIR/agent.lock``.

Two agents on one state directory would both re-attach the running tasks,
both manage the connections and the second would replace the first one's
Unix socket. So the agent takes this lock before anything touches the state
(before the store opens, before the socket is replaced) and keeps it for the
life of its process; a second agent is told who holds it and exits.

``flock`` rather than a POSIX record lock (``lockf``): a record lock is lost
when the process closes *any* descriptor of the file, and a flock belongs to
the open file description, so nothing else in the process can drop it by
accident. The descriptor is close-on-exec: task processes and the zygote are
started by ``posix_spawn`` (an exec), so they never hold it, and an agent
restarted after ``kill -9`` gets the lock while its tasks run on.

The file holds the holder's PID (for people and for the message of a second
agent); the kernel's lock table (``/proc/locks``) is asked first, because the
file may still name the previous holder for a moment after a new one locked it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = "agent.lock"
PROC_LOCKS = "/proc/locks"
# A holder that has just locked the file writes its PID right after.
PID_WAIT = 1.0


class StateLockError(RuntimeError):
    """The state directory cannot be locked (an OS error); the message says why."""


class StateDirBusy(StateLockError):
    """Another process holds the state directory's lock."""

    def __init__(self, state_dir: Path, holder: int | None) -> None:
        who = f"pid {holder}" if holder is not None else "a process whose PID is unknown"
        super().__init__(f"the state directory {state_dir} is in use by another vdsm-agent "
                         f"({who}); stop it first or give this one another --state-dir")
        self.holder = holder


@dataclasses.dataclass
class StateLock:
    """The held lock; released when ``release`` closes it, or when the process ends."""

    path: Path
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def acquire(state_dir: Path) -> StateLock:
    """Lock ``state_dir`` (created if missing) for this process, or raise StateDirBusy."""
    path = state_dir / LOCK_NAME
    try:
        state_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o640)
    except OSError as exc:
        raise StateLockError(f"cannot lock the state directory: {path}: "
                             f"{exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateDirBusy(state_dir, holder_pid(path)) from None
    except OSError as exc:
        os.close(fd)
        raise StateLockError(f"cannot lock the state directory: {path}: "
                             f"{exc.strerror or exc}") from None
    _record_pid(fd)
    return StateLock(path, fd)


def _record_pid(fd: int) -> None:
    """Write our PID over the previous holder's, in place: on a full disk the
    file's first block is already there, and a truncation never needs space.
    If even that fails, the lock holds all the same (the PID is in /proc/locks)."""
    data = f"{os.getpid()}\n".encode()
    with contextlib.suppress(OSError):
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))


def holder_pid(path: Path) -> int | None:
    """Who holds the lock on ``path``: from the kernel's lock table, else the file."""
    deadline = time.monotonic() + PID_WAIT
    while True:
        pid = _pid_from_proc_locks(path)
        if pid is None:
            pid = _pid_from_file(path)
        if pid is not None or time.monotonic() >= deadline:
            return pid
        time.sleep(0.05)


def _pid_from_proc_locks(path: Path) -> int | None:
    """The PID of the FLOCK write lock on ``path`` in /proc/locks (lines like
    ``1: FLOCK  ADVISORY  WRITE 1234 fe:00:2171053 0 EOF``)."""
    try:
        info = os.stat(path)
        with open(PROC_LOCKS, encoding="ascii", errors="replace") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    for line in lines:
        fields = line.split()
        # A waiter's line starts "1: -> FLOCK ..."; the holder's has no arrow.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == wanted:
            with contextlib.suppress(ValueError):
                pid = int(fields[4])
                return pid if pid > 0 else None
    return None


def _pid_from_file(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    first = text.split("\n", 1)[0].strip()
    return int(first) if first.isdigit() and int(first) > 0 else None
