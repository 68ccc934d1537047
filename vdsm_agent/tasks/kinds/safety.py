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

Every check works on the device's **descriptor** (``paths.Target``): the
inventory's facts are those of its device number (``st_rdev`` of the
descriptor, not of a name looked up again), blkid reads ``/dev/fd/N``, and the
exclusive-open probe and the ``O_EXCL`` hold re-open the descriptor. So the
device judged is the device worked on, whatever happens to the names in /dev
meanwhile.
"""

from __future__ import annotations

import errno
import os
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
    """Re-open the device's descriptor with ``O_EXCL`` and keep it: no mount, swapon
    or mkfs meanwhile."""
    try:
        return target.reopen(flags | os.O_EXCL)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise busy_error(target.path) from None
        raise errors.InvalidParams(f"cannot open {target.path}: {exc.strerror or exc}",
                                   rule="open", path=target.path) from None


def inspect(target: paths.Target, timeout: float = PROBE_TIMEOUT) -> Device:
    """The inventory's Device object for the descriptor's block device (fresh, blocking).

    Found by the descriptor's device number, so the facts are about the device
    the task holds, not about whatever a name leads to by now.
    """
    from vdsm_agent.devices import blkid, collect, sysfs, usage

    devnum = os.major(target.info.st_rdev), os.minor(target.info.st_rdev)
    facts = sorted(collect.inherit_from_disks(sysfs.enumerate_block_devices()),
                   key=lambda item: collect.natural_key(item.name))
    found = next((item for item in facts if item.devnum == devnum), None)
    if found is None:
        raise errors.DeviceNotFound(f"no block device at {target.path}", path=target.path)
    signature = probe(target, timeout) if found.size > 0 else blkid.NO_SIGNATURE
    host = collect.host_state(facts)
    nodes = [collect.to_node(item) for item in facts]
    verdicts = usage.evaluate(nodes, host)
    node = nodes[facts.index(found)]
    partitions = [other for other in nodes if other.parent == found.name]
    backs = collect.backed_loops(node, usage.loops_backed_by(nodes), partitions)
    disk = next((item for item in facts if item.name == found.parent), None)
    return collect.describe(found, node, signature, host, verdicts[found.name], partitions,
                            backs, sysfs.by_id_links().get(found.name, []), disk)


def probe(target: paths.Target, timeout: float = PROBE_TIMEOUT) -> Signature:
    """``blkid -p`` of the descriptor's device (``/dev/fd/N``; a ``devices.blkid.Signature``)."""
    from vdsm_agent.devices import blkid
    from vdsm_agent.system import commands  # pulls in asyncio: only when needed

    try:
        result = commands.run(["blkid", "-p", "-o", "export", "--", target.fd_path],
                              timeout=timeout, pass_fds=(target.fd,))
    except (commands.CommandError, UnicodeDecodeError) as exc:
        return blkid.failure(str(exc))
    return blkid.interpret(result)


def check_not_in_use(target: paths.Target, device: Device) -> None:
    """DeviceInUse with the reasons, as ``Inventory.check_not_in_use`` decides (its
    exclusive-open probe done on the descriptor)."""
    from vdsm_agent.devices import inventory

    if device["inUse"]:
        raise inventory.in_use_error(target.path, device["inUseReasons"])
    try:
        busy = inventory.exclusive_open_probe(f"/proc/self/fd/{target.fd}")
    except errors.DeviceNotFound:
        raise errors.DeviceNotFound(f"no block device at {target.path}",
                                    path=target.path) from None
    if busy is not None:
        raise inventory.in_use_error(target.path, [busy.as_dict()])


def in_use_reasons(target: paths.Target, device: Device) -> list[dict[str, str]]:
    """The reasons without raising (for kinds that only warn, e.g. a read-only fsck)."""
    try:
        check_not_in_use(target, device)
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


def check_target(target: paths.Target, expect: Mapping[str, Any] | None,
                 destructive: bool = True) -> Device:
    """A device about to be worked on: expect first, then (if destructive) not in use."""
    device = inspect(target)
    check_expect(target.path, device, expect)
    if destructive:
        check_not_in_use(target, device)
    return device


def target_of(device: Device, target: paths.Target) -> dict[str, Any]:
    """What the task records about its device (its ``target`` in the result): the
    inventory's identity of the descriptor's device number."""
    return {"path": target.path, "identity": device["identity"], "size": device["size"]}


def file_target(target: paths.Target) -> dict[str, Any]:
    """What the task records about its file: identity and size from ``fstat`` of
    the descriptor (never a stat of the name)."""
    info = os.fstat(target.fd)
    return {"path": target.path, "identity": f"file:{info.st_dev}:{info.st_ino}",
            "size": info.st_size}


def describe_device(device: Device) -> str:
    """One human line: name, identity, size, signature."""
    signature = device["fstype"] or device["partitionTable"] or "no signature"
    if device["probeError"]:
        signature = f"signature unknown ({device['probeError']})"
    return (f"{device['path']} ({device['identity']}, {device['size']} bytes, "
            f"{signature})")


def loops_backed_by_file(target: paths.Target) -> list[dict[str, str]]:
    """In-use reasons for an image file that an attached loop device uses.

    Which file backs a loop device is the kernel's answer (``LOOP_GET_STATUS64``:
    the open file's st_dev and inode), compared with the descriptor's identity:
    right after a rename or an unlink, unlike the name sysfs shows.
    """
    from vdsm_agent.system import loopdev

    backing = loopdev.Backing.of(target.info)
    return [{"code": "backs-loop", "message": f"backs /dev/loop{number}"}
            for number in loopdev.bound_to(backing)]
