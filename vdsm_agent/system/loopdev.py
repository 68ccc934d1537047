"""Loop devices by descriptor: bind, inspect and detach them with the kernel's ioctls.

``losetup`` takes a file *name*: given ``/dev/fd/N`` it reads the link back to
a path and opens that (util-linux 2.38), so whatever is at that name by then
gets bound. Here the caller hands an open descriptor of the image, and the
loop device is bound to exactly that open file:

* ``LOOP_CTL_GET_FREE`` on ``/dev/loop-control`` names a free device (creating
  one if needed), then ``LOOP_CONFIGURE`` (Linux 5.8) binds it to the
  descriptor in one call. Another process may take the same free device
  between the two (``EBUSY``): ask for a free one again. On older kernels
  (``EINVAL``/``ENOTTY``) ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` do the same.
* What backs a device is the kernel's answer to ``LOOP_GET_STATUS64``: the
  backing file's ``st_dev``/``st_ino`` as the open file has them (``Backing``),
  right after a rename, an unlink or a lazy unmount, unlike the sysfs name.
  An inode number is not reused while the loop device holds the inode, so
  ``Backing`` names one live file.
* ``LOOP_CLR_FD`` detaches at the device's last close (the kernel sets
  autoclear when anybody else has it open: a mount, a reader, udev's blkid),
  so ``detach`` waits until the device is unbound and says whether it is.

All of it is blocking (the ioctls take the loop driver's locks): call it from
a worker thread, never from the event loop.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import os
import time
from pathlib import Path

LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01
LOOP_SET_STATUS64 = 0x4C04
LOOP_GET_STATUS64 = 0x4C05
LOOP_CONFIGURE = 0x4C0A
LOOP_CTL_GET_FREE = 0x4C82

LO_FLAGS_READ_ONLY = 1
LO_FLAGS_AUTOCLEAR = 4
LO_NAME_SIZE = 64
DEV = Path("/dev")
# Free devices taken by somebody else before we could bind them, in a row, before giving up.
ATTACH_TRIES = 32
DETACH_POLL = 0.01
# Tests set False to exercise the LOOP_SET_FD + LOOP_SET_STATUS64 path of older kernels.
use_loop_configure = True


class LoopInfo64(ctypes.Structure):
    """``struct loop_info64`` (linux/loop.h), 232 bytes."""

    _fields_ = [("lo_device", ctypes.c_uint64), ("lo_inode", ctypes.c_uint64),
                ("lo_rdevice", ctypes.c_uint64), ("lo_offset", ctypes.c_uint64),
                ("lo_sizelimit", ctypes.c_uint64), ("lo_number", ctypes.c_uint32),
                ("lo_encrypt_type", ctypes.c_uint32), ("lo_encrypt_key_size", ctypes.c_uint32),
                ("lo_flags", ctypes.c_uint32), ("lo_file_name", ctypes.c_char * LO_NAME_SIZE),
                ("lo_crypt_name", ctypes.c_char * LO_NAME_SIZE),
                ("lo_encrypt_key", ctypes.c_char * 32), ("lo_init", ctypes.c_uint64 * 2)]


class LoopConfig(ctypes.Structure):
    """``struct loop_config`` (linux/loop.h, Linux 5.8), 304 bytes."""

    _fields_ = [("fd", ctypes.c_uint32), ("block_size", ctypes.c_uint32),
                ("info", LoopInfo64), ("reserved", ctypes.c_uint64 * 8)]


assert ctypes.sizeof(LoopInfo64) == 232
assert ctypes.sizeof(LoopConfig) == 304


def _dev(encoded: int) -> int:
    # The kernel reports huge_encode_dev() numbers; glibc's major()/minor() decode
    # them, and makedev() gives the st_dev that stat() reports for the same device.
    return os.makedev(os.major(encoded), os.minor(encoded))


@dataclasses.dataclass(frozen=True)
class Backing:
    """The identity of a loop device's backing file: its ``st_dev`` and ``st_ino``."""

    dev: int
    ino: int

    @classmethod
    def of(cls, info: os.stat_result) -> Backing:
        return cls(info.st_dev, info.st_ino)

    @classmethod
    def parse(cls, identity: str) -> Backing | None:
        """The inverse of ``identity``; None for anything else."""
        kind, _, rest = identity.partition(":")
        dev, _, ino = rest.partition(":")
        if kind != "file" or not dev.isdigit() or not ino.isdigit():
            return None
        return cls(int(dev), int(ino))

    @property
    def identity(self) -> str:
        """``file:DEV:INO``, as ``system.confine.Resolved.identity`` spells a file."""
        return f"file:{self.dev}:{self.ino}"


@dataclasses.dataclass(frozen=True)
class Status:
    """A bound loop device, as ``LOOP_GET_STATUS64`` describes it."""

    number: int
    device: int  # lo_device: st_dev of the backing file (kernel encoding)
    inode: int
    rdevice: int  # lo_rdevice: st_rdev of the backing file (a block device node)
    offset: int  # where in the file the device starts, and its size limit (0: none)
    sizelimit: int
    flags: int
    file_name: str  # what the binder put in lo_file_name (informative, at most 63 bytes)

    @property
    def backing(self) -> Backing:
        return Backing(_dev(self.device), self.inode)

    @property
    def read_only(self) -> bool:
        return bool(self.flags & LO_FLAGS_READ_ONLY)

    @property
    def whole(self) -> bool:
        """The device serves the whole file (no offset, no size limit)."""
        return self.offset == 0 and self.sizelimit == 0


def device_path(number: int, dev_root: Path = DEV) -> Path:
    return dev_root / f"loop{number}"


def number_of(device: str) -> int | None:
    """N for ``/dev/loopN`` (or ``loopN``), None for any other name."""
    name = os.path.basename(device)
    digits = name[4:]
    if not name.startswith("loop") or not digits.isdigit() or digits != str(int(digits)):
        return None
    return int(digits)


def status(fd: int) -> Status:
    """``LOOP_GET_STATUS64`` of an open loop device; OSError ENXIO when it is not bound."""
    info = LoopInfo64()
    fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
    return Status(number=info.lo_number, device=info.lo_device, inode=info.lo_inode,
                  rdevice=info.lo_rdevice, offset=info.lo_offset,
                  sizelimit=info.lo_sizelimit, flags=info.lo_flags,
                  file_name=info.lo_file_name.decode(errors="replace"))


def status_of(devnode: str | Path) -> Status | None:
    """The status of ``devnode``; None when it is not bound or cannot be opened."""
    try:
        # O_NONBLOCK|O_RDONLY: no media wait, and no close-after-write event for udev.
        fd = os.open(devnode, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None  # gone, or ENXIO while it is being torn down
    try:
        return status(fd)
    except OSError:
        return None  # ENXIO: not bound
    finally:
        os.close(fd)


def bound_numbers(sysfs_root: Path = Path("/sys")) -> list[int]:
    """The numbers of the loop devices that are bound (sysfs: ``loop/backing_file``)."""
    try:
        names = [entry.name for entry in os.scandir(sysfs_root / "block")]
    except OSError:
        return []
    numbers = []
    for name in names:
        number = number_of(name)
        if number is not None and os.path.exists(sysfs_root / "block" / name / "loop" /
                                                  "backing_file"):
            numbers.append(number)
    return sorted(numbers)


def bound(sysfs_root: Path = Path("/sys"), dev_root: Path = DEV) -> dict[int, Status]:
    """Every bound loop device's status, by number."""
    found = {}
    for number in bound_numbers(sysfs_root):
        current = status_of(device_path(number, dev_root))
        if current is not None:
            found[number] = current
    return found


def bound_to(backing: Backing, sysfs_root: Path = Path("/sys"),
             dev_root: Path = DEV) -> list[int]:
    """The numbers of the loop devices whose backing file is ``backing`` (by the kernel)."""
    return [number for number, current in bound(sysfs_root, dev_root).items()
            if current.backing == backing]


# -- binding --------------------------------------------------------------------------------


def _info(read_only: bool, file_name: str) -> LoopInfo64:
    info = LoopInfo64()
    info.lo_flags = LO_FLAGS_READ_ONLY if read_only else 0
    # Informative only (the kernel never opens it): what losetup would have put there.
    info.lo_file_name = os.fsencode(file_name)[:LO_NAME_SIZE - 1]
    return info


def _configure(device_fd: int, backing_fd: int, read_only: bool, file_name: str) -> None:
    if use_loop_configure:
        config = LoopConfig()
        config.fd = backing_fd
        config.info = _info(read_only, file_name)
        try:
            fcntl.ioctl(device_fd, LOOP_CONFIGURE, config)
            return
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOTTY):
                raise
    # Linux < 5.8: no LOOP_CONFIGURE. Two calls; the second is undone if it fails.
    fcntl.ioctl(device_fd, LOOP_SET_FD, backing_fd)
    try:
        fcntl.ioctl(device_fd, LOOP_SET_STATUS64, _info(read_only, file_name))
    except OSError:
        fcntl.ioctl(device_fd, LOOP_CLR_FD)
        raise


def attach(backing_fd: int, *, read_only: bool = False, file_name: str = "",
           dev_root: Path = DEV) -> int:
    """Bind a free loop device to the open file ``backing_fd``; its number.

    ``backing_fd`` must be open for reading (and writing unless ``read_only``):
    the device serves that open file, whatever its name becomes. OSError
    when no device could be bound.
    """
    control = os.open(dev_root / "loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(ATTACH_TRIES):
            number = fcntl.ioctl(control, LOOP_CTL_GET_FREE)
            try:
                # Read-write: LOOP_CONFIGURE makes the device read-only when its own
                # descriptor cannot write.
                device_fd = os.open(device_path(number, dev_root), os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                time.sleep(DETACH_POLL)  # a new device whose node is not there yet
                continue
            try:
                _configure(device_fd, backing_fd, read_only, file_name)
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    continue  # somebody bound it since LOOP_CTL_GET_FREE: take another
                raise
            finally:
                os.close(device_fd)
            return number
    finally:
        os.close(control)
    raise OSError(errno.EBUSY, f"every free loop device was taken by somebody else "
                               f"({ATTACH_TRIES} tries)")


def detach(number: int, backing: Backing, *, wait: float, dev_root: Path = DEV) -> bool:
    """Detach loop device ``number`` if it is bound to ``backing``, and wait until it is not.

    True when the device is not bound to ``backing`` any more (detached now,
    or already; a device bound to another file is somebody else's and left
    alone). False when it is still bound after ``wait`` seconds because
    somebody holds it open: the kernel's deferred detach (at the last close)
    is then cancelled, and the device stays bound as it was. OSError when the
    detach itself failed.
    """
    node = device_path(number, dev_root)
    try:
        fd = os.open(node, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO):
            return True  # the device is gone or being torn down
        raise
    try:
        try:
            current = status(fd)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return True  # not bound
            raise
        if current.backing != backing:
            return True  # reused by somebody else: not ours to detach
        try:
            fcntl.ioctl(fd, LOOP_CLR_FD)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: detached meanwhile
                raise
    finally:
        os.close(fd)  # with nobody else holding it, this close tears the device down
    if wait_detached(number, backing, wait, dev_root):
        return True
    # Held open (a mount, a reader): the kernel would detach it at some later close.
    # Undo that, so that the device stays as it was and the caller's answer holds.
    return not keep_bound(number, backing, dev_root)


def keep_bound(number: int, backing: Backing, dev_root: Path = DEV) -> bool:
    """Cancel a deferred detach (clear autoclear) of a device bound to ``backing``.

    True when the device is still bound to ``backing`` afterwards; False when
    it went away meanwhile (its last holder closed it).
    """
    try:
        fd = os.open(device_path(number, dev_root), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = LoopInfo64()
        try:
            fcntl.ioctl(fd, LOOP_GET_STATUS64, info)
        except OSError:
            return False
        if Backing(_dev(info.lo_device), info.lo_inode) != backing:
            return False
        info.lo_flags &= ~LO_FLAGS_AUTOCLEAR
        try:
            # The same status back without autoclear (the only flag LOOP_SET_STATUS64
            # may clear); ENXIO: torn down meanwhile.
            fcntl.ioctl(fd, LOOP_SET_STATUS64, info)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise
        return True
    finally:
        os.close(fd)


def wait_detached(number: int, backing: Backing, wait: float, dev_root: Path = DEV) -> bool:
    """Whether device ``number`` stops being bound to ``backing`` within ``wait`` seconds."""
    deadline = time.monotonic() + wait
    while True:
        current = status_of(device_path(number, dev_root))
        if current is None or current.backing != backing:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(DETACH_POLL)
