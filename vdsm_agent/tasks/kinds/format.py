"""format: make an ext4 or xfs filesystem on a block device.

Refuses a device in use (always, ``force`` or not), and a device that
carries a filesystem or partition-table signature, or whose signature could
not be read (unknown is "may carry data"), unless ``force`` is true. The
task chooses the filesystem UUID itself (``mkfs.ext4 -U`` / ``mkfs.xfs -m
uuid=``) and records it in its notes before mkfs runs, so ``verify`` can
tell this task's filesystem from any other. After a failure or a cancel,
the signature of a half-made filesystem with that UUID is erased (``wipefs
--all``), so it is never mistaken for a usable one; the previous contents
are gone either way.

The device is resolved once, to a descriptor, in the task's process; the
checks, mkfs, blkid and wipefs all get ``/dev/fd/N`` of it (each tool was
tried on it: mke2fs, mkfs.xfs, blkid and wipefs open that path like any
other, and still refuse a device that is mounted or held). The task does not
hold the device with ``O_EXCL`` itself: mkfs opens it exclusively, and would
then find it busy.
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.tasks.kinds import notes, paths, safety, tools
from vdsm_agent.tasks.kinds.base import KindEnv, TaskContext, TaskFailure, Verification
from vdsm_agent.tasks.kinds.device import DeviceKind

FSTYPES = ("ext4", "xfs")
LABEL_MAX = {"ext4": 16, "xfs": 12}
XFS_MIN_SIZE = 300 * 1024 * 1024  # mkfs.xfs refuses smaller new filesystems
# mke2fs stages (printed as it goes) -> percent done when the stage starts.
MKE2FS_STAGES = (("Discarding device blocks", 5), ("Creating filesystem", 10),
                 ("Allocating group tables", 20), ("Writing inode tables", 40),
                 ("Creating journal", 70), ("Writing superblocks", 85))
WIPEFS_TIMEOUT = 60.0


def signature_error(path: str, device: dict[str, Any]) -> errors.InvalidParams | None:
    """The refusal for a device that may carry data (None: blank)."""
    if device["probeError"]:
        what = f"its signature cannot be read ({device['probeError']}), so it may carry data"
    elif device["fstype"]:
        what = f"it carries a {device['fstype']} signature"
        if device["label"]:
            what += f" (label {device['label']!r})"
        if device["uuid"]:
            what += f" (uuid {device['uuid']})"
    elif device["partitionTable"]:
        what = f"it carries a {device['partitionTable']} partition table"
    elif device["partitions"]:
        what = f"it has partitions ({', '.join(device['partitions'])})"
    else:
        return None
    return errors.InvalidParams(f"{path}: {what}; pass force=true to format it anyway",
                                field="params.params.force", rule="signature", path=path,
                                fstype=device["fstype"], partitionTable=device["partitionTable"],
                                probeError=device["probeError"])


class Format(DeviceKind):
    name = "format"
    description = ("Make an ext4 or xfs filesystem on a block device; refuses a device in use, "
                   "and one with a signature unless force.")
    destructive = True
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["device", "fstype"],
        "additionalProperties": False,
        "properties": {
            "device": safety.DEVICE_SCHEMA,
            "fstype": {"enum": list(FSTYPES)},
            "label": {"type": "string", "minLength": 1, "maxLength": 16,
                      "pattern": "^[A-Za-z0-9_.][A-Za-z0-9 _.+-]*$",
                      "description": "Filesystem label (ext4: up to 16, xfs: up to 12 "
                                     "characters)."},
            "force": {"type": "boolean", "default": False,
                      "description": "Format even if the device carries a signature. Never "
                                     "overrides an in-use verdict."},
            "expect": safety.EXPECT_SCHEMA,
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["fstype", "uuid", "label"],
        "properties": {
            "fstype": {"enum": list(FSTYPES)},
            "uuid": {"type": "string"},
            "label": {"type": ["string", "null"]},
            "target": safety.TARGET_SCHEMA,
            "verified": {"type": "boolean", "description": "Set by verify (resetTaskState)."},
        },
    }

    @classmethod
    def _check_params(cls, params: dict[str, Any]) -> None:
        fstype = params["fstype"]
        label = params.get("label")
        if label is not None and len(label.encode()) > LABEL_MAX[fstype]:
            raise errors.InvalidParams(f"an {fstype} label has at most {LABEL_MAX[fstype]} "
                                       "characters", field="params.params.label", rule="length")

    @classmethod
    def _check(cls, params: dict[str, Any], target: paths.Target) -> dict[str, Any]:
        fstype = params["fstype"]
        device = safety.check_target(target, params.get("expect"))
        if fstype == "xfs" and device["size"] < XFS_MIN_SIZE:
            raise errors.InvalidParams(f"{target.path} has {device['size']} bytes; xfs needs "
                                       f"at least {XFS_MIN_SIZE}", field="params.params.device",
                                       rule="size")
        refusal = None if params["force"] else signature_error(target.path, device)
        if refusal is not None:
            raise refusal
        return device

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        recorded = notes.load(env)
        if "uuid" not in recorded:
            return Verification(False, "the task never got to run mkfs (no UUID recorded)")
        with cls._resolve(params) as target:
            device = safety.inspect(target)
        if recorded["target"]["identity"] != device["identity"]:
            return Verification(False, f"{target.path} is now {device['identity']}, not the "
                                       f"formatted {recorded['target']['identity']}")
        found = (device["fstype"], device["uuid"], device["label"])
        wanted = (params["fstype"], recorded["uuid"], params.get("label"))
        if found != wanted:
            return Verification(False, f"{target.path} has fstype/uuid/label {found}, "
                                       f"expected {wanted}")
        return Verification(True, f"{target.path} carries the {params['fstype']} filesystem "
                                  f"{recorded['uuid']} made by this task", {
                                      "fstype": device["fstype"], "uuid": device["uuid"],
                                      "label": device["label"],
                                      "target": safety.target_of(device, target),
                                      "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.device: paths.Target | None = None  # the descriptor, held to the end
        self.path = ""
        self.uuid = str(uuid.uuid4())
        self.started_mkfs = False
        self.target: dict[str, Any] = {}

    def pre(self) -> None:
        self.device = target = self._resolve(self.params)
        device = self._check(self.params, target)
        self.path = target.path
        self.target = safety.target_of(device, target)
        if device["fstype"] or device["partitionTable"] or device["probeError"]:
            self.ctx.print(f"force: overwriting {safety.describe_device(device)}")
        notes.save(self.ctx.env, target=self.target, uuid=self.uuid)
        self.ctx.print(f"format {safety.describe_device(device)} as {self.params['fstype']}, "
                       f"uuid {self.uuid}")

    def _held(self) -> paths.Target:
        assert self.device is not None, "pre() resolves the device"
        return self.device

    def argv(self) -> list[str]:
        path = self._held().fd_path
        label = self.params.get("label")
        if self.params["fstype"] == "ext4":
            argv = ["mkfs.ext4", "-F", "-U", self.uuid]
        else:
            argv = ["mkfs.xfs", "-f", "-m", f"uuid={self.uuid}"]
        if label is not None:
            argv += ["-L", label]
        return [*argv, "--", path]

    def perform(self) -> dict[str, Any]:
        self.ctx.progress(0, 100)

        def stage(text: str) -> None:
            for prefix, percent in MKE2FS_STAGES:
                if text.startswith(prefix):
                    self.ctx.progress(percent, 100)

        self.started_mkfs = True
        device = self._held()
        run = tools.run(self.ctx, self.argv(), on_segment=stage,
                        fds={device.fd: device.path})
        if run.returncode != 0:
            raise TaskFailure(Failure.TOOL_FAILED, f"{run.argv[0]} failed with exit code "
                              f"{run.returncode}: {run.summary()}", exitCode=run.returncode)
        self.ctx.progress(95, 100)
        signature = safety.probe(device)
        if (signature.fstype, signature.uuid) != (self.params["fstype"], self.uuid):
            raise TaskFailure(Failure.VERIFY_FAILED, f"after mkfs, blkid finds {signature.fstype} "
                              f"{signature.uuid} on {self.path}, not {self.params['fstype']} "
                              f"{self.uuid}")
        self.ctx.progress(100, 100)
        self.ctx.print(f"{self.path}: {signature.fstype} uuid {signature.uuid}"
                       + (f" label {signature.label!r}" if signature.label else ""))
        return {"fstype": signature.fstype, "uuid": signature.uuid,
                "label": signature.label, "target": self.target}

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self._release()
        return result

    def _release(self) -> None:
        if self.device is not None:
            self.device.close()
            self.device = None

    def cleanup(self) -> None:
        """Erase the signature of a half-made filesystem of this task (never another's)."""
        try:
            if self.started_mkfs and self.device is not None:
                self._erase(self.device)
        finally:
            self._release()

    def _erase(self, device: paths.Target) -> None:
        from vdsm_agent.system import commands  # pulls in asyncio: only when needed

        signature = safety.probe(device)
        if signature.uuid != self.uuid:
            return
        result = commands.run(["wipefs", "--all", "--", device.fd_path],
                              timeout=WIPEFS_TIMEOUT, pass_fds=(device.fd,))
        if result.ok:
            self.ctx.print(f"erased the signature of the unfinished {signature.fstype} "
                           f"filesystem {self.uuid}")
        else:
            self.ctx.warn(f"could not erase the unfinished filesystem's signature: "
                          f"{result.stderr.strip()}")
