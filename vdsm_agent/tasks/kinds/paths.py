"""Where a task may read or write: image files under allowed roots, block devices under /dev.

Paths are resolved (symlinks and ``..``) before any check, so a link inside
an allowed root cannot lead outside it. The child repeats the check on the
file descriptor it opened (``check_open_fd``), which closes the gap between
the agent's check and the child's open.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from typing import Literal

from vdsm_agent import errors

DEV = "/dev/"


@dataclasses.dataclass(frozen=True)
class Target:
    kind: Literal["file", "device"]
    path: str  # fully resolved

    @property
    def resource(self) -> str:
        return f"{self.kind}:{self.path}"


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def resolve(path: str, allowed_roots: tuple[str, ...], field: str) -> Target:
    """The resolved, confined target of a caller's path; raise ``errors.*``."""
    if "\0" in path or not path.startswith("/"):
        raise errors.InvalidParams("must be an absolute path", field=field, rule="path")
    real = os.path.realpath(path)
    if _within(real, DEV.rstrip("/")):
        return _device(path, real, field)
    roots = tuple(os.path.realpath(root) for root in allowed_roots)
    if not any(_within(real, root) for root in roots):
        raise errors.PathNotAllowed(
            f"{path} is not under an allowed root (configured: {', '.join(roots) or 'none'})",
            field=field, path=path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise errors.InvalidParams(f"{path} does not exist", field=field,
                                   rule="exists") from None
    if not stat.S_ISREG(mode):
        raise errors.InvalidParams(f"{path} is not a regular file", field=field,
                                   rule="regularFile")
    return Target("file", real)


def _device(path: str, real: str, field: str) -> Target:
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise errors.DeviceNotFound(f"{path} does not exist", field=field, path=path) from None
    if not stat.S_ISBLK(mode):
        raise errors.PathNotAllowed(f"{path} is under /dev but is not a block device",
                                    field=field, path=path)
    return Target("device", real)


def size_of(target: Target) -> int:
    """Bytes in a file or a block device; InvalidParams (rule "open") when it cannot be
    opened (EACCES, EPERM from a device cgroup, gone meanwhile, ...)."""
    try:
        fd = os.open(target.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise errors.InvalidParams(f"cannot open {target.path}: {exc.strerror or exc}",
                                   rule="open", path=target.path) from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def open_checked(target: Target, flags: int = os.O_RDONLY) -> int:
    """Open the target and prove the descriptor is the confined file it names."""
    fd = os.open(target.path, flags | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        opened = os.readlink(f"/proc/self/fd/{fd}")
        mode = os.fstat(fd).st_mode
        wanted = stat.S_ISBLK(mode) if target.kind == "device" else stat.S_ISREG(mode)
        if opened != target.path or not wanted:
            raise errors.PathNotAllowed(
                f"{target.path} changed since the task was accepted (now {opened})",
                path=target.path)
    except BaseException:
        os.close(fd)
        raise
    return fd
