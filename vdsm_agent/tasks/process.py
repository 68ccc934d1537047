"""Task processes: spawn detached, identify by (PID, start time), signal, reap.

The agent never waits on a task process with a blocking call: it opens a
pidfd (``os.pidfd_open``) and lets the event loop watch it; the pidfd becomes
readable when the process exits, whether or not it is our child (after an
agent restart it is not). Our own children are then reaped with
``waitid(P_PIDFD)``, which cannot hit a reused PID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import sys
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from vdsm_agent.tasks.files import TaskFiles
from vdsm_agent.tasks.zygote import ZYGOTE_MODULE

CHILD_MODULE = "vdsm_agent.tasks.child"
# psutil derives create_time from clock ticks since boot: it is stable for a
# process, so a small tolerance only absorbs float rounding.
CREATE_TIME_TOLERANCE = 0.05
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                  signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


@dataclasses.dataclass(frozen=True)
class Identity:
    pid: int
    create_time: float


def child_argv(task_files: TaskFiles) -> list[str]:
    return [sys.executable, "-m", CHILD_MODULE, "--task-dir", str(task_files.dir)]


def spawn(task_files: TaskFiles) -> tuple[Identity, int]:
    """Start the child in its own session; return its identity and a pidfd.

    Blocking (posix_spawn + /proc reads): call from a worker thread.
    stdin is /dev/null and stdout/stderr go to child.log (append), so the
    child never depends on a pipe to the agent.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(task_files.child_log),
         os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    pid = os.posix_spawn(sys.executable, child_argv(task_files), dict(os.environ),
                         file_actions=actions, setsid=True, setsigdef=_RESET_SIGNALS,
                         setsigmask=())
    pidfd = os.pidfd_open(pid)
    return Identity(pid, psutil.Process(pid).create_time()), pidfd


def attach(identity: Identity) -> int | None:
    """A pidfd for a recorded process if it is still that process and alive, else None."""
    try:
        pidfd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        return None
    # Opened first, checked second: if the check passes, the process existed
    # before the pidfd was opened, so the pidfd refers to it (not a reuse).
    if matches(identity):
        return pidfd
    os.close(pidfd)
    return None


def matches(identity: Identity) -> bool:
    """The PID is alive (not a zombie) and started when recorded."""
    try:
        proc = psutil.Process(identity.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return bool(abs(proc.create_time() - identity.create_time) < CREATE_TIME_TOLERANCE)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def exited(pidfd: int) -> bool:
    """Whether the process behind a pidfd has exited (non-blocking)."""
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)


def signal_group(pid: int, pidfd: int, signum: int) -> bool:
    """Signal the task's whole process group (its PGID is its PID: it is a session leader).

    Only while the leader has not exited: then its PID, hence the group ID,
    cannot have been reused. Returns whether a signal was sent.
    """
    if exited(pidfd):
        return False
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        return False
    return True


def kill_stragglers(pid: int) -> None:
    """SIGKILL what is left of an exited task's group (helpers it forked).

    Call only while the leader is an unreaped zombie of ours, so the group ID
    cannot belong to anyone else.
    """
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def reap(pidfd: int) -> int | None:
    """Reap our exited child; its wait status, or None if it is not our child."""
    try:
        result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
    except ChildProcessError:
        return None
    if result is None:
        return None
    return result.si_status if result.si_code == os.CLD_EXITED else -result.si_status


def describe_exit(status: int | None) -> str:
    if status is None:
        return "exit status unknown (not a child of this agent)"
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit code {status}"


def find_by_task_dir(task_dir: Path) -> Identity | None:
    """A live task process for this task dir: a spawned one by its command line,
    one forked by the zygote (whose command line it shares) by its working
    directory, which it sets to the task dir first thing.

    Used at start-up for a task whose PID was never recorded (the agent died
    between starting it and storing the PID, before the child wrote its status).
    """
    wanted = str(task_dir)
    for proc in psutil.process_iter(["pid", "cmdline", "create_time", "status"]):
        info = proc.info
        cmdline = info.get("cmdline") or []
        if info.get("status") == psutil.STATUS_ZOMBIE:
            continue
        if (CHILD_MODULE in cmdline and wanted in cmdline) or (
                ZYGOTE_MODULE in cmdline and _cwd(proc) == wanted):
            return Identity(int(info["pid"]), float(info["create_time"]))
    return None


def _cwd(proc: psutil.Process) -> str | None:
    try:
        return str(proc.cwd())
    except (psutil.Error, OSError):
        return None
