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

import fcntl
import os
import stat
import struct

from vdsm_agent.devices.usage import DevNum

LOOP_GET_STATUS64 = 0x4C05
# struct loop_info64: lo_device, lo_inode, lo_rdevice, lo_offset, lo_sizelimit
# (u64 each), lo_number, lo_encrypt_type, lo_encrypt_key_size, lo_flags (u32
# each), lo_file_name[64], lo_crypt_name[64], lo_encrypt_key[32], lo_init[2] (u64).
LOOP_INFO64_SIZE = 232
_HEAD = struct.Struct("=QQQ")
_DELETED = " (deleted)"


def split_dev(encoded: int) -> DevNum:
    # The kernel reports huge_encode_dev() values; glibc's major()/minor()
    # decode that encoding (it is the same for every 32-bit device number).
    return os.major(encoded), os.minor(encoded)


def backing_from_status(status: bytes) -> DevNum | None:
    """The device a loop_info64 says the backing file is on (or is, for a block device)."""
    if len(status) < _HEAD.size:
        return None
    device, _inode, rdevice = _HEAD.unpack_from(status)
    if rdevice:
        # The backing file is itself a block device node: that device is what backs the loop.
        return split_dev(rdevice)
    return split_dev(device) if device else None


def status_backing(devnode: str) -> DevNum | None:
    try:
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buffer = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buffer)
    except OSError:
        return None  # ENXIO: not attached (any more)
    finally:
        os.close(fd)
    return backing_from_status(bytes(buffer))


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
