"""The mount table, from ``/proc/self/mountinfo``: the one parser (proc(5)).

Used by the device inventory (which device is mounted where: mounts are
matched to devices by major:minor, never by name, since ``/dev/root`` and
symlinked names appear as sources) and by the mount-based connection
backends (what is mounted at a mount point, which never touches the server,
so checking a mount of a dead server cannot hang).

The kernel escapes space, tab, newline and backslash in its fields as
``\\ooo`` (octal); every field that can hold a path or a name (root, mount
point, filesystem type, source) is unescaped here, the same way for every
caller. The table is read as bytes and decoded as the kernel's file names
are (``os.fsdecode``): a name that is not UTF-8 keeps its bytes (as
surrogates), so it can be handed back to the kernel unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

MOUNTINFO = Path("/proc/self/mountinfo")

DevNum = tuple[int, int]  # (major, minor)

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """A field with the kernel's ``\\ooo`` escapes decoded (``\\040`` is a space)."""
    if "\\" not in field:
        return field
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


@dataclasses.dataclass(frozen=True)
class MountEntry:
    """One line of the mount table, unescaped."""

    mount_id: int
    devnum: DevNum  # st_dev of the filesystem (anonymous 0:N for btrfs, NFS, tmpfs, ...)
    root: str  # the mounted directory of the filesystem ("/" unless a bind mount)
    mount_point: str
    fstype: str
    source: str
    options: str  # the filesystem's (super block) options


def parse_line(line: str) -> MountEntry | None:
    """One mountinfo line; None for a line that does not parse."""
    # Fields: id parent maj:min root mountpoint options [optional...] - fstype source super
    fields = line.split()
    try:
        separator = fields.index("-", 6)
        major, _, minor = fields[2].partition(":")
        return MountEntry(
            mount_id=int(fields[0]), devnum=(int(major), int(minor)),
            root=unescape(fields[3]), mount_point=unescape(fields[4]),
            fstype=unescape(fields[separator + 1]), source=unescape(fields[separator + 2]),
            options=fields[separator + 3] if len(fields) > separator + 3 else "")
    except (ValueError, IndexError):
        log.debug("unparsable mountinfo line: %r", line)
        return None


def parse(text: str) -> list[MountEntry]:
    entries = (parse_line(line) for line in text.splitlines())
    return [entry for entry in entries if entry is not None]


def read(path: Path = MOUNTINFO) -> tuple[MountEntry, ...]:
    """Blocking: the mount table at ``path`` (the mounts of our mount namespace)."""
    return _parsed(path.read_bytes())


@functools.lru_cache(maxsize=4)
def _parsed(data: bytes) -> tuple[MountEntry, ...]:
    # Keyed by the table itself, so never stale: several backends and the device
    # inventory read the same table, and it rarely changes between reads.
    return tuple(parse(os.fsdecode(data)))


def find(mount_point: str, path: Path = MOUNTINFO) -> MountEntry | None:
    """The top-most mount at ``mount_point``, if any."""
    found = None
    for entry in read(path):
        if entry.mount_point == mount_point:
            found = entry
    return found
