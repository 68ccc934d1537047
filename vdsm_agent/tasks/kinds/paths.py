"""Where a task may read or write: image files beneath allowed roots, block devices under /dev.

A caller's path is resolved **once**, to an ``O_PATH`` descriptor
(``vdsm_agent.system.confine``): no symlink is followed, no ``..`` taken, no
mount crossed, no hard-linked file accepted. Everything after that goes
through the descriptor: data is read or written through a re-open of it
(``open_data``: ``/proc/self/fd/N`` names that inode and nothing else), sizes
and identities come from ``fstat`` of it, and tools get ``/dev/fd/N``
(``Target.fd_path``, passed with ``pass_fds``), never the name.

At submit the agent resolves, checks and closes; the task's process resolves
again in ``pre()`` and keeps the descriptor for the whole work.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from vdsm_agent import errors
from vdsm_agent.system import confine

Target = confine.Resolved


def resolve(path: str, roots: Iterable[str], field: str) -> Target:
    """A block device under /dev, or a regular file (one link) beneath a root."""
    return confine.resolve(path, roots, field)


def resolve_device(path: str, field: str) -> Target:
    """A block device under /dev (its /dev symlinks, which are root's, resolved first)."""
    return confine.resolve_device(path, field)


def resource(target: Target) -> str:
    """The name a task locks for its target: ``file:`` or ``device:`` and the path
    (beneath the root's resolved name: one name per file, whatever the spelling)."""
    return f"{'device' if target.kind == 'device' else 'file'}:{target.path}"


def open_data(target: Target, flags: int = os.O_RDONLY, field: str | None = None) -> int:
    """A descriptor for reading or writing the target's inode (a re-open of its
    ``O_PATH`` descriptor); InvalidParams (rule "open") when the kernel refuses
    (a device gone meanwhile, no medium, EPERM from a device cgroup, ...)."""
    try:
        return target.reopen(flags)
    except OSError as exc:
        data = {"field": field} if field else {}
        raise errors.InvalidParams(f"cannot open {target.path}: {exc.strerror or exc}",
                                   rule="open", path=target.path, **data) from None


def size_of(target: Target, field: str | None = None) -> int:
    """Bytes in the file or block device (a file's from ``fstat`` of its descriptor)."""
    if target.kind == "file":
        return os.fstat(target.fd).st_size
    fd = open_data(target, os.O_RDONLY, field)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def same_inode(one: Target, other: Target) -> bool:
    """Whether two targets are one file or one device (whatever their names)."""
    if one.kind == "device" or other.kind == "device":
        return one.kind == other.kind and one.info.st_rdev == other.info.st_rdev
    return (one.info.st_dev, one.info.st_ino) == (other.info.st_dev, other.info.st_ino)
