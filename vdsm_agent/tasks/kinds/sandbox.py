"""A Landlock sandbox for a tool that must open nothing but the task's descriptors.

A tool given ``/dev/fd/N`` opens the inode the task resolved; but a tool may
still open names it finds *in the data*: qemu-img opens the external data
file a qcow2 header names, and the owner of an image can write that header
between the task's check and qemu-img's start. So the tool runs under a
Landlock ruleset (Linux 5.13+, ``landlock_create_ruleset(2)``) that lets it
open, besides what any program needs to start (``/usr``, ``/lib*``,
``/etc/ld.so.cache``: read and execute; ``/dev/null``; ``/sys``: read), only
the inodes of the task's descriptors, each with the rights it needs (the
source: read; the destination: read, write, truncate). Anything else is
``EACCES``, whatever its name, since Landlock checks the file opened, not
the path typed (``/dev/fd/N`` is allowed because its target is).

The ruleset is built in the task's process from the descriptors it holds;
the tool's process enters it between fork and exec (``preexec_fn``: the task
process runs the tool from its only thread) after ``PR_SET_NO_NEW_PRIVS``.
Rights the kernel does not know (an older ABI) are not asked for; ioctls on
devices and the network are not restricted. Where Landlock is missing
(``ENOSYS``, ``EOPNOTSUPP``: not built or not enabled), ``build`` returns
None and the tool runs without it: the kinds' own checks still hold, only
the race they cannot close stays open (the task output says so).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
from collections.abc import Callable, Iterable, Mapping

# System calls (one number on every architecture) and flags, linux/landlock.h.
SYS_CREATE_RULESET = 444
SYS_ADD_RULE = 445
SYS_RESTRICT_SELF = 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
PR_SET_NO_NEW_PRIVS = 38

EXECUTE = 1 << 0
WRITE_FILE = 1 << 1
READ_FILE = 1 << 2
READ_DIR = 1 << 3
TRUNCATE = 1 << 14  # ABI 3
# Rights on files (a rule on a file, not a directory, may grant only these).
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE
# Every filesystem right of each ABI: 1 has bits 0-12, 2 adds REFER (13), 3 adds
# TRUNCATE (14). IOCTL_DEV (ABI 5) is left unhandled: ioctls stay allowed.
HANDLED = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1}

READ = READ_FILE
WRITE = READ_FILE | WRITE_FILE | TRUNCATE
# What a program needs to start and run (dynamic loader, libraries, modules).
SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc/ld.so.cache")
SYSTEM_OTHER = {"/dev/null": READ_FILE | WRITE_FILE, "/sys": READ_FILE | READ_DIR}


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1  # __attribute__((packed)) in linux/landlock.h
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_prctl = _libc.prctl


def abi_version() -> int:
    """The kernel's Landlock ABI (0: none)."""
    version = _syscall(SYS_CREATE_RULESET, None, ctypes.c_size_t(0),
                       ctypes.c_uint32(CREATE_RULESET_VERSION))
    return int(version) if version > 0 else 0


def _check(result: int, what: str) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"landlock {what}: {os.strerror(code)}")
    return result


@dataclasses.dataclass
class Sandbox:
    """A ruleset ready to be entered by a tool's process (close it afterwards)."""

    ruleset_fd: int
    abi: int

    def enter(self) -> None:
        """In the tool's process, between fork and exec."""
        _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        _check(_syscall(SYS_RESTRICT_SELF, ctypes.c_int(self.ruleset_fd), ctypes.c_uint32(0)),
               "restrict_self")

    @property
    def preexec(self) -> Callable[[], None]:
        return self.enter

    def close(self) -> None:
        if self.ruleset_fd >= 0:
            os.close(self.ruleset_fd)
            self.ruleset_fd = -1


def _add(ruleset: int, fd: int, access: int) -> None:
    rule = _PathBeneathAttr(access, fd)
    _check(_syscall(SYS_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(RULE_PATH_BENEATH),
                    ctypes.byref(rule), ctypes.c_uint32(0)), "add_rule")


def _system_rules() -> Iterable[tuple[str, int]]:
    for path in SYSTEM_READ:
        yield path, READ_FILE | EXECUTE | (0 if path.startswith("/etc/") else READ_DIR)
    yield from SYSTEM_OTHER.items()


def build(descriptors: Mapping[int, int]) -> Sandbox | None:
    """A ruleset allowing the system's programs and ``descriptors`` (fd -> rights,
    ``READ`` or ``WRITE``); None where the kernel has no Landlock."""
    abi = abi_version()
    if abi <= 0:
        return None
    handled = HANDLED[min(abi, 3)]
    try:
        ruleset = _check(_syscall(SYS_CREATE_RULESET, ctypes.byref(_RulesetAttr(handled)),
                                  ctypes.c_size_t(ctypes.sizeof(_RulesetAttr)),
                                  ctypes.c_uint32(0)), "create_ruleset")
    except OSError as exc:
        if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP):
            return None
        raise
    sandbox = Sandbox(ruleset, abi)
    try:
        for path, access in _system_rules():
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                is_dir = os.path.isdir(f"/proc/self/fd/{fd}")
                _add(ruleset, fd, (access if is_dir else access & FILE_RIGHTS) & handled)
            finally:
                os.close(fd)
        for fd, access in descriptors.items():
            _add(ruleset, fd, access & FILE_RIGHTS & handled)
    except BaseException:
        sandbox.close()
        raise
    return sandbox
