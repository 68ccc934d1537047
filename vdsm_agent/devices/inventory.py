"""The device inventory: ``getDeviceList`` and the in-use check of destructive tasks.

A collection (``vdsm_agent.devices.collect``) is blocking I/O (sysfs, /proc,
one blkid per device), so it always runs in a worker thread. Like VDSM's
``samplingmethod``, concurrent callers share one in-flight collection instead
of each starting their own: a burst of ``getDeviceList`` calls costs one scan.

Freshness: ``list`` joins a collection that is already running, which may
have started a moment before the call. ``device`` and ``check_not_in_use``
must not miss a mount made just before they were called (a destructive task
relies on them), so they wait for a collection that started after their call.
"""

from __future__ import annotations

import asyncio
import copy
import errno
import logging
import os
from collections.abc import Sequence
from typing import Any

from vdsm_agent.devices import collect, procfs, usage
from vdsm_agent.devices.collect import Device, Snapshot
from vdsm_agent.devices.usage import DevNum
from vdsm_agent.errors import DeviceInUse, DeviceNotFound
from vdsm_agent.settings import Config

log = logging.getLogger(__name__)

# errno values of an exclusive open that mean "no such device" rather than "busy".
_GONE = frozenset((errno.ENOENT, errno.ENXIO, errno.ENODEV))


def resolve_paths(paths: Sequence[str]) -> list[DevNum | None]:
    """Device numbers of the block devices at ``paths`` (symlinks followed)."""
    return [procfs.block_devnum(path) for path in paths]


def exclusive_open_probe(path: str) -> usage.Reason | None:
    """Try to claim the device exclusively, and let it go at once.

    The kernel refuses (EBUSY) when anything holds the device: a mount in
    another mount namespace, swap, dm/md, an exclusive opener such as a
    running mkfs, or a claimed partition of a disk. The tables behind the
    verdict cannot see all of these. Only done right before a destructive
    operation: doing it in every listing could make a concurrent mount fail.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return usage.Reason(usage.BUSY, "held open exclusively by the kernel or another "
                                            "process (e.g. mounted in another mount namespace)")
        if exc.errno in _GONE:
            raise DeviceNotFound(f"no block device at {path}", path=path) from None
        raise
    os.close(fd)
    return None


def in_use_error(path: str, reasons: list[dict[str, str]]) -> DeviceInUse:
    messages = "; ".join(reason["message"] for reason in reasons)
    return DeviceInUse(f"{path} is in use: {messages}", path=path, reasons=reasons)


def not_found(path: str) -> DeviceNotFound:
    return DeviceNotFound(f"no block device at {path}", path=path)


class Inventory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._running: asyncio.Task[Snapshot] | None = None
        self.last_duration: float | None = None  # seconds, of the last finished collection

    async def list(self, paths: list[str] | None = None) -> list[dict[str, Any]]:
        """All block devices, or those at ``paths`` in that order (DeviceNotFound if any is not).

        The dicts are shared with concurrent callers of the same collection:
        treat them as read-only.
        """
        if paths is None:
            snapshot = await self._snapshot(fresh=False)
            return list(snapshot.devices)
        devnums = await asyncio.to_thread(resolve_paths, paths)
        snapshot = await self._snapshot(fresh=False)
        return [self._pick(snapshot, path, devnum)
                for path, devnum in zip(paths, devnums, strict=True)]

    async def device(self, path: str) -> dict[str, Any]:
        """One device, from a collection that started after this call (a private copy)."""
        devnum = await asyncio.to_thread(procfs.block_devnum, path)
        snapshot = await self._snapshot(fresh=True)
        return copy.deepcopy(self._pick(snapshot, path, devnum))

    async def check_not_in_use(self, path: str) -> dict[str, Any]:
        """The device at ``path`` if nothing uses it; DeviceInUse with the reasons otherwise."""
        device = await self.device(path)
        if device["inUse"]:
            raise in_use_error(path, device["inUseReasons"])
        busy = await asyncio.to_thread(exclusive_open_probe, path)
        if busy is not None:
            raise in_use_error(path, [busy.as_dict()])
        return device

    @staticmethod
    def _pick(snapshot: Snapshot, path: str, devnum: DevNum | None) -> Device:
        device = snapshot.by_devnum.get(devnum) if devnum is not None else None
        if device is None:
            raise not_found(path)
        return device

    async def _snapshot(self, fresh: bool) -> Snapshot:
        running = self._running
        if fresh and running is not None and not running.done():
            # It started before this call and may predate a change the caller
            # just made: let it finish, then share the next one.
            await asyncio.wait([running])
        task = self._running
        if task is None or task.done():
            task = self._start()
        # shield: a caller that gives up (cancelled RPC) must not cancel the
        # collection other callers are waiting for.
        return await asyncio.shield(task)

    def _start(self) -> asyncio.Task[Snapshot]:
        task = asyncio.create_task(self._collect(), name="device-inventory")
        task.add_done_callback(self._finished)
        self._running = task
        return task

    async def _collect(self) -> Snapshot:
        snapshot = await asyncio.to_thread(collect.collect, self.config.command_timeout)
        log.debug("device inventory: %d devices in %.3fs", len(snapshot.devices),
                  snapshot.duration)
        return snapshot

    def _finished(self, task: asyncio.Task[Snapshot]) -> None:
        if self._running is task:
            self._running = None
        if task.cancelled():
            return
        # Retrieve the outcome so that a failure nobody waited for is logged once.
        exc = task.exception()
        if exc is not None:
            log.error("device inventory failed: %s", exc, exc_info=exc)
        else:
            self.last_duration = task.result().duration

