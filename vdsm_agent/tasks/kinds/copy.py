"""copy: ``qemu-img convert`` between image files (under the allowed roots) and block devices.

* Formats: ``raw`` and ``qcow2`` only (a small attack surface). Without
  ``sourceFormat`` the source is probed once with ``qemu-img info`` and the
  probed format is then passed explicitly (``-f``); a qcow2 backing chain
  must stay under the allowed roots (or on block devices), checked image by
  image without letting qemu-img open anything it names first.
* Destination: an image file (created by the task when missing and
  ``create`` is true; ``create=false`` needs it to exist and writes into it
  with ``-n``) or a block device, which gets the same safety checks as a
  wipe (never in use; ``expect``) and is held open with ``O_EXCL`` while
  qemu-img writes, so nobody mounts it meanwhile. A raw device must be at
  least the source's virtual size.
* Raw destinations are written with ``-W`` (out-of-order writes, as oVirt
  does for raw targets): about 30% faster here; qcow2 ones are not (their
  clusters would be allocated out of order).
* Progress from ``qemu-img convert -p`` (its ``(NN.NN/100%)`` updates, ended
  by ``\\r``), in bytes of the source's virtual size; ``task_io_rate_limit``
  becomes ``-r``.
* Rollback: after a failure or a cancel, a destination file the task created
  itself is removed (checked by inode, so never a file that existed before
  or that someone put in its place).
"""

from __future__ import annotations

import json
import os
import re
import stat
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.tasks.kinds import notes, paths, safety, tools
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    TaskKind,
    Verification,
)
from vdsm_agent.tasks.kinds.device import guarded_verify

FORMATS = ("raw", "qcow2")
INFO_TIMEOUT = 60.0
COMPARE_TIMEOUT = 6 * 3600.0
MAX_CHAIN = 16
PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
PATH_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 2, "maxLength": 4096,
                               "pattern": "^/"}


def resolve_destination(path: str, roots: tuple[str, ...],
                        field: str) -> tuple[paths.Target, bool]:
    """The confined destination and whether it exists (a file may be missing)."""
    if "\0" in path or not path.startswith("/"):
        raise errors.InvalidParams("must be an absolute path", field=field, rule="path")
    real = os.path.realpath(path)
    if real.startswith(paths.DEV) or real == paths.DEV.rstrip("/"):
        return safety.resolve_device(path, field), True
    if not os.path.lexists(real):
        # Confine the would-be file like an existing one (its directory must exist).
        resolved_roots = tuple(os.path.realpath(root) for root in roots)
        if not any(real.startswith(root.rstrip("/") + "/") for root in resolved_roots):
            raise errors.PathNotAllowed(
                f"{path} is not under an allowed root (configured: "
                f"{', '.join(resolved_roots) or 'none'})", field=field, path=path)
        if not os.path.isdir(os.path.dirname(real)):
            raise errors.InvalidParams(f"the directory of {path} does not exist", field=field,
                                       rule="exists")
        return paths.Target("file", real), False
    return paths.resolve(path, roots, field), True


def image_info(path: str, fmt: str | None, field: str) -> dict[str, Any]:
    """``qemu-img info`` of one image (never its backing chain)."""
    from vdsm_agent.system import commands  # pulls in asyncio: only when needed

    argv = ["qemu-img", "info", "--output=json", *(["-f", fmt] if fmt else []), "--", path]
    try:
        result = commands.run(argv, timeout=INFO_TIMEOUT)
    except commands.CommandError as exc:
        raise errors.InvalidParams(f"cannot inspect {path}: {exc}", field=field,
                                   rule="image") from None
    if not result.ok:
        raise errors.InvalidParams(f"qemu-img cannot read {path}: {result.stderr.strip()}",
                                   field=field, rule="image")
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    return info


def source_info(path: str, fmt: str | None, roots: tuple[str, ...],
                field: str) -> dict[str, Any]:
    """The source's info; its format must be allowed and its backing chain confined."""
    info = image_info(path, fmt, field)
    if info.get("format") not in FORMATS:
        raise errors.InvalidParams(f"{path} is a {info.get('format')} image; copy reads "
                                   f"{', '.join(FORMATS)}", field=field, rule="format")
    current, depth = info, 0
    while "backing-filename" in current:
        depth += 1
        backing = current.get("full-backing-filename") or current["backing-filename"]
        if depth > MAX_CHAIN or not isinstance(backing, str) or not backing.startswith("/"):
            raise errors.PathNotAllowed(f"{path}: backing file {backing!r} is not an absolute "
                                        "local path (or the chain is too long)", field=field,
                                        path=path)
        paths.resolve(backing, roots, field)
        current = image_info(backing, current.get("backing-filename-format"), field)
        if current.get("format") not in FORMATS:
            raise errors.InvalidParams(f"backing file {backing} is a {current.get('format')} "
                                       "image", field=field, rule="format")
    return info


class Copy(TaskKind):
    name = "copy"
    description = ("Copy or convert an image file or block device to an image file or block "
                   "device with qemu-img convert (raw, qcow2); progress in bytes.")
    destructive = True
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["source", "destination"],
        "additionalProperties": False,
        "properties": {
            "source": {**PATH_SCHEMA, "description": "Image file under an allowed root, or a "
                                                     "block device."},
            "destination": {**PATH_SCHEMA, "description": "Image file under an allowed root "
                                                          "(created if missing), or a block "
                                                          "device."},
            "sourceFormat": {"enum": list(FORMATS),
                             "description": "Default: probed once, then passed explicitly."},
            "destinationFormat": {"enum": list(FORMATS), "default": "raw"},
            "create": {"type": "boolean", "default": True,
                       "description": "Create (or re-create) the destination image; false: "
                                      "write into the existing one (qemu-img -n)."},
            "expect": {**safety.EXPECT_SCHEMA,
                       "description": "Precondition on a block-device destination (see "
                                      "getDeviceList)."},
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["bytes"],
        "properties": {
            "bytes": {"type": "integer", "description": "The source's virtual size."},
            "sourceFormat": {"enum": list(FORMATS)},
            "destinationFormat": {"enum": list(FORMATS)},
            "created": {"type": "boolean",
                        "description": "The task created the destination file."},
            "target": safety.TARGET_SCHEMA,
            "verified": {"type": "boolean", "description": "Set by verify (resetTaskState)."},
        },
    }

    @classmethod
    def _source(cls, params: dict[str, Any], env: KindEnv) -> paths.Target:
        return paths.resolve(params["source"], env.allowed_roots, "params.params.source")

    @classmethod
    def _destination(cls, params: dict[str, Any],
                     env: KindEnv) -> tuple[paths.Target, bool]:
        return resolve_destination(params["destination"], env.allowed_roots,
                                   "params.params.destination")

    @classmethod
    def _check(cls, params: dict[str, Any], env: KindEnv,
               ) -> tuple[paths.Target, paths.Target, bool, dict[str, Any] | None,
                          dict[str, Any]]:
        """Source, destination, whether it exists, its device facts, the source's info."""
        field = "params.params.destination"
        source = cls._source(params, env)
        destination, exists = cls._destination(params, env)
        if source.path == destination.path:
            raise errors.InvalidParams("source and destination are the same", field=field,
                                       rule="distinct")
        if not exists and not params["create"]:
            raise errors.InvalidParams(f"{params['destination']} does not exist (create is "
                                       "false)", field=field, rule="exists")
        info = source_info(source.path, params.get("sourceFormat"), env.allowed_roots,
                           "params.params.source")
        device = None
        if destination.kind == "device":
            device = safety.check_target(destination.path, params.get("expect"))
            size = int(info["virtual-size"])
            if params["destinationFormat"] == "raw" and device["size"] < size:
                raise errors.InvalidParams(
                    f"{destination.path} has {device['size']} bytes, the source {size}",
                    field=field, rule="size")
        else:
            if params.get("expect"):
                raise errors.InvalidParams("expect applies to a block-device destination",
                                           field="params.params.expect", rule="device")
            reasons = safety.loops_backed_by_file(destination.path) if exists else []
            if reasons:
                raise safety.in_use_error(destination.path, reasons)
        return source, destination, exists, device, info

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        if safety.in_child(env):
            cls._source(params, env)
            cls._destination(params, env)
            return  # pre() repeats every check right before the work
        cls._check(params, env)

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        destination, _ = cls._destination(params, env)
        return sorted({cls._source(params, env).resource, destination.resource})

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        return guarded_verify(cls._verify, params, env)

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        """``qemu-img compare`` of source and destination (reads both in full)."""
        source = cls._source(params, env)
        destination, exists = cls._destination(params, env)
        if not exists:
            return Verification(False, f"{destination.path} does not exist")
        info = source_info(source.path, params.get("sourceFormat"), env.allowed_roots,
                           "params.params.source")
        size = int(info["virtual-size"])
        argv = ["qemu-img", "compare", "-f", info["format"]]
        second = destination.path
        if params["destinationFormat"] == "raw" and paths.size_of(destination) > size:
            # Compare only the copied part of a larger raw destination.
            driver = "host_device" if destination.kind == "device" else "file"
            second = "json:" + json.dumps({"driver": "raw", "size": size, "file": {
                "driver": driver, "filename": destination.path}})
        else:
            argv += ["-F", params["destinationFormat"]]
        from vdsm_agent.system import commands

        result = commands.run([*argv, "--", source.path, second], timeout=COMPARE_TIMEOUT)
        if result.returncode != 0:
            detail = (result.stdout + result.stderr).strip()
            return Verification(False, f"qemu-img compare: {detail}")
        target = (safety.target_of(safety.inspect(destination.path), destination.path)
                  if destination.kind == "device" else safety.file_target(destination.path))
        return Verification(True, f"{source.path} and {destination.path} are identical", {
            "bytes": size, "sourceFormat": info["format"],
            "destinationFormat": params["destinationFormat"], "target": target,
            "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.source = ""
        self.destination = ""
        self.dest_is_device = False
        self.source_format = "raw"
        self.size = 0
        self.excl_fd = -1
        self.created: tuple[int, int] | None = None  # (st_dev, st_ino) of the file we made
        self.target: dict[str, Any] = {}

    def pre(self) -> None:
        source, destination, exists, device, info = self._check(self.params, self.ctx.env)
        self.source, self.destination = source.path, destination.path
        self.source_format, self.size = info["format"], int(info["virtual-size"])
        if source.kind == "device":
            reasons = safety.in_use_reasons(source.path, safety.inspect(source.path))
            if reasons:
                self.ctx.warn(f"the source {source.path} is in use ("
                              + "; ".join(reason["message"] for reason in reasons)
                              + "): the copy may not be consistent")
        if device is not None:
            self.dest_is_device = True
            self._hold(destination)
            self.target = safety.target_of(device, destination.path)
            notes.save(self.ctx.env, durable=False, target=self.target)
            what = safety.describe_device(device)
        elif not exists:
            self._create(destination.path)
            self.target = safety.file_target(destination.path)
            what = f"{destination.path} (new)"
        else:
            self.target = safety.file_target(destination.path)
            what = destination.path
        self.ctx.print(f"copy {source.path} ({self.source_format}, {self.size} bytes) to "
                       f"{what} as {self.params['destinationFormat']}")

    def _hold(self, destination: paths.Target) -> None:
        """O_EXCL on the destination device: no mount, swapon or mkfs while we write."""
        self.excl_fd = safety.open_exclusive(destination, os.O_RDONLY)

    def _create(self, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o640)
        try:
            info = os.fstat(fd)
        finally:
            os.close(fd)
        self.created = (info.st_dev, info.st_ino)
        notes.save(self.ctx.env, durable=False,
                   created={"path": path, "dev": info.st_dev, "ino": info.st_ino})

    def argv(self) -> list[str]:
        argv = ["qemu-img", "convert", "-p", "-f", self.source_format,
                "-O", self.params["destinationFormat"]]
        if not self.params["create"] or (self.dest_is_device
                                         and self.params["destinationFormat"] == "raw"):
            argv.append("-n")
        if self.params["destinationFormat"] == "raw":
            # Out-of-order writes: ~30% faster here. Not for qcow2, whose clusters
            # would be allocated out of order (a fragmented image).
            argv.append("-W")
        if self.ctx.env.io_rate_limit > 0:
            argv += ["-r", str(self.ctx.env.io_rate_limit)]
        return [*argv, "--", tools.check_arg(self.source, "source"),
                tools.check_arg(self.destination, "destination")]

    def perform(self) -> dict[str, Any]:
        self.ctx.progress(0, self.size)

        def progress(text: str) -> None:
            match = PERCENT.search(text)
            if match:
                self.ctx.progress(int(float(match.group(1)) * self.size / 100), self.size)

        run = tools.run(self.ctx, self.argv(), on_segment=progress)
        if run.returncode != 0:
            raise TaskFailure("ToolFailed", f"qemu-img convert failed with exit code "
                              f"{run.returncode}: {run.summary()}", exitCode=run.returncode)
        if self.created is not None and not self._still_ours():
            raise TaskFailure("DestinationReplaced", f"{self.destination} was replaced while "
                              "the copy ran")
        self.ctx.progress(self.size, self.size)
        if not self.dest_is_device:
            self.target = safety.file_target(self.destination)
        self.ctx.print(f"copied {self.size} bytes")
        return {"bytes": self.size, "sourceFormat": self.source_format,
                "destinationFormat": self.params["destinationFormat"],
                "created": self.created is not None, "target": self.target}

    def _still_ours(self) -> bool:
        try:
            info = os.lstat(self.destination)
        except FileNotFoundError:
            return False
        return (stat.S_ISREG(info.st_mode)
                and (info.st_dev, info.st_ino) == self.created)

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self._release()
        return result

    def _release(self) -> None:
        if self.excl_fd >= 0:
            os.close(self.excl_fd)
            self.excl_fd = -1

    def cleanup(self) -> None:
        """Remove the destination file this task created (checked by inode); release."""
        self._release()
        if self.created is None:
            return
        if self._still_ours():
            os.unlink(self.destination)
            self.ctx.print(f"removed {self.destination} (created by this task)")
        elif os.path.lexists(self.destination):
            self.ctx.warn(f"{self.destination} is no longer the file this task created; "
                          "left in place")
