"""Device facts and safety checks for the kinds that work on block devices.

The same code runs twice for every task: at submit, in the agent (the
kind's ``validate``, in a worker thread), and again in the task's child
process at the moment the work starts (``validate`` once more, then the
kind's ``pre``), so a device mounted while the task waited in the queue is
refused then and nothing is written.

The verdict is the inventory's (``vdsm_agent.devices``): the same sysfs,
mountinfo, swap and loop-backing facts evaluated by ``usage.evaluate``, plus
the exclusive-open (``O_EXCL``) probe of ``Inventory.check_not_in_use``. Only
the target device is probed with blkid, so the check stays cheap on a host
with hundreds of LUNs. The inventory's async ``Inventory`` is not used here:
it lives on the agent's event loop, and the child has no loop at all.

The device modules are imported by the functions that use them: they pull
in pyudev and asyncio (~0.1 s of CPU), which a task process that never
looks at a device (a checksum or copy of image files) need not pay for.

In the task's process the kinds' ``validate`` leaves these checks to
``pre``, which runs right after it and keeps the facts (``in_child``).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import paths
from vdsm_agent.tasks.kinds.base import KindEnv

if TYPE_CHECKING:
    from vdsm_agent.devices.blkid import Signature

# blkid of the target: the agent's command_timeout default.
PROBE_TIMEOUT = 30.0

Device = dict[str, Any]

DEVICE_SCHEMA: dict[str, Any] = {
    "type": "string", "minLength": 6, "maxLength": 4096, "pattern": "^/",
    "description": "A block device under /dev (symlinks such as /dev/disk/by-id/... are "
                   "resolved first).",
}

EXPECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "description": "Precondition: what the caller last saw in getDeviceList. When the device "
                   "no longer matches at submit or when the work starts: PreconditionFailed "
                   "and nothing runs. null for fstype/uuid/serial means 'none'.",
    "properties": {
        "size": {"type": "integer", "minimum": 0, "description": "Bytes."},
        "fstype": {"type": ["string", "null"], "maxLength": 64},
        "uuid": {"type": ["string", "null"], "maxLength": 128},
        "serial": {"type": ["string", "null"], "maxLength": 256},
        "identity": {"type": "string", "maxLength": 512,
                     "description": "getDeviceList's stable identity of the device."},
    },
}

TARGET_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The device (or file) the task worked on, as seen when the work started: "
                   "path, stable identity (getDeviceList's identity; for a file "
                   "file:<st_dev>:<inode>) and size in bytes.",
    "required": ["path", "identity", "size"],
    "properties": {
        "path": {"type": "string"},
        "identity": {"type": "string"},
        "size": {"type": "integer"},
    },
}


def in_child(env: KindEnv) -> bool:
    """Whether this runs in the task's own process (where ``pre`` checks the device)."""
    return env.task_id is not None


def in_use_error(path: str, reasons: list[dict[str, str]]) -> errors.DeviceInUse:
    from vdsm_agent.devices import inventory

    return inventory.in_use_error(path, reasons)


def busy_error(path: str) -> errors.DeviceInUse:
    from vdsm_agent.devices import usage

    return in_use_error(path, [usage.Reason(
        usage.BUSY, "held open exclusively by another process").as_dict()])


def open_exclusive(target: paths.Target, flags: int) -> int:
    """Open a device with ``O_EXCL`` and keep it: no mount, swapon or mkfs meanwhile."""
    try:
        return paths.open_checked(target, flags | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise busy_error(target.path) from None
        raise


def resolve_device(path: str, field: str) -> paths.Target:
    """The resolved block device a ``device`` param names; raise ``errors.*``.

    Like ``paths.resolve`` for ``/dev``: absent is DeviceNotFound, anything
    but a block device (a character device, a regular file, a path that
    resolves outside /dev) is PathNotAllowed.
    """
    if "\0" in path or not path.startswith("/"):
        raise errors.InvalidParams("must be an absolute path", field=field, rule="path")
    real = os.path.realpath(path)
    if not real.startswith(paths.DEV):
        raise errors.PathNotAllowed(f"{path} is not a block device under /dev (resolves to "
                                    f"{real})", field=field, path=path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        raise errors.DeviceNotFound(f"{path} does not exist", field=field, path=path) from None
    if not stat.S_ISBLK(mode):
        raise errors.PathNotAllowed(f"{path} is under /dev but is not a block device",
                                    field=field, path=path)
    return paths.Target("device", real)


def inspect(path: str, timeout: float = PROBE_TIMEOUT) -> Device:
    """The inventory's Device object for the block device at ``path`` (fresh, blocking)."""
    from vdsm_agent.devices import blkid, collect, procfs, sysfs, usage

    devnum = procfs.block_devnum(path)
    facts = sorted(collect.inherit_from_disks(sysfs.enumerate_block_devices()),
                   key=lambda item: collect.natural_key(item.name))
    target = next((item for item in facts if item.devnum == devnum), None)
    if devnum is None or target is None:
        raise errors.DeviceNotFound(f"no block device at {path}", path=path)
    signature = blkid.probe(target.devnode, timeout) if target.size > 0 else blkid.NO_SIGNATURE
    host = collect.host_state(facts)
    nodes = [collect.to_node(item) for item in facts]
    verdicts = usage.evaluate(nodes, host)
    node = nodes[facts.index(target)]
    partitions = [other for other in nodes if other.parent == target.name]
    backs = collect.backed_loops(node, usage.loops_backed_by(nodes), partitions)
    disk = next((item for item in facts if item.name == target.parent), None)
    return collect.describe(target, node, signature, host, verdicts[target.name], partitions,
                            backs, sysfs.by_id_links().get(target.name, []), disk)


def probe(path: str) -> Signature:
    """``blkid -p`` of one device (a ``devices.blkid.Signature``)."""
    from vdsm_agent.devices import blkid

    return blkid.probe(path, PROBE_TIMEOUT)


def check_not_in_use(path: str, device: Device) -> None:
    """DeviceInUse with the reasons, as ``Inventory.check_not_in_use`` decides."""
    from vdsm_agent.devices import inventory

    if device["inUse"]:
        raise inventory.in_use_error(path, device["inUseReasons"])
    busy = inventory.exclusive_open_probe(path)
    if busy is not None:
        raise inventory.in_use_error(path, [busy.as_dict()])


def in_use_reasons(path: str, device: Device) -> list[dict[str, str]]:
    """The reasons without raising (for kinds that only warn, e.g. a read-only fsck)."""
    try:
        check_not_in_use(path, device)
    except errors.DeviceInUse as exc:
        return list(exc.data["reasons"])
    return []


def check_expect(path: str, device: Device, expect: Mapping[str, Any] | None) -> None:
    """PreconditionFailed when the device no longer matches what the caller saw."""
    if not expect:
        return
    mismatches: list[dict[str, Any]] = []
    for field in ("size", "fstype", "uuid", "serial", "identity"):
        if field not in expect:
            continue
        wanted = expect[field]
        actual = device.get(field)
        if field in ("fstype", "uuid") and device.get("probeError"):
            mismatches.append({"field": field, "expected": wanted, "actual": None,
                               "detail": f"unknown: {device['probeError']}"})
        elif actual != wanted:
            mismatches.append({"field": field, "expected": wanted, "actual": actual})
    if mismatches:
        described = ", ".join(f"{m['field']} is {m['actual']!r}, expected {m['expected']!r}"
                              for m in mismatches)
        raise errors.PreconditionFailed(
            f"{path} changed since the caller saw it: {described}", path=path,
            identity=device["identity"], mismatches=mismatches)


def check_target(path: str, expect: Mapping[str, Any] | None,
                 destructive: bool = True) -> Device:
    """A device about to be worked on: expect first, then (if destructive) not in use."""
    device = inspect(path)
    check_expect(path, device, expect)
    if destructive:
        check_not_in_use(path, device)
    return device


def target_of(device: Device, path: str) -> dict[str, Any]:
    """What the task records about its device (its ``target`` in the result)."""
    return {"path": path, "identity": device["identity"], "size": device["size"]}


def file_target(path: str) -> dict[str, Any]:
    info = os.stat(path)
    return {"path": path, "identity": f"file:{info.st_dev}:{info.st_ino}",
            "size": info.st_size}


def describe_device(device: Device) -> str:
    """One human line: name, identity, size, signature."""
    signature = device["fstype"] or device["partitionTable"] or "no signature"
    if device["probeError"]:
        signature = f"signature unknown ({device['probeError']})"
    return (f"{device['path']} ({device['identity']}, {device['size']} bytes, "
            f"{signature})")


def loops_backed_by_file(path: str, sys_block: str = "/sys/block") -> list[dict[str, str]]:
    """In-use reasons for an image file that an attached loop device uses.

    Reads ``loop/backing_file`` of each loop device in sysfs (what the
    inventory reads too) and compares the file's identity, not its name.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return []
    reasons: list[dict[str, str]] = []
    try:
        names = sorted(name for name in os.listdir(sys_block) if name.startswith("loop"))
    except OSError:
        return []
    for name in names:
        try:
            with open(os.path.join(sys_block, name, "loop", "backing_file"), "rb") as file:
                backing_file = os.fsdecode(file.read().rstrip(b"\n"))
            backing = os.stat(backing_file)
        except (OSError, ValueError):
            continue  # not attached, or its file is gone
        if (backing.st_dev, backing.st_ino) == (info.st_dev, info.st_ino):
            reasons.append({"code": "backs-loop", "message": f"backs /dev/{name}"})
    return reasons
