"""copy: ``qemu-img convert`` between image files (beneath the allowed roots) and block devices.

* Formats: ``raw`` and ``qcow2`` only (a small attack surface). Without
  ``sourceFormat`` the source is probed once with ``qemu-img info`` and the
  probed format is then passed explicitly.
* Every path is resolved once, to a descriptor (``paths``: no symlink, no
  ``..``, no other mount, no hard-linked file), and qemu-img gets
  ``/dev/fd/N`` of it, never the name: whatever happens to the names while
  the copy runs, it reads and writes the inodes that were checked.
* A qcow2 source and its backing chain are probed and named by descriptor,
  layer by layer, each backing file resolved beneath an allowed root (or
  under /dev) like the source (``images``); one with an external data file
  is refused. Because an image's owner may rewrite its header after that
  check, ``qemu-img convert`` runs in a Landlock sandbox (``sandbox``) that
  lets it open only the task's descriptors (and the system's programs).
* Destination: a block device, which gets the same safety checks as a wipe
  (never in use; ``expect``), is held open with ``O_EXCL`` (a re-open of its
  descriptor) while qemu-img writes, and must be at least the source's
  virtual size when raw; an existing image file (``create=false`` writes into
  it with ``-n``; ``create=true`` re-creates it in place); or a new file,
  which the task creates itself with ``O_EXCL`` in the descriptor of its
  resolved parent directory (never following a name) before qemu-img formats
  it through ``/dev/fd/N``.
* Raw destinations are written with ``-W`` (out-of-order writes, as oVirt
  does for raw targets): about 30% faster here; qcow2 ones are not (their
  clusters would be allocated out of order).
* Progress from ``qemu-img convert -p`` (its ``(NN.NN/100%)`` updates, ended
  by ``\\r``), in bytes of the source's virtual size; ``task_io_rate_limit``
  becomes ``-r``.
* After the copy the destination's path must still lead (beneath its root)
  to the inode written, or the task fails with ``DestinationReplaced``; the
  recorded ``target`` is the descriptor's (``fstat``), never a name's.
* Rollback: after a failure or a cancel (in ``pre`` too, once the file
  exists), a destination file the task created itself is removed through its
  parent directory's descriptor, only while that name is still the inode the
  task created (never a file that existed before or that someone put in its
  place).
"""

# Longer than 400 lines: one task kind whose two halves (the agent's checks, resources
# and verify; the task process's pre, perform, post, cleanup) share one plan of
# descriptors. The source's backing chain is in images.py.

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.system import confine
from vdsm_agent.tasks import resource_names
from vdsm_agent.tasks.kinds import notes, paths, safety, sandbox, tools
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    TaskKind,
    Verification,
)
from vdsm_agent.tasks.kinds.device import guarded_verify
from vdsm_agent.tasks.kinds.images import (
    FORMATS,
    SOURCE,
    Source,
    file_node,
    inspect_source,
    refuse_external_data,
)

COMPARE_TIMEOUT = 6 * 3600.0
PERCENT = re.compile(r"\((\d+(?:\.\d+)?)/100%\)")
PATH_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 2, "maxLength": 4096,
                               "pattern": "^/"}
DESTINATION = "params.params.destination"


# -- the destination ---------------------------------------------------------------------------


@dataclasses.dataclass
class Destination:
    """Where the copy goes: an existing file or device, or a file to create."""

    path: str  # as resolved (beneath the root's resolved name)
    target: paths.Target | None  # None until a new file is created
    parent: paths.Target | None = None  # a new file's directory
    name: str = ""  # a new file's name in it
    exists: bool = True

    @property
    def kind(self) -> str:
        return "device" if self.target is not None and self.target.kind == "device" else "file"

    @property
    def resource(self) -> str:
        return f"{self.kind}:{self.path}"

    def held(self) -> paths.Target:
        assert self.target is not None, "the destination is resolved or created first"
        return self.target

    def close(self) -> None:
        for target in (self.target, self.parent):
            if target is not None:
                target.close()


def resolve_destination(path: str, roots: tuple[str, ...],
                        field: str = DESTINATION) -> Destination:
    """The confined destination (a new file's parent directory when it does not exist)."""
    try:
        target = paths.resolve(path, roots, field)
    except errors.InvalidParams as exc:
        if exc.data.get("rule") != "exists":
            raise
        parent, name = confine.resolve_parent(path, roots, field)
        return Destination(os.path.join(parent.path, name), None, parent, name, exists=False)
    return Destination(target.path, target)


# -- the kind ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    """Everything a copy works on, resolved and checked (close it)."""

    source: Source
    destination: Destination
    device: dict[str, Any] | None  # the destination device's inventory facts

    def close(self) -> None:
        self.source.close()
        self.destination.close()


class Copy(TaskKind):
    name = "copy"
    resource_params = {"source": resource_names.PATH, "destination": resource_names.PATH}
    progress_unit = "bytes"
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
    def _plan(cls, params: dict[str, Any], env: KindEnv) -> Plan:
        """Resolve and check source and destination (raise ``errors.*``)."""
        source = inspect_source(params["source"], params.get("sourceFormat"),
                                env.allowed_roots)
        try:
            destination = resolve_destination(params["destination"], env.allowed_roots)
        except BaseException:
            source.close()
            raise
        plan = Plan(source, destination, None)
        try:
            plan.device = cls._check(params, plan)
        except BaseException:
            plan.close()
            raise
        return plan

    @classmethod
    def _check(cls, params: dict[str, Any], plan: Plan) -> dict[str, Any] | None:
        """The checks of a resolved plan; the destination device's facts (if one)."""
        source, destination = plan.source, plan.destination
        target = destination.target
        if target is not None and any(paths.same_inode(layer.target, target)
                                      for layer in source.layers):
            raise errors.InvalidParams("the destination is the source or one of its backing "
                                       "files", field=DESTINATION, rule="distinct")
        if not destination.exists and not params["create"]:
            raise errors.InvalidParams(f"{params['destination']} does not exist (create is "
                                       "false)", field=DESTINATION, rule="exists")
        if target is not None and target.kind == "device":
            device = safety.check_target(target, params.get("expect"))
            if params["destinationFormat"] == "raw" and device["size"] < source.size:
                raise errors.InvalidParams(
                    f"{target.path} has {device['size']} bytes, the source {source.size}",
                    field=DESTINATION, rule="size")
            return device
        if params.get("expect"):
            raise errors.InvalidParams("expect applies to a block-device destination",
                                       field="params.params.expect", rule="device")
        if target is not None:
            reasons = safety.loops_backed_by_file(target)
            if reasons:
                raise safety.in_use_error(target.path, reasons)
            if not params["create"] and params["destinationFormat"] == "qcow2":
                refuse_external_data(target, DESTINATION)
        return None

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        if safety.in_child(env):
            return  # pre() resolves everything and repeats every check
        cls._plan(params, env).close()

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        with paths.resolve(params["source"], env.allowed_roots, SOURCE) as source:
            names = {paths.resource(source)}
        destination = resolve_destination(params["destination"], env.allowed_roots)
        destination.close()
        return sorted(names | {destination.resource})

    @classmethod
    def verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        return guarded_verify(cls._verify, params, env)

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        """``qemu-img compare`` of source and destination (reads both in full)."""
        source = inspect_source(params["source"], params.get("sourceFormat"),
                                env.allowed_roots)
        try:
            destination = resolve_destination(params["destination"], env.allowed_roots)
            try:
                return cls._compare(params, source, destination)
            finally:
                destination.close()
        finally:
            source.close()

    @classmethod
    def _compare(cls, params: dict[str, Any], source: Source,
                 destination: Destination) -> Verification:
        from vdsm_agent.system import commands  # pulls in asyncio: only when needed

        if destination.target is None:
            return Verification(False, f"{destination.path} does not exist")
        target = destination.target
        size = source.size
        fmt = params["destinationFormat"]
        second: list[str]
        if fmt == "raw" and paths.size_of(target) > size:
            # Compare only the copied part of a larger raw destination.
            second = ["json:" + json.dumps({"driver": "raw", "size": size,
                                            "file": file_node(target)})]
        elif fmt == "qcow2":
            second = ["json:" + json.dumps({"driver": "qcow2", "file": file_node(target),
                                            "backing": None})]
        else:
            second = ["-F", "raw", target.fd_path]
        first = source.args()
        argv = ["qemu-img", "compare", *first[:-1], *second[:-1], "--", first[-1], second[-1]]
        result = commands.run(argv, timeout=COMPARE_TIMEOUT,
                              pass_fds=(*source.fds(), target.fd))
        if result.returncode != 0:
            detail = (result.stdout + result.stderr).strip()
            return Verification(False, f"qemu-img compare: {detail}")
        recorded = (safety.target_of(safety.inspect(target), target)
                    if target.kind == "device" else safety.file_target(target))
        return Verification(True, f"{source.image.target.path} and {target.path} are "
                                  "identical", {
                                      "bytes": size, "sourceFormat": source.image.format,
                                      "destinationFormat": fmt, "target": recorded,
                                      "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.plan: Plan | None = None
        self.excl_fd = -1
        self.created: os.stat_result | None = None  # fstat of the file this task made
        self.target: dict[str, Any] = {}

    def pre(self) -> None:
        self.plan = plan = self._plan(self.params, self.ctx.env)
        source, destination = plan.source, plan.destination
        image = source.image.target
        if image.kind == "device":
            reasons = safety.in_use_reasons(image, safety.inspect(image))
            if reasons:
                self.ctx.warn(f"the source {image.path} is in use ("
                              + "; ".join(reason["message"] for reason in reasons)
                              + "): the copy may not be consistent")
        if plan.device is not None:
            # O_EXCL on the destination device: no mount, swapon or mkfs while we write.
            self.excl_fd = safety.open_exclusive(destination.held(), os.O_RDONLY)
            self.target = safety.target_of(plan.device, destination.held())
            notes.save(self.ctx.env, durable=False, target=self.target)
            what = safety.describe_device(plan.device)
        else:
            if not destination.exists:
                self._create(destination)
            self.target = safety.file_target(destination.held())
            what = destination.path + ("" if destination.exists else " (new)")
        self.ctx.print(f"copy {image.path} ({source.image.format}, {source.size} bytes) to "
                       f"{what} as {self.params['destinationFormat']}")

    def _create(self, destination: Destination) -> None:
        """The new destination file, made with O_EXCL in its directory's descriptor."""
        assert destination.parent is not None
        destination.target = confine.create_file(destination.parent, destination.name,
                                                 destination.path, DESTINATION)
        self.created = info = destination.target.info
        notes.save(self.ctx.env, durable=False,
                   created={"path": destination.path, "dev": info.st_dev, "ino": info.st_ino})

    def _planned(self) -> Plan:
        assert self.plan is not None, "pre() resolves the source and the destination"
        return self.plan

    def destination_arg(self) -> str:
        """How qemu-img is told about the destination: its descriptor; an existing
        qcow2 written into (-n) as a spec with no backing file."""
        target = self._planned().destination.held()
        if self._no_create() and self.params["destinationFormat"] == "qcow2":
            return "json:" + json.dumps({"driver": "qcow2", "file": file_node(target),
                                         "backing": None}, separators=(",", ":"))
        return target.fd_path

    def _no_create(self) -> bool:
        plan = self._planned()
        return not self.params["create"] or (plan.device is not None
                                             and self.params["destinationFormat"] == "raw")

    def argv(self) -> list[str]:
        source = self._planned().source
        argv = ["qemu-img", "convert", "-p", *source.format_args(),
                "-O", self.params["destinationFormat"]]
        if self._no_create():
            argv.append("-n")
        if self.params["destinationFormat"] == "raw":
            # Out-of-order writes: ~30% faster here. Not for qcow2, whose clusters
            # would be allocated out of order (a fragmented image).
            argv.append("-W")
        if self.ctx.env.io_rate_limit > 0:
            argv += ["-r", str(self.ctx.env.io_rate_limit)]
        return [*argv, "--", source.args()[-1], self.destination_arg()]

    def perform(self) -> dict[str, Any]:
        plan = self._planned()
        size = plan.source.size
        self.ctx.progress(0, size)

        def progress(text: str) -> None:
            match = PERCENT.search(text)
            if match:
                self.ctx.progress(int(float(match.group(1)) * size / 100), size)

        destination = plan.destination.held()
        fds = {**plan.source.fds(), destination.fd: destination.path}
        jail = sandbox.build({**{fd: sandbox.READ for fd in plan.source.fds()},
                              destination.fd: sandbox.WRITE})
        if jail is None:
            self.ctx.print("no Landlock in this kernel: qemu-img runs unconfined (it is "
                           "given descriptors only)")
        try:
            run = tools.run(self.ctx, self.argv(), on_segment=progress, fds=fds, sandbox=jail)
        finally:
            if jail is not None:
                jail.close()
        if run.returncode != 0:
            raise TaskFailure(Failure.TOOL_FAILED, f"qemu-img convert failed with exit code "
                              f"{run.returncode}: {run.summary()}", exitCode=run.returncode)
        if destination.kind == "file":
            self._check_still_named(plan.destination)
            self.target = safety.file_target(destination)
        self.ctx.progress(size, size)
        self.ctx.print(f"copied {size} bytes")
        return {"bytes": size, "sourceFormat": plan.source.image.format,
                "destinationFormat": self.params["destinationFormat"],
                "created": self.created is not None, "target": self.target}

    def _check_still_named(self, destination: Destination) -> None:
        """DestinationReplaced unless the destination's path still leads, beneath its
        root, to the inode written (a name moved or swapped meanwhile)."""
        written = destination.held()
        try:
            now = confine.resolve_file(self.params["destination"],
                                       self.ctx.env.allowed_roots, DESTINATION,
                                       single_link=False)
        except errors.RpcError as exc:
            raise TaskFailure(Failure.DESTINATION_REPLACED, f"{destination.path} no longer leads "
                              f"to the file written ({exc.detail or exc.name})",
                              path=destination.path) from None
        with now:
            if not paths.same_inode(now, written):
                raise TaskFailure(Failure.DESTINATION_REPLACED, f"{destination.path} was replaced "
                                  "while the copy ran", path=destination.path)

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self._release()
        return result

    def _release(self) -> None:
        if self.excl_fd >= 0:
            os.close(self.excl_fd)
            self.excl_fd = -1
        if self.plan is not None:
            self.plan.close()
            self.plan = None

    def cleanup(self) -> None:
        """Remove the destination file this task created (by inode, through its
        directory's descriptor); release every descriptor."""
        try:
            self._remove_created()
        finally:
            self._release()

    def _remove_created(self) -> None:
        if self.created is None or self.plan is None:
            return
        destination = self.plan.destination
        assert destination.parent is not None
        if confine.remove_if_same(destination.parent, destination.name, self.created):
            self.ctx.print(f"removed {destination.path} (created by this task)")
        else:
            self.ctx.warn(f"{destination.path} is no longer the file this task created; "
                          "left in place")
