"""One blocking collection of the device inventory (run it in a worker thread).

Sources, in order: pyudev + sysfs (the devices and their topology), blkid
(signatures), /proc/self/mountinfo, /proc/swaps and /sys/fs/btrfs (what is
mounted or active), LOOP_GET_STATUS64 (where loop devices keep their data).
The in-use verdict itself is ``vdsm_agent.devices.usage.evaluate``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vdsm_agent.devices import blkid, loop, procfs, sysfs, usage
from vdsm_agent.devices.sysfs import BlockFacts
from vdsm_agent.devices.usage import DevNum
from vdsm_agent.system import mountinfo
from vdsm_agent.system.mountinfo import MountEntry

log = logging.getLogger(__name__)

# blkid runs are independent; a few at a time keep a host with hundreds of
# LUNs fast, and one unresponsive device from delaying the others.
PROBE_WORKERS = 8
# Extra wait for probes beyond the command timeout (which kills blkid) before
# a device is reported as unprobed rather than holding up the whole list.
PROBE_GRACE = 5.0

Device = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Snapshot:
    devices: list[Device]  # sorted by kernel name; treat as read-only (shared by callers)
    by_devnum: Mapping[DevNum, Device]
    started: float  # time.monotonic() when the collection began
    duration: float  # seconds


def natural_key(name: str) -> tuple[Any, ...]:
    """loop2 before loop10, vda before vda1."""
    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", name))


def device_type(facts: BlockFacts) -> str:
    name = facts.name
    if facts.devtype == "partition":
        return "partition"
    if facts.dm_name is not None or name.startswith("dm-"):
        return "dm"
    if name.startswith("md"):
        return "md"
    if facts.devnum[0] == sysfs.LOOP_MAJOR or name.startswith("loop"):
        return "loop"
    for prefix, kind in (("zram", "zram"), ("nbd", "nbd"), ("rbd", "rbd"), ("sr", "rom")):
        if name.startswith(prefix):
            return kind
    return "disk"


def inherit_from_disks(facts: Sequence[BlockFacts]) -> list[BlockFacts]:
    """Partitions have no queue/ directory: take rotational and block size from the disk."""
    by_name = {item.name: item for item in facts}
    result: list[BlockFacts] = []
    for item in facts:
        disk = by_name.get(item.parent) if item.parent else None
        if disk is not None:
            item = dataclasses.replace(
                item,
                rotational=item.rotational if item.rotational is not None else disk.rotational,
                logical_block_size=item.logical_block_size or disk.logical_block_size)
        result.append(item)
    return result


def identity(facts: BlockFacts, by_id: Sequence[str], disk: BlockFacts | None) -> str:
    """A name that survives reboots and re-enumeration where the hardware allows one.

    A partition has no hardware IDs of its own; it takes its disk's with a
    -partN suffix (like udev's by-id links), so it never shares the disk's.
    """
    base, suffix = facts, ""
    if disk is not None and facts.partition_number is not None:
        base, suffix = disk, f"-part{facts.partition_number}"
    if base.wwn:
        return f"wwn:{base.wwn}{suffix}"
    if base.serial:
        return f"serial:{base.serial}{suffix}"
    if by_id:
        return by_id[0]
    major, minor = facts.devnum
    return f"dev:{major}:{minor}:{facts.size}"


def probe_signatures(devnodes: Sequence[str], timeout: float) -> dict[str, blkid.Signature]:
    """blkid for each device, a few at a time."""
    if not devnodes:
        return {}
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers=min(PROBE_WORKERS, len(devnodes)), thread_name_prefix="blkid")
    try:
        futures = {node: pool.submit(blkid.probe, node, timeout) for node in devnodes}
        concurrent.futures.wait(futures.values(), timeout=timeout + PROBE_GRACE)
    finally:
        # Never wait for a probe stuck in the kernel (D state survives SIGKILL).
        pool.shutdown(wait=False, cancel_futures=True)
    return {node: _probe_result(node, future) for node, future in futures.items()}


def _probe_result(node: str, future: concurrent.futures.Future[blkid.Signature],
                  ) -> blkid.Signature:
    if not future.done() or future.cancelled():
        log.warning("blkid %s did not finish; its signature is unknown", node)
        return blkid.failure("blkid did not finish")
    try:
        return future.result()
    except Exception as exc:
        # A bug in one probe must not cost the whole list.
        log.exception("blkid %s failed", node)
        return blkid.failure(f"probe failed: {exc}")


def _add_mountpoint(mounts: dict[DevNum, list[str]], devnum: DevNum, mountpoint: str) -> None:
    points = mounts.setdefault(devnum, [])
    if mountpoint not in points:
        points.append(mountpoint)


def mount_table(entries: Iterable[MountEntry]) -> dict[DevNum, list[str]]:
    """Mount points by the block device they are on."""
    mounts: dict[DevNum, list[str]] = {}
    for entry in entries:
        devnum = procfs.mount_devnum(entry)
        if devnum is not None:
            _add_mountpoint(mounts, devnum, entry.mount_point)
    return mounts


def root_devnums(entries: Sequence[MountEntry]) -> set[DevNum]:
    # The last mount on / is the one visible here (an initramfs rootfs may lie under it).
    for entry in reversed(entries):
        if entry.mount_point == "/":
            devnum = procfs.mount_devnum(entry)
            return {devnum} if devnum is not None else set()
    return set()


def spread_btrfs(mounts: dict[DevNum, list[str]], root: set[DevNum],
                 btrfs: Mapping[str, Sequence[str]], devnums: Mapping[str, DevNum],
                 ) -> dict[DevNum, str]:
    """Give every member of a mounted btrfs its mount points (and root status).

    Returns the members whose mount points are unknown, with a description.
    """
    unplaced: dict[DevNum, str] = {}
    for fsid, names in btrfs.items():
        members = [devnums[name] for name in names if name in devnums]
        points: list[str] = []
        for member in members:
            for point in mounts.get(member, []):
                if point not in points:
                    points.append(point)
        if any(member in root for member in members):
            root.update(members)
        for member in members:
            if points:
                mounts[member] = list(points)
            else:
                unplaced[member] = f"part of the mounted btrfs filesystem {fsid}"
    return unplaced


def active_swaps(swaps: Iterable[procfs.Swap], devnums: Mapping[str, DevNum]) -> set[DevNum]:
    """Block devices in use as swap (swap files are covered by their filesystem's mount)."""
    active: set[DevNum] = set()
    for swap in swaps:
        if swap.kind != "partition":
            continue
        devnum = procfs.block_devnum(swap.filename)
        if devnum is None:
            # The node may be gone or named differently here; the kernel name still matches.
            devnum = devnums.get(os.path.basename(swap.filename.removesuffix(" (deleted)")))
        if devnum is not None:
            active.add(devnum)
    return active


def host_state(facts: Sequence[BlockFacts]) -> usage.HostState:
    devnums = {item.name: item.devnum for item in facts}
    entries = mountinfo.read()
    mounts = mount_table(entries)
    root = root_devnums(entries)
    unplaced = spread_btrfs(mounts, root, sysfs.mounted_btrfs(), devnums)
    return usage.HostState(
        mounts={devnum: tuple(points) for devnum, points in mounts.items()},
        mounted_members=unplaced,
        swaps=frozenset(active_swaps(procfs.read_swaps(), devnums)),
        root=frozenset(root))


def loop_backing(facts: BlockFacts) -> usage.LoopBacking | None:
    if facts.backing_file is None:
        return None
    devnum = loop.backing_device(facts.devnode, facts.backing_file)
    if devnum is None:
        log.debug("%s: cannot tell where %s lives", facts.name, facts.backing_file)
        return None
    return usage.LoopBacking(loop=facts.name, file=facts.backing_file, device=devnum)


def to_node(facts: BlockFacts) -> usage.Node:
    return usage.Node(name=facts.name, devnum=facts.devnum, parent=facts.parent,
                      holders=facts.holders, slaves=facts.slaves,
                      backing=loop_backing(facts), alias=facts.dm_name)


def backed_loops(node: usage.Node, nodes_backed: Mapping[DevNum, list[usage.LoopBacking]],
                 partitions: Sequence[usage.Node]) -> list[str]:
    """Loop devices whose data lives on this device or on one of its partitions."""
    names = [backing.loop for backing in nodes_backed.get(node.devnum, [])]
    for partition in partitions:
        names.extend(backing.loop for backing in nodes_backed.get(partition.devnum, []))
    return sorted(set(names), key=natural_key)


def describe(facts: BlockFacts, node: usage.Node, signature: blkid.Signature,
             host: usage.HostState, reasons: Sequence[usage.Reason],
             partitions: Sequence[usage.Node], backs: Sequence[str], by_id: Sequence[str],
             disk: BlockFacts | None) -> Device:
    """The schema's Device object."""
    major, minor = facts.devnum
    return {
        "name": facts.name,
        "path": facts.devnode,
        "type": device_type(facts),
        "majorMinor": f"{major}:{minor}",
        "size": facts.size,
        "readOnly": facts.read_only,
        "removable": facts.removable,
        "rotational": facts.rotational,
        "logicalBlockSize": facts.logical_block_size,
        "model": facts.model,
        "serial": facts.serial,
        "wwn": facts.wwn,
        "byId": list(by_id),
        "identity": identity(facts, by_id, disk),
        "fstype": signature.fstype,
        "label": signature.label,
        "uuid": signature.uuid,
        "partitionTable": signature.partition_table,
        "probeError": signature.error,
        "parent": facts.parent,
        "partitions": [partition.name for partition in partitions],
        "mountpoints": list(host.mounts.get(facts.devnum, ())),
        "swap": facts.devnum in host.swaps,
        "holders": list(facts.holders),
        "slaves": list(facts.slaves),
        "backingFile": facts.backing_file,
        "backsLoops": list(backs),
        "inUse": bool(reasons),
        "inUseReasons": [reason.as_dict() for reason in reasons],
    }


def collect(timeout: float) -> Snapshot:
    """Collect the whole inventory; blocking, for a worker thread."""
    started = time.monotonic()
    facts = sorted(inherit_from_disks(sysfs.enumerate_block_devices()),
                   key=lambda item: natural_key(item.name))
    # An empty device (detached loop, ejected medium) has nothing to probe.
    signatures = probe_signatures([item.devnode for item in facts if item.size > 0], timeout)
    host = host_state(facts)
    nodes = [to_node(item) for item in facts]
    verdicts = usage.evaluate(nodes, host)
    links = sysfs.by_id_links()
    by_name = {item.name: item for item in facts}
    backed = usage.loops_backed_by(nodes)
    children: dict[str, list[usage.Node]] = {}
    for node in nodes:
        if node.parent is not None:
            children.setdefault(node.parent, []).append(node)
    devices: list[Device] = []
    for item, node in zip(facts, nodes, strict=True):
        partitions = children.get(item.name, [])
        devices.append(describe(
            item, node, signatures.get(item.devnode, blkid.NO_SIGNATURE), host,
            verdicts[item.name], partitions,
            backed_loops(node, backed, partitions), links.get(item.name, []),
            by_name.get(item.parent) if item.parent else None))
    by_devnum = {item.devnum: device for item, device in zip(facts, devices, strict=True)}
    return Snapshot(devices=devices, by_devnum=by_devnum, started=started,
                    duration=time.monotonic() - started)
