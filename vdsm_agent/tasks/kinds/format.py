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
"""

from __future__ import annotations

import uuid
from typing import Any, ClassVar

from vdsm_agent import errors
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
    def _check(cls, params: dict[str, Any]) -> tuple[paths.Target, dict[str, Any]]:
        fstype = params["fstype"]
        label = params.get("label")
        if label is not None and len(label.encode()) > LABEL_MAX[fstype]:
            raise errors.InvalidParams(f"an {fstype} label has at most {LABEL_MAX[fstype]} "
                                       "characters", field="params.params.label", rule="length")
        target = cls._target(params)
        device = safety.check_target(target.path, params.get("expect"))
        if fstype == "xfs" and device["size"] < XFS_MIN_SIZE:
            raise errors.InvalidParams(f"{target.path} has {device['size']} bytes; xfs needs "
                                       f"at least {XFS_MIN_SIZE}", field="params.params.device",
                                       rule="size")
        refusal = None if params["force"] else signature_error(target.path, device)
        if refusal is not None:
            raise refusal
        return target, device

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        target = cls._target(params)
        recorded = notes.load(env)
        if "uuid" not in recorded:
            return Verification(False, "the task never got to run mkfs (no UUID recorded)")
        device = safety.inspect(target.path)
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
                                      "target": safety.target_of(device, target.path),
                                      "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.path = ""
        self.uuid = str(uuid.uuid4())
        self.started_mkfs = False
        self.target: dict[str, Any] = {}

    def pre(self) -> None:
        target, device = self._check(self.params)
        self.path = target.path
        self.target = safety.target_of(device, target.path)
        if device["fstype"] or device["partitionTable"] or device["probeError"]:
            self.ctx.print(f"force: overwriting {safety.describe_device(device)}")
        notes.save(self.ctx.env, target=self.target, uuid=self.uuid)
        self.ctx.print(f"format {safety.describe_device(device)} as {self.params['fstype']}, "
                       f"uuid {self.uuid}")

    def argv(self) -> list[str]:
        path = tools.check_arg(self.path, "device")
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
        run = tools.run(self.ctx, self.argv(), on_segment=stage)
        if run.returncode != 0:
            raise TaskFailure("ToolFailed", f"{run.argv[0]} failed with exit code "
                              f"{run.returncode}: {run.summary()}", exitCode=run.returncode)
        self.ctx.progress(95, 100)
        signature = safety.probe(self.path)
        if (signature.fstype, signature.uuid) != (self.params["fstype"], self.uuid):
            raise TaskFailure("VerifyFailed", f"after mkfs, blkid finds {signature.fstype} "
                              f"{signature.uuid} on {self.path}, not {self.params['fstype']} "
                              f"{self.uuid}")
        self.ctx.progress(100, 100)
        self.ctx.print(f"{self.path}: {signature.fstype} uuid {signature.uuid}"
                       + (f" label {signature.label!r}" if signature.label else ""))
        return {"fstype": signature.fstype, "uuid": signature.uuid,
                "label": signature.label, "target": self.target}

    def cleanup(self) -> None:
        """Erase the signature of a half-made filesystem of this task (never another's)."""
        if not self.started_mkfs:
            return
        from vdsm_agent.system import commands  # pulls in asyncio: only when needed

        signature = safety.probe(self.path)
        if signature.uuid != self.uuid:
            return
        result = commands.run(["wipefs", "--all", "--", tools.check_arg(self.path, "device")],
                              timeout=WIPEFS_TIMEOUT)
        if result.ok:
            self.ctx.print(f"erased the signature of the unfinished {signature.fstype} "
                           f"filesystem {self.uuid}")
        else:
            self.ctx.warn(f"could not erase the unfinished filesystem's signature: "
                          f"{result.stderr.strip()}")
