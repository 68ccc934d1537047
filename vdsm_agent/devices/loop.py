"""Where a loop device's backing file lives.

The kernel's own answer (``LOOP_GET_STATUS64``) comes first: it holds the
backing file's st_dev/st_rdev as the kernel sees the open file, so it stays
right when the file was unlinked or renamed, when its filesystem was lazily
unmounted (``umount -l``: gone from the mount table but still alive), or when
the loop device was set up in another mount namespace. ``os.stat`` of the
sysfs ``backing_file`` path is the fallback for when the device cannot be
opened.
"""

from __future__ import annotations

import ctypes
import os
import stat
import struct

from vdsm_agent.devices.usage import DevNum
from vdsm_agent.system import loopdev

# The ioctl and its struct live in system.loopdev; the size is kept for raw parsers.
LOOP_INFO64_SIZE = ctypes.sizeof(loopdev.LoopInfo64)
# struct loop_info64 begins with lo_device, lo_inode, lo_rdevice (u64 each).
_HEAD = struct.Struct("=QQQ")
_DELETED = " (deleted)"


def split_dev(encoded: int) -> DevNum:
    # The kernel reports huge_encode_dev() values; glibc's major()/minor()
    # decode that encoding (it is the same for every 32-bit device number).
    return os.major(encoded), os.minor(encoded)


def _backing(device: int, rdevice: int) -> DevNum | None:
    if rdevice:
        # The backing file is itself a block device node: that device is what backs the loop.
        return split_dev(rdevice)
    return split_dev(device) if device else None


def backing_from_status(status: bytes) -> DevNum | None:
    """The device a raw loop_info64 says the backing file is on (or is, for a block device)."""
    if len(status) < _HEAD.size:
        return None
    device, _inode, rdevice = _HEAD.unpack_from(status)
    return _backing(device, rdevice)


def status_backing(devnode: str) -> DevNum | None:
    status = loopdev.status_of(devnode)  # None: not attached (any more), or cannot be opened
    return None if status is None else _backing(status.device, status.rdevice)


def stat_backing(backing_file: str) -> DevNum | None:
    if backing_file.endswith(_DELETED):
        return None  # whatever has that name now is not the loop's file
    try:
        info = os.stat(backing_file)
    except (OSError, ValueError):
        return None
    number = info.st_rdev if stat.S_ISBLK(info.st_mode) else info.st_dev
    return os.major(number), os.minor(number)


def backing_device(devnode: str, backing_file: str) -> DevNum | None:
    """The device number behind an attached loop device, or None if unknown."""
    return status_backing(devnode) or stat_backing(backing_file)
