"""checksum: a digest of an image file or a block device (or a byte range of it).

The target is resolved once, to a descriptor (``paths``): at submit to check
it, in the task's process to read it (a re-open of that descriptor, kept to
the end), so the data digested is the inode that was checked.

A digest is a way to read data: with ``length: 1`` and chosen offsets, a
caller learns a byte per task (256 guesses), and sliding a longer window
whose other bytes are known (zeros, say) does the same. So, unless
``force`` (which needs the admin role: the schema's ``roleWhen``):

* a block device **in use** (the inventory's verdict: mounted, a mounted
  partition, swap, the root filesystem, backs a loop device, held open
  exclusively...) is refused with ``DeviceInUse`` and the reasons: its live
  filesystem holds other people's files;
* a range must start and end on ``GRANULE`` (1 MiB) boundaries, the end of
  the target counting as one: every digest then covers whole 1 MiB blocks
  that cannot be slid by a byte, so no byte can be guessed alone. A minimum
  length alone would not do: a window of 1 MiB moved by one byte at a time
  leaks a byte per step wherever the rest of the window is known.
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.tasks import resource_names
from vdsm_agent.tasks.kinds import notes, paths, safety
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    TaskKind,
    Verification,
)

ALGORITHMS = ("sha256", "sha1", "md5", "blake2b")
CHUNK = 1024 * 1024
# Without force, a range starts and ends on a multiple of this (or at the end).
GRANULE = 1024 * 1024
# A human progress line at least every this many seconds, and at each 10%.
PRINT_EVERY = 10.0
FIELD = "params.params.path"


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


def check_range(params: dict[str, Any], size: int) -> tuple[int, int]:
    """(offset, length) of the digest; InvalidParams when beyond the end."""
    offset = params.get("offset", 0)
    length = params.get("length")
    if offset > size:
        raise errors.InvalidParams(f"offset {offset} is beyond the end ({size} bytes)",
                                   field="params.params.offset", rule="range")
    if length is not None and offset + length > size:
        raise errors.InvalidParams(
            f"offset + length ({offset + length}) is beyond the end ({size} bytes)",
            field="params.params.length", rule="range")
    return offset, size - offset if length is None else length


def check_granularity(offset: int, length: int, size: int) -> None:
    """InvalidParams (rule "granularity") unless the range is whole 1 MiB blocks."""
    end = offset + length
    if offset % GRANULE:
        field, where = "params.params.offset", f"offset {offset}"
    elif end != size and end % GRANULE:
        field, where = "params.params.length", f"the end of the range ({end})"
    else:
        return
    raise errors.InvalidParams(
        f"{where} is not a multiple of {GRANULE} bytes: a range must start and end on "
        f"{GRANULE // (1024 * 1024)} MiB boundaries (the end of the target counts as one); "
        "smaller pieces need force=true (admin role)", field=field, rule="granularity",
        granule=GRANULE)


def device_in_use(target: paths.Target) -> list[dict[str, str]]:
    """The inventory's in-use reasons for the descriptor's device (none: free)."""
    return safety.in_use_reasons(target, safety.inspect(target))


def in_use_refusal(target: paths.Target, reasons: list[dict[str, str]]) -> errors.DeviceInUse:
    messages = "; ".join(reason["message"] for reason in reasons)
    return errors.DeviceInUse(f"{target.path} is in use: {messages}; a checksum of a device "
                              "in use needs force=true (admin role)", path=target.path,
                              reasons=reasons, field="params.params.force")


def check_policy(params: dict[str, Any], target: paths.Target, offset: int,
                 length: int, size: int) -> list[dict[str, str]]:
    """What a caller without ``force`` may not read (see the module): a device in use
    first (the whole of it is refused), then the range; the in-use reasons of a
    device read with ``force`` (to warn about)."""
    force = bool(params.get("force"))
    reasons = device_in_use(target) if target.kind == "device" else []
    if reasons and not force:
        raise in_use_refusal(target, reasons)
    if not force:
        check_granularity(offset, length, size)
    return reasons


class Checksum(TaskKind):
    name = "checksum"
    progress_unit = "bytes"
    # A digest only reads: two checksums of one image run together; a wipe or a
    # copy onto it still waits for them (ResourceBusy).
    shares_resources = True
    resource_params = {"path": resource_names.PATH}
    description = ("Digest of an image file under the allowed roots or of a block device "
                   "under /dev, optionally of a byte range; progress in bytes.")
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["path"],
        "additionalProperties": False,
        "properties": {
            "path": {"type": "string", "minLength": 2, "maxLength": 4096, "pattern": "^/",
                     "description": "Image file under an allowed root, or a block device."},
            "algorithm": {"enum": list(ALGORITHMS), "default": "sha256"},
            "offset": {"type": "integer", "minimum": 0, "default": 0,
                       "description": "First byte to read; a multiple of 1 MiB unless "
                                      "force."},
            "length": {"type": "integer", "minimum": 0,
                       "description": "Bytes to read (default: to the end); unless force, "
                                      "the range ends on a multiple of 1 MiB or at the end."},
            "force": {"type": "boolean", "default": False,
                      "description": "Read a block device in use, or a range that does not "
                                     "start and end on 1 MiB boundaries. Needs the admin "
                                     "role."},
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["checksum", "algorithm", "bytes"],
        "properties": {
            "checksum": {"type": "string", "description": "Lower-case hex digest."},
            "algorithm": {"enum": list(ALGORITHMS)},
            "bytes": {"type": "integer", "description": "Bytes digested."},
        },
    }

    @classmethod
    def _resolve(cls, params: dict[str, Any], env: KindEnv) -> paths.Target:
        return paths.resolve(params["path"], env.allowed_roots, FIELD)

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        if safety.in_child(env):
            return  # pre() resolves the target and repeats every check
        with cls._resolve(params, env) as target:
            size = paths.size_of(target, FIELD)
            offset, length = check_range(params, size)
            check_policy(params, target, offset, length, size)

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        with cls._resolve(params, env) as target:
            return [paths.resource(target)]

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        try:
            with cls._resolve(params, env) as target:
                return cls._verify(params, env, target)
        except (errors.RpcError, TaskFailure, OSError) as exc:
            return notes.cannot_verify(exc)

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv,
                target: paths.Target) -> Verification:
        """Recompute the digest (reads the whole range: as long as the task itself).

        A digest cannot be checked without computing it, so "verified" means
        "computed now"; when the task's process had recorded a result before
        it was reset, the two must agree.
        """
        fd = paths.open_data(target)
        try:
            size = os.lseek(fd, 0, os.SEEK_END)
            offset = params.get("offset", 0)
            length = params.get("length")
            total = size - offset if length is None else length
            if offset + total > size:
                return Verification(False, f"{target.path} has only {size} bytes now")
            digest = hashlib.new(params["algorithm"])
            os.posix_fadvise(fd, offset, total, os.POSIX_FADV_SEQUENTIAL)
            done = 0
            while done < total:
                data = os.pread(fd, min(CHUNK, total - done), offset + done)
                if not data:
                    return Verification(False, f"{target.path}: short read at {done} bytes")
                digest.update(data)
                done += len(data)
        finally:
            os.close(fd)
        result = {"checksum": digest.hexdigest(), "algorithm": params["algorithm"],
                  "bytes": done}
        recorded = notes.outcome_result(env)
        if recorded is not None and recorded.get("checksum") != result["checksum"]:
            return Verification(False, f"recomputed {result['checksum']}, the task recorded "
                                       f"{recorded.get('checksum')}: the data changed")
        return Verification(True, f"recomputed the {params['algorithm']} digest of "
                                  f"{target.path}", result)

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.target: paths.Target | None = None  # the descriptor, held to the end
        self.fd = -1  # its re-open, for reading
        self.total = 0

    def pre(self) -> None:
        self.target = target = self._resolve(self.params, self.ctx.env)
        self.fd = paths.open_data(target, os.O_RDONLY, FIELD)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        offset = self.params.get("offset", 0)
        length = self.params.get("length")
        self.total = size - offset if length is None else length
        if offset + self.total > size:
            raise TaskFailure(Failure.RANGE_BEYOND_END, f"{target.path} has only {size} bytes")
        reasons = check_policy(self.params, target, offset, self.total, size)
        if reasons:
            self.ctx.warn(f"{target.path} is in use ("
                          + "; ".join(reason["message"] for reason in reasons)
                          + "): read with force")
        self.ctx.print(f"checksum {self.params['algorithm']} of {target.path}: "
                       f"{human_bytes(self.total)} from offset {offset}")

    def perform(self) -> dict[str, Any]:
        algorithm = self.params["algorithm"]
        digest = hashlib.new(algorithm)
        offset = self.params.get("offset", 0)
        buffer = bytearray(CHUNK)
        view = memoryview(buffer)
        os.posix_fadvise(self.fd, offset, self.total, os.POSIX_FADV_SEQUENTIAL)
        done = 0
        reporter = _ProgressLines(self.ctx, self.total)
        self.ctx.progress(0, self.total)
        while done < self.total:
            self.ctx.check_cancel()
            count = os.preadv(self.fd, [view[:min(CHUNK, self.total - done)]], offset + done)
            if count == 0:
                raise TaskFailure(Failure.SHORT_READ, f"unexpected end of data after {done} bytes")
            digest.update(view[:count])
            done += count
            self.ctx.progress(done, self.total)
            reporter.maybe_print(done)
            self.ctx.throttle(count)
        value = digest.hexdigest()
        self.ctx.print(f"{algorithm} {value} ({done} bytes)")
        return {"checksum": value, "algorithm": algorithm, "bytes": done}

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self.cleanup()
        return result

    def cleanup(self) -> None:
        # Nothing was written; only the descriptors are released.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.target is not None:
            self.target.close()
            self.target = None


class _ProgressLines:
    """Human progress lines: one per 10% step, and at least every PRINT_EVERY s."""

    def __init__(self, ctx: TaskContext, total: int) -> None:
        self.ctx = ctx
        self.total = total
        self.started = time.monotonic()
        self.last_print = self.started
        self.last_decile = 0

    def maybe_print(self, done: int) -> None:
        now = time.monotonic()
        decile = done * 10 // self.total if self.total else 10
        if decile == self.last_decile and now - self.last_print < PRINT_EVERY:
            return
        if done >= self.total:
            return  # the result line follows
        self.last_decile = decile
        self.last_print = now
        elapsed = max(now - self.started, 1e-6)
        self.ctx.print(f"{done * 100 // max(self.total, 1)}% {human_bytes(done)} of "
                       f"{human_bytes(self.total)}, {human_bytes(done / elapsed)}/s")
