"""wipe: zero or discard a block device, or a byte range of it.

``zero`` writes zeros with direct I/O (``O_DIRECT``, page-aligned mmap
buffers, 8 MiB per write); unaligned edges of the range are zeroed by
read-modify-write of their logical block. ``discard`` issues ``BLKDISCARD``
in chunks (progress and cancel between them); the parts of the range that
are not aligned to the device's discard granularity are zeroed instead (a
warning says so). A device that cannot discard at all fails the task with
``DiscardNotSupported`` before anything is written: silently writing zeros
instead could allocate a whole thin-provisioned LUN.

The device is resolved once, to a descriptor (``paths``), checked through
it (the inventory's facts of its device number) and held open with
``O_EXCL`` (a re-open of that descriptor) for the whole work, so nobody can
mount it, swapon it or run mkfs on it meanwhile. A wipe cannot be rolled
back: a cancel stops it between two writes and the output says how far it
got.
"""

from __future__ import annotations

import collections
import concurrent.futures
import errno
import os
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.tasks.kinds import blockio, notes, paths, safety
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    Verification,
)
from vdsm_agent.tasks.kinds.device import DeviceKind
from vdsm_agent.tasks.kinds.tools import ProgressLines, human_bytes

CHUNK = 8 * 1024 * 1024  # bytes per direct write
IN_FLIGHT = 2  # direct writes queued at once: the device never waits for the next one
DISCARD_CHUNK = 1024 * 1024 * 1024  # bytes per BLKDISCARD request (progress, cancel)
METHODS = ("zero", "discard")


def _range(params: dict[str, Any], size: int) -> tuple[int, int]:
    offset = int(params.get("offset", 0))
    length = params.get("length")
    return offset, (size - offset if length is None else int(length))


def check_range(params: dict[str, Any], size: int) -> tuple[int, int]:
    """(offset, length) of the work; InvalidParams when beyond the device's end."""
    offset, length = _range(params, size)
    if offset > size:
        raise errors.InvalidParams(f"offset {offset} is beyond the end ({size} bytes)",
                                   field="params.params.offset", rule="range")
    if offset + length > size:
        raise errors.InvalidParams(
            f"offset + length ({offset + length}) is beyond the end ({size} bytes)",
            field="params.params.length", rule="range")
    return offset, length


class Wipe(DeviceKind):
    name = "wipe"
    progress_unit = "bytes"
    description = ("Zero (direct I/O) or discard a block device or a byte range of it; "
                   "refuses a device in use; progress in bytes.")
    destructive = True
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["device"],
        "additionalProperties": False,
        "properties": {
            "device": safety.DEVICE_SCHEMA,
            "method": {"enum": list(METHODS), "default": "zero",
                       "description": "zero: write zeros; discard: BLKDISCARD."},
            "offset": {"type": "integer", "minimum": 0, "default": 0,
                       "description": "First byte to wipe."},
            "length": {"type": "integer", "minimum": 0,
                       "description": "Bytes to wipe (default: to the end)."},
            "expect": safety.EXPECT_SCHEMA,
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["bytes", "method", "target"],
        "properties": {
            "bytes": {"type": "integer", "description": "Bytes wiped."},
            "method": {"enum": list(METHODS)},
            "discarded": {"type": "integer", "description": "Of those, bytes discarded."},
            "target": safety.TARGET_SCHEMA,
            "verified": {"type": "boolean", "description": "Set by verify (resetTaskState)."},
        },
    }

    @classmethod
    def _check(cls, params: dict[str, Any], target: paths.Target) -> dict[str, Any]:
        device = safety.check_target(target, params.get("expect"))
        check_range(params, device["size"])
        return device

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        with cls._resolve(params) as target:
            return cls._verify_on(params, env, target)

    @classmethod
    def _verify_on(cls, params: dict[str, Any], env: KindEnv,
                   target: paths.Target) -> Verification:
        device = safety.inspect(target)
        recorded = notes.load(env).get("target")
        if recorded and recorded["identity"] != device["identity"]:
            return Verification(False, f"{target.path} is now {device['identity']}, not the "
                                       f"wiped {recorded['identity']}")
        offset, length = check_range(params, device["size"])
        fd = paths.open_data(target, os.O_RDONLY | os.O_DIRECT)
        try:
            found = blockio.zero_samples(fd, offset, length, blockio.logical_block_size(fd))
        finally:
            os.close(fd)
        if found is not None:
            return Verification(False, f"non-zero data at offset {found} of {target.path}")
        return Verification(True, f"{target.path}: sampled the range, all zeros", {
            "bytes": length, "method": params["method"],
            "target": safety.target_of(device, target), "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.device: paths.Target | None = None  # the O_PATH descriptor, held to the end
        self.fd = -1  # its O_EXCL re-open, for the I/O
        self.path = ""
        self.offset = 0
        self.length = 0
        self.done = 0
        self.discarded = 0
        self.target: dict[str, Any] = {}
        self.reporter = ProgressLines(ctx, 0, "wiped")

    def pre(self) -> None:
        self.device = target = self._resolve(self.params)
        self.path = target.path
        device = self._check(self.params, target)
        self.offset, self.length = check_range(self.params, device["size"])
        # O_EXCL: held until the end, nobody mounts or formats the device meanwhile.
        self.fd = safety.open_exclusive(target, os.O_RDWR | os.O_DIRECT)
        self.target = safety.target_of(device, target)
        # Only verify's identity check reads it: not worth an fsync before the work.
        notes.save(self.ctx.env, durable=False, target=self.target)
        self.ctx.print(f"wipe ({self.params['method']}) of {safety.describe_device(device)}: "
                       f"{human_bytes(self.length)} from offset {self.offset}")

    def perform(self) -> dict[str, Any]:
        block = blockio.logical_block_size(self.fd)
        self.ctx.progress(0, self.length)
        self.reporter = ProgressLines(self.ctx, self.length, "wiped")
        with blockio.AlignedBuffer(CHUNK) as buffer:
            if self.params["method"] == "discard":
                self._discard(buffer, block)
            else:
                self._zero(buffer, self.offset, self.offset + self.length, block)
        os.fsync(self.fd)
        self.ctx.print(f"wiped {self.done} bytes"
                       + (f" ({self.discarded} discarded)" if self.discarded else ""))
        result: dict[str, Any] = {"bytes": self.done, "method": self.params["method"],
                                  "target": self.target}
        if self.params["method"] == "discard":
            result["discarded"] = self.discarded
        return result

    def _advance(self, count: int) -> None:
        self.done += count
        self.ctx.progress(self.done, self.length)
        self.reporter.maybe_print(self.done)
        self.ctx.throttle(count)

    def _zero(self, buffer: blockio.AlignedBuffer, start: int, end: int, block: int) -> None:
        """Write zeros over ``[start, end)``: direct writes, edges by read-modify-write."""
        head, (first, last), tail = blockio.split_aligned(start, end - start, block)
        if head is not None:
            blockio.zero_partial(self.fd, block, *head)
            self._advance(head[1] - head[0])
        # The buffer only ever holds zeros, so the writers share it.
        pending: collections.deque[tuple[concurrent.futures.Future[None], int]] = \
            collections.deque()
        pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT, thread_name_prefix="wipe")
        try:
            position = first
            while position < last or pending:
                while position < last and len(pending) < IN_FLIGHT:
                    self.ctx.check_cancel()
                    count = min(CHUNK, last - position)
                    pending.append((pool.submit(blockio.write_all, self.fd,
                                                buffer.view[:count], position), count))
                    position += count
                future, count = pending.popleft()
                future.result()
                self._advance(count)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            for future, count in pending:  # written after all (a cancel or an error)
                if not future.cancelled() and future.exception() is None:
                    self.done += count
            pending.clear()
        if tail is not None:
            blockio.zero_partial(self.fd, block, *tail)
            self._advance(tail[1] - tail[0])

    def _discard(self, buffer: blockio.AlignedBuffer, block: int) -> None:
        granularity, max_bytes = blockio.discard_limits(os.fstat(self.fd).st_rdev)
        if max_bytes <= 0:
            raise TaskFailure(Failure.DISCARD_NOT_SUPPORTED,
                              f"{self.path} does not support discard "
                              "(queue/discard_max_bytes is 0); use method=zero",
                              path=self.path)
        granularity = max(granularity, block)
        start, end = self.offset, self.offset + self.length
        first = min(-(-start // granularity) * granularity, end)
        last = max(end - end % granularity, first)
        step = max(min(DISCARD_CHUNK, max_bytes) // granularity * granularity, granularity)
        edges = (first - start) + (end - last)
        if edges:
            self.ctx.warn(f"{edges} bytes at the edges of the range are not aligned to the "
                          f"discard granularity ({granularity} bytes); they were zeroed")
            self._zero(buffer, start, first, block)
        position = first
        while position < last:
            self.ctx.check_cancel()
            count = min(step, last - position)
            try:
                blockio.discard(self.fd, position, count)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.EIO):
                    raise
                if position == first:
                    raise TaskFailure(Failure.DISCARD_NOT_SUPPORTED,
                                      f"{self.path} refused to discard: {exc.strerror}; "
                                      "use method=zero", path=self.path) from None
                self.ctx.warn(f"discard failed at offset {position} ({exc.strerror}); "
                              f"{count} bytes zeroed instead")
                self._zero(buffer, position, position + count, block)
                position += count
                continue
            position += count
            self.discarded += count
            self._advance(count)
        if end > last:
            self._zero(buffer, last, end, block)

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self.cleanup()
        return result

    def cleanup(self) -> None:
        # A wipe cannot be undone; say how far it got and release the device.
        if self.fd >= 0:
            if self.done == 0 and self.length:
                self.ctx.print("stopped before anything was written")
            elif self.done < self.length:
                self.ctx.print(f"stopped after {self.done} of {self.length} bytes; "
                               "the data in that part is gone")
            os.close(self.fd)
            self.fd = -1
        if self.device is not None:
            self.device.close()
            self.device = None
