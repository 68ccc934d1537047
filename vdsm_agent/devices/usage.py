"""The in-use verdict: pure functions over facts collected elsewhere.

Nothing here touches the system, so every rule can be unit-tested with
hand-made facts (``tests/test_devices_usage.py``). The collector
(``vdsm_agent.devices.collect``) turns sysfs, /proc and blkid into ``Node`` and
``HostState`` values and asks ``evaluate`` for each device's reasons.

Reason codes (the schema's ``InUseReason.code``):

* ``mounted`` / ``partition-mounted``: a filesystem on it (or on one of its
  partitions) is mounted;
* ``swap`` / ``partition-swap``: it (or a partition) is active swap;
* ``held`` / ``partition-held``: another block device is built on it (sysfs
  ``holders/``: device-mapper, md, LVM, bcache, ...);
* ``backs-loop``: the backing file of a loop device lives on a filesystem on it
  (or on one of its partitions), or it is itself a loop device's backing device;
* ``root``: it is part of the chain of devices under the root filesystem;
* ``busy``: only from the exclusive-open probe of ``Inventory.check_not_in_use``
  (something the tables above do not show still holds the device).

Reasons travel along partitions in both directions. Up: a disk is in use
when one of its partitions is (``partition-*`` codes). Down: a partition is
in use when its whole disk is used as one device (mounted, swap, held,
backing a loop device, under /), with the same code and a message naming the
disk: writing to ``sdb1`` corrupts whatever uses all of ``sdb`` (e.g. a
multipath map over a path device that still has partition nodes).
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# A device number as (major, minor).
DevNum = tuple[int, int]

MOUNTED = "mounted"
PARTITION_MOUNTED = "partition-mounted"
SWAP = "swap"
PARTITION_SWAP = "partition-swap"
HELD = "held"
PARTITION_HELD = "partition-held"
BACKS_LOOP = "backs-loop"
ROOT = "root"
BUSY = "busy"

# What a partition's own reason becomes on its disk.
_ON_DISK = {
    MOUNTED: PARTITION_MOUNTED,
    SWAP: PARTITION_SWAP,
    HELD: PARTITION_HELD,
    BACKS_LOOP: BACKS_LOOP,
}


@dataclasses.dataclass(frozen=True)
class Reason:
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclasses.dataclass(frozen=True)
class LoopBacking:
    """Where a loop device's data lives."""

    loop: str  # kernel name of the loop device
    file: str  # backing file as the kernel names it
    device: DevNum  # the device the file's filesystem is on, or the backing block device


@dataclasses.dataclass(frozen=True)
class Node:
    """One block device as the verdict needs to see it."""

    name: str
    devnum: DevNum
    parent: str | None = None  # the disk, for a partition
    holders: tuple[str, ...] = ()
    slaves: tuple[str, ...] = ()
    backing: LoopBacking | None = None  # for an attached loop device
    alias: str | None = None  # e.g. the device-mapper name, shown in messages


@dataclasses.dataclass(frozen=True)
class HostState:
    """Host-wide facts: the mount table, active swap, the root filesystem."""

    mounts: Mapping[DevNum, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # Devices known to be mounted without a known mount point (e.g. the other
    # members of a multi-device btrfs), with a description for the message.
    mounted_members: Mapping[DevNum, str] = dataclasses.field(default_factory=dict)
    swaps: frozenset[DevNum] = frozenset()
    # Device numbers of the filesystem mounted at / (more than one for a
    # multi-device filesystem).
    root: frozenset[DevNum] = frozenset()


def loop_path(name: str) -> str:
    return f"/dev/{name}"


def loops_backed_by(nodes: Iterable[Node]) -> dict[DevNum, list[LoopBacking]]:
    """For each device number, the loop devices whose data lives there."""
    backed: dict[DevNum, list[LoopBacking]] = defaultdict(list)
    for node in nodes:
        if node.backing is not None:
            backed[node.backing.device].append(node.backing)
    return dict(backed)


def _holder_label(name: str, by_name: Mapping[str, Node]) -> str:
    holder = by_name.get(name)
    if holder is not None and holder.alias:
        return f"{name} ({holder.alias})"
    return name


def own_reasons(node: Node, host: HostState, backed: Sequence[LoopBacking],
                by_name: Mapping[str, Node]) -> list[Reason]:
    """Reasons that come from the device itself, not from its partitions."""
    reasons: list[Reason] = []
    mountpoints = host.mounts.get(node.devnum, ())
    if mountpoints:
        reasons.append(Reason(MOUNTED, "mounted at " + ", ".join(mountpoints)))
    elif node.devnum in host.mounted_members:
        reasons.append(Reason(MOUNTED, host.mounted_members[node.devnum]))
    if node.devnum in host.swaps:
        reasons.append(Reason(SWAP, "used as swap"))
    if node.holders:
        labels = ", ".join(_holder_label(name, by_name) for name in node.holders)
        reasons.append(Reason(HELD, f"held by {labels}"))
    for backing in backed:
        reasons.append(Reason(BACKS_LOOP, f"backs {loop_path(backing.loop)} ({backing.file})"))
    return reasons


def as_partition_reason(partition: str, reason: Reason) -> Reason | None:
    """A partition's reason as seen on its disk (None for codes that do not carry over)."""
    code = _ON_DISK.get(reason.code)
    if code is None:
        return None
    return Reason(code, f"partition {partition} {reason.message}")


def root_chain(by_name: Mapping[str, Node], by_devnum: Mapping[DevNum, Node],
               root: Iterable[DevNum]) -> dict[str, bool]:
    """Every device under the root filesystem.

    Starting from the device(s) mounted at /, follow what each one is built
    on: its slaves (dm, md), its disk (for a partition) and, for a loop
    device, the device its backing file lives on. The value tells whether
    all of the device is under / (True), or only one of its partitions
    (False: the disk of the root partition, and what that disk is built on).
    """
    pending = [(by_devnum[devnum].name, True) for devnum in root if devnum in by_devnum]
    chain: dict[str, bool] = {}
    while pending:
        name, whole = pending.pop()
        if name not in by_name or chain.get(name) is True or (name in chain and not whole):
            continue
        chain[name] = whole
        node = by_name[name]
        pending.extend((slave, whole) for slave in node.slaves)
        if node.parent is not None:
            pending.append((node.parent, False))
        if node.backing is not None and node.backing.device in by_devnum:
            pending.append((by_devnum[node.backing.device].name, whole))
    return chain


ROOT_REASON = Reason(ROOT, "backs the root filesystem")


def evaluate(nodes: Sequence[Node], host: HostState) -> dict[str, list[Reason]]:
    """Every device's in-use reasons, by kernel name (an empty list: not in use)."""
    by_name = {node.name: node for node in nodes}
    by_devnum = {node.devnum: node for node in nodes}
    backed = loops_backed_by(nodes)
    own = {node.name: own_reasons(node, host, backed.get(node.devnum, ()), by_name)
           for node in nodes}
    roots = root_chain(by_name, by_devnum, host.root)
    for name in roots:
        own[name].append(ROOT_REASON)
    verdicts = {name: list(reasons) for name, reasons in own.items()}
    for node in nodes:
        disk = node.parent
        if disk is None or disk not in own:
            continue
        for reason in own[node.name]:
            carried = as_partition_reason(node.name, reason)
            if carried is not None:
                verdicts[disk].append(carried)
        verdicts[node.name].extend(
            inherited_from_disk(disk, own[disk], whole_root=roots.get(disk) is True,
                                own_root=node.name in roots))
    for node in nodes:
        verdicts[node.name].extend(inherited_from_backing_device(node, by_devnum, verdicts))
    return verdicts


def inherited_from_backing_device(loop: Node, by_devnum: Mapping[DevNum, Node],
                                  verdicts: Mapping[str, Sequence[Reason]]) -> list[Reason]:
    """A loop device over a block device is in use when that device is.

    Writing to the loop device writes to the device under it, so a loop over a
    mounted disk must not look free. A backing "file" under /dev is a device node
    (images never live on devtmpfs). The backing device's own note that it backs
    this loop device is not carried back.
    """
    backing = loop.backing
    if backing is None or not backing.file.startswith("/dev/"):
        return []
    device = by_devnum.get(backing.device)
    if device is None:
        return []
    itself = loop_path(loop.name)
    return [Reason(reason.code, f"backing device {device.name} {reason.message}")
            for reason in verdicts.get(device.name, ())
            if not (reason.code == BACKS_LOOP and itself in reason.message)]


def inherited_from_disk(disk: str, disk_reasons: Sequence[Reason], whole_root: bool,
                        own_root: bool) -> list[Reason]:
    """A disk's own reasons as seen on one of its partitions."""
    inherited: list[Reason] = []
    for reason in disk_reasons:
        if reason.code == ROOT and (own_root or not whole_root):
            # Already root itself, or the disk is root only through another partition.
            continue
        inherited.append(Reason(reason.code, f"disk {disk} {reason.message}"))
    return inherited
