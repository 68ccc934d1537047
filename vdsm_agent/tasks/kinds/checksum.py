"""checksum: a digest of an image file or a block device (or a byte range of it)."""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import notes, paths
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    TaskKind,
    Verification,
)

ALGORITHMS = ("sha256", "sha1", "md5", "blake2b")
CHUNK = 1024 * 1024
# A human progress line at least every this many seconds, and at each 10%.
PRINT_EVERY = 10.0


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    raise AssertionError("unreachable")


class Checksum(TaskKind):
    name = "checksum"
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
                       "description": "First byte to read."},
            "length": {"type": "integer", "minimum": 0,
                       "description": "Bytes to read (default: to the end)."},
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
    def _target(cls, params: dict[str, Any], env: KindEnv) -> paths.Target:
        return paths.resolve(params["path"], env.allowed_roots, "params.params.path")

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        size = paths.size_of(cls._target(params, env))
        offset = params.get("offset", 0)
        length = params.get("length")
        if offset > size:
            raise errors.InvalidParams(f"offset {offset} is beyond the end ({size} bytes)",
                                       field="params.params.offset", rule="range")
        if length is not None and offset + length > size:
            raise errors.InvalidParams(
                f"offset + length ({offset + length}) is beyond the end ({size} bytes)",
                field="params.params.length", rule="range")

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        return [cls._target(params, env).resource]

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        try:
            return cls._verify(params, env)
        except (errors.RpcError, TaskFailure, OSError) as exc:
            return notes.cannot_verify(exc)

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        """Recompute the digest (reads the whole range: as long as the task itself).

        A digest cannot be checked without computing it, so "verified" means
        "computed now"; when the task's process had recorded a result before
        it was reset, the two must agree.
        """
        target = cls._target(params, env)
        fd = paths.open_checked(target)
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
        self.fd = -1
        self.total = 0

    def pre(self) -> None:
        target = self._target(self.params, self.ctx.env)
        self.fd = paths.open_checked(target)
        size = os.lseek(self.fd, 0, os.SEEK_END)
        offset = self.params.get("offset", 0)
        length = self.params.get("length")
        self.total = size - offset if length is None else length
        if offset + self.total > size:
            raise TaskFailure("RangeBeyondEnd", f"{target.path} has only {size} bytes")
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
                raise TaskFailure("ShortRead", f"unexpected end of data after {done} bytes")
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
        # Nothing was written; only the descriptor is released.
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


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
