"""The mount table and active swap, from /proc.

``/proc/self/mountinfo`` is used rather than ``psutil.disk_partitions``
because it carries each mount's device number: a mount is matched to its
device by major:minor, never by name (``/dev/root``, ``/dev/mapper/...`` and
``/dev/disk/by-*`` symlinks all appear as mount sources).
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat

from vdsm_agent.devices.usage import DevNum

MOUNTINFO = "/proc/self/mountinfo"
SWAPS = "/proc/swaps"

# The kernel escapes space, tab, newline and backslash in paths as \ooo.
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(text: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), text)


@dataclasses.dataclass(frozen=True)
class Mount:
    devnum: DevNum  # st_dev of the filesystem (anonymous 0:N for btrfs, NFS, tmpfs, ...)
    mountpoint: str
    fstype: str
    source: str


def parse_devnum(text: str) -> DevNum:
    major, _, minor = text.partition(":")
    return int(major), int(minor)


def parse_mountinfo_line(line: str) -> Mount | None:
    """One mountinfo line; None for a line that does not parse."""
    # Fields: id parent maj:min root mountpoint options [optional...] - fstype source super
    fields = line.split()
    try:
        separator = fields.index("-", 6)
        devnum = parse_devnum(fields[2])
        fstype, source = fields[separator + 1], fields[separator + 2]
    except (ValueError, IndexError):
        return None
    return Mount(devnum=devnum, mountpoint=unescape(fields[4]), fstype=unescape(fstype),
                 source=unescape(source))


def parse_mountinfo(text: str) -> list[Mount]:
    mounts = (parse_mountinfo_line(line) for line in text.splitlines())
    return [mount for mount in mounts if mount is not None]


def read_mountinfo(path: str = MOUNTINFO) -> list[Mount]:
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        return parse_mountinfo(file.read())


@dataclasses.dataclass(frozen=True)
class Swap:
    filename: str
    kind: str  # "partition" (any block device) or "file"


def parse_swaps(text: str) -> list[Swap]:
    swaps: list[Swap] = []
    for line in text.splitlines()[1:]:  # the first line is a header
        fields = line.split()
        if len(fields) >= 2:
            swaps.append(Swap(filename=unescape(fields[0]), kind=fields[1]))
    return swaps


def read_swaps(path: str = SWAPS) -> list[Swap]:
    with open(path, encoding="utf-8", errors="surrogateescape") as file:
        return parse_swaps(file.read())


def block_devnum(path: str) -> DevNum | None:
    """The device number of the block device at ``path`` (symlinks followed), or None."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    if not stat.S_ISBLK(info.st_mode):
        return None
    return os.major(info.st_rdev), os.minor(info.st_rdev)


def mount_devnum(mount: Mount) -> DevNum | None:
    """The block device a mount is on, or None for a mount that is not on one."""
    if mount.devnum[0] != 0:
        return mount.devnum
    # Anonymous device numbers: btrfs (every subvolume has its own), and
    # filesystems with no device at all (tmpfs, NFS, FUSE). Only the source,
    # when it names a block device node, tells which device a btrfs is on.
    if mount.source.startswith("/"):
        return block_devnum(mount.source)
    return None
