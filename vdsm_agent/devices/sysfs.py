"""Block device facts from sysfs, enumerated with pyudev.

Without udevd (as on the project VM) pyudev knows only the kernel's uevent
properties, so everything else is read from the device's sysfs directory:
the same files udev rules would read. ``read_facts`` takes a sysfs directory,
so tests can run it on a hand-made tree (device-mapper holders, SCSI VPD
pages) where the kernel has no such devices.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator

import pyudev

from vdsm_agent.devices.usage import DevNum

log = logging.getLogger(__name__)

SECTOR = 512  # sysfs "size" is in 512-byte sectors whatever the logical block size
LOOP_MAJOR = 7
BY_ID = "/dev/disk/by-id"
BTRFS = "/sys/fs/btrfs"


@dataclasses.dataclass(frozen=True)
class BlockFacts:
    name: str  # kernel name: loop3, vda1, dm-0
    sys_path: str
    devnode: str
    devnum: DevNum
    devtype: str  # "disk" or "partition" (the uevent DEVTYPE)
    size: int  # bytes
    read_only: bool
    removable: bool
    rotational: bool | None
    logical_block_size: int | None
    model: str | None
    serial: str | None
    wwn: str | None
    holders: tuple[str, ...]
    slaves: tuple[str, ...]
    parent: str | None  # the disk, for a partition
    partition_number: int | None
    backing_file: str | None  # for an attached loop device
    dm_name: str | None


def read_attr(sys_path: str, attr: str) -> str | None:
    """A sysfs attribute, stripped; None when absent, empty or unreadable."""
    try:
        with open(os.path.join(sys_path, attr), "rb") as file:
            raw = file.read()
    except OSError:
        return None
    text = raw.decode("utf-8", errors="replace").strip()
    return text or None


def read_int(sys_path: str, attr: str) -> int | None:
    text = read_attr(sys_path, attr)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def read_flag(sys_path: str, attr: str) -> bool | None:
    number = read_int(sys_path, attr)
    return None if number is None else number != 0


def list_dir(sys_path: str, subdir: str) -> tuple[str, ...]:
    try:
        return tuple(sorted(os.listdir(os.path.join(sys_path, subdir))))
    except OSError:
        return ()


def read_vpd_serial(sys_path: str) -> str | None:
    """The unit serial number from a SCSI device's cached VPD page 0x80."""
    try:
        with open(os.path.join(sys_path, "device", "vpd_pg80"), "rb") as file:
            page = file.read()
    except OSError:
        return None
    # Header: peripheral byte, page code (0x80), 2-byte length; then the serial.
    if len(page) < 4 or page[1] != 0x80:
        return None
    length = int.from_bytes(page[2:4], "big")
    serial = page[4:4 + length].decode("ascii", errors="replace").strip(" \0")
    return serial or None


def read_serial(sys_path: str) -> str | None:
    # device/serial: NVMe, MMC; serial: virtio-blk; vpd_pg80: SCSI and SATA.
    return (read_attr(sys_path, "device/serial") or read_attr(sys_path, "serial")
            or read_vpd_serial(sys_path))


def read_wwn(sys_path: str) -> str | None:
    # wwid: NVMe namespaces; device/wwid: SCSI and SATA (from VPD page 0x83).
    wwn = read_attr(sys_path, "wwid") or read_attr(sys_path, "device/wwid")
    return " ".join(wwn.split()) if wwn else None


def parse_devnum(text: str | None) -> DevNum | None:
    if text is None:
        return None
    major, sep, minor = text.partition(":")
    try:
        return (int(major), int(minor)) if sep else None
    except ValueError:
        return None


def read_backing_file(sys_path: str) -> str | None:
    # Present only while the loop device is attached; the kernel appends
    # " (deleted)" when the file was unlinked, which is still a live backing file.
    return read_attr(sys_path, "loop/backing_file")


def read_facts(sys_path: str, name: str, devtype: str, devnode: str) -> BlockFacts:
    """Facts about one block device from its sysfs directory.

    Raises OSError when the device vanished (its ``dev`` attribute is gone).
    """
    devnum = parse_devnum(read_attr(sys_path, "dev"))
    if devnum is None:
        raise FileNotFoundError(f"{sys_path}: no dev attribute")
    is_partition = devtype == "partition"
    # Hardware facts belong to the disk; a partition inherits nothing here so
    # that it never shares the disk's identity (see collect.identity).
    disk_path = None if is_partition else sys_path
    return BlockFacts(
        name=name, sys_path=sys_path, devnode=devnode, devnum=devnum, devtype=devtype,
        size=(read_int(sys_path, "size") or 0) * SECTOR,
        read_only=bool(read_flag(sys_path, "ro")),
        removable=bool(read_flag(sys_path, "removable")),
        rotational=read_flag(sys_path, "queue/rotational"),
        logical_block_size=read_int(sys_path, "queue/logical_block_size"),
        model=read_attr(disk_path, "device/model") if disk_path else None,
        serial=read_serial(disk_path) if disk_path else None,
        wwn=read_wwn(disk_path) if disk_path else None,
        holders=list_dir(sys_path, "holders"),
        slaves=list_dir(sys_path, "slaves"),
        parent=os.path.basename(os.path.dirname(sys_path)) if is_partition else None,
        partition_number=read_int(sys_path, "partition") if is_partition else None,
        backing_file=read_backing_file(sys_path),
        dm_name=read_attr(sys_path, "dm/name"),
    )


def node_path(device: pyudev.Device) -> str:
    node = device.device_node
    if node:
        return str(node)
    # Kernel names use "!" where the node path has "/" (cciss!c0d0).
    return "/dev/" + str(device.sys_name).replace("!", "/")


def iter_udev_block_devices() -> Iterator[pyudev.Device]:
    yield from pyudev.Context().list_devices(subsystem="block")


def enumerate_block_devices() -> list[BlockFacts]:
    """Every block device the kernel knows; devices that vanish meanwhile are skipped."""
    found: list[BlockFacts] = []
    for device in iter_udev_block_devices():
        name = str(device.sys_name)
        try:
            found.append(read_facts(str(device.sys_path), name,
                                    str(device.device_type or "disk"), node_path(device)))
        except OSError as exc:
            log.debug("skipping %s: %s", name, exc)
    return found


def by_id_links(directory: str = BY_ID) -> dict[str, list[str]]:
    """udev's /dev/disk/by-id names by the kernel name they point to (empty without udev)."""
    links: dict[str, list[str]] = {}
    try:
        entries = sorted(os.listdir(directory))
    except OSError:
        return links
    for entry in entries:
        link = os.path.join(directory, entry)
        if os.path.islink(link):
            links.setdefault(os.path.basename(os.path.realpath(link)), []).append(entry)
    return links


def mounted_btrfs(directory: str = BTRFS) -> dict[str, tuple[str, ...]]:
    """Member devices (kernel names) of each mounted btrfs, by filesystem UUID.

    btrfs creates /sys/fs/btrfs/<fsid> when a filesystem is mounted. The mount
    table names only one device of a multi-device btrfs, so this is how the
    others are known to be mounted too.
    """
    filesystems: dict[str, tuple[str, ...]] = {}
    try:
        entries = os.listdir(directory)
    except OSError:
        return filesystems
    for fsid in entries:
        members = list_dir(os.path.join(directory, fsid), "devices")
        if members:
            filesystems[fsid] = members
    return filesystems
