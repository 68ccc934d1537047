"""Active swap, from /proc/swaps, and the device a path or a mount is on.

The mount table itself is ``vdsm_agent.system.mountinfo`` (one parser for the
whole agent); a mount is matched to its device by major:minor, never by name
(``/dev/root``, ``/dev/mapper/...`` and ``/dev/disk/by-*`` symlinks all appear
as mount sources).
"""

from __future__ import annotations

import dataclasses
import os
import stat

from vdsm_agent.devices.usage import DevNum
from vdsm_agent.system.mountinfo import MountEntry, unescape

SWAPS = "/proc/swaps"


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


def mount_devnum(mount: MountEntry) -> DevNum | None:
    """The block device a mount is on, or None for a mount that is not on one."""
    if mount.devnum[0] != 0:
        return mount.devnum
    # Anonymous device numbers: btrfs (every subvolume has its own), and
    # filesystems with no device at all (tmpfs, NFS, FUSE). Only the source,
    # when it names a block device node, tells which device a btrfs is on.
    if mount.source.startswith("/"):
        return block_devnum(mount.source)
    return None
