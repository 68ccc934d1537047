"""CPU and I/O priority of a task's work (settings ``task_nice``, ``task_ionice_class``).

Applied once by the task's child process to itself (``os.nice`` and the
``ioprio_set`` system call through ctypes) before the kind's work starts.
Both are inherited across fork and exec, so the tools a kind runs (mkfs,
e2fsck, qemu-img) run at the same priority without an ``ionice``/``nice``
wrapper on their command line, and the agent itself is never niced.

The I/O class only has an effect with an I/O scheduler that honours it
(bfq; not ``none`` or ``mq-deadline``); the CPU niceness always does.
"""

from __future__ import annotations

import ctypes
import os

# As vdsm_agent.settings.IONICE_CLASSES (a test keeps them equal; the task
# process does not import the settings module).
IONICE_CLASSES = ("idle", "best-effort", "none")

# ioprio_set(2) numbers per architecture (no libc wrapper exists).
_IOPRIO_SET = {"x86_64": 251, "i386": 289, "i686": 289, "aarch64": 30, "armv7l": 314,
               "ppc64le": 273, "ppc64": 273, "s390x": 282, "riscv64": 30}
_IOPRIO_WHO_PROCESS = 1
_IOPRIO_CLASS_SHIFT = 13
_CLASS_NUMBER = {"best-effort": 2, "idle": 3}
_BEST_EFFORT_LOWEST = 7  # levels 0 (highest) .. 7 (lowest)


def ioprio_value(ionice_class: str) -> int:
    level = _BEST_EFFORT_LOWEST if ionice_class == "best-effort" else 0
    return (_CLASS_NUMBER[ionice_class] << _IOPRIO_CLASS_SHIFT) | level


def set_ioprio(ionice_class: str) -> None:
    """Set this process's I/O scheduling class (OSError when the kernel refuses)."""
    number = _IOPRIO_SET.get(os.uname().machine)
    if number is None:
        raise OSError(f"ioprio_set: unknown system call number on {os.uname().machine}")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(number, _IOPRIO_WHO_PROCESS, 0, ioprio_value(ionice_class)) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"ioprio_set: {os.strerror(code)}")


def apply(nice: int, ionice_class: str) -> tuple[str, list[str]]:
    """Lower this process's priority; a description and any problems (never raises)."""
    problems: list[str] = []
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:
            problems.append(f"cannot renice by {nice}: {exc}")
    if ionice_class != "none":
        try:
            set_ioprio(ionice_class)
        except (OSError, KeyError) as exc:
            problems.append(f"cannot set I/O class {ionice_class}: {exc}")
    return f"nice {os.getpriority(os.PRIO_PROCESS, 0)}, I/O class {ionice_class}", problems


def current_ioprio(pid: int = 0) -> int:
    """ioprio_get(2) of ``pid`` (0: this process), for tests and diagnostics."""
    numbers = {"x86_64": 252, "i386": 290, "i686": 290, "aarch64": 31, "armv7l": 315,
               "ppc64le": 274, "ppc64": 274, "s390x": 283, "riscv64": 31}
    libc = ctypes.CDLL(None, use_errno=True)
    value = int(libc.syscall(numbers[os.uname().machine], _IOPRIO_WHO_PROCESS, pid))
    if value < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return value
