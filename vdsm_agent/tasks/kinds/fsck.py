"""fsck: check (and with ``repair``, fix) the ext2/3/4 or xfs filesystem on a block device.

Read-only unless ``repair``: ``e2fsck -f -n`` / ``xfs_repair -n``. With
``repair``: ``e2fsck -f -y`` (every fix answered yes: nobody is there to
answer); for xfs a read-only ``xfs_repair -n`` first, then ``xfs_repair``
only if it found problems (xfs_repair's exit code does not say whether it
fixed anything). A dirty xfs log is never zeroed (no ``-L``): the task fails
and says to mount the filesystem once to replay it.

Outcome (e2fsck's exit code is a bit mask): 0 -> done, clean; 1 or 2
(errors corrected) -> done, clean, with a warning; 4 (errors left
uncorrected, always the case with -n when it finds any) -> done with
``clean: false``; 8 or more (operational error, usage, cancelled, library)
-> failed. Progress comes from ``e2fsck -C FD`` (``pass current max device``
lines on a pipe of their own) and from xfs_repair's ``Phase N`` lines.

With ``repair`` the device must not be in use (DeviceInUse). A read-only
check of a device in use runs, with a warning: the results of checking a
mounted filesystem are unreliable.

The device is resolved once, to a descriptor; e2fsck and xfs_repair get
``/dev/fd/N`` of it (both open that path like any other, and still see a
mounted filesystem as mounted).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.tasks.kinds import paths, safety, tools
from vdsm_agent.tasks.kinds.base import (
    KindEnv,
    TaskContext,
    TaskFailure,
    Verification,
)
from vdsm_agent.tasks.kinds.device import DeviceKind

EXT = ("ext2", "ext3", "ext4")
FSTYPES = (*EXT, "xfs")
# Share of the whole check per e2fsck pass (pass 1 dominates), in percent.
E2FSCK_PASSES = {1: (0, 70), 2: (70, 20), 3: (90, 2), 4: (92, 5), 5: (97, 3)}
XFS_PHASES = 7
PHASE = re.compile(r"^Phase (\d+) ")
# e2fsck summary line: "label: 11/16384 files (0.0% non-contiguous), 9513/65536 blocks"
E2FSCK_SUMMARY = re.compile(r"\d+/\d+ files .*\d+/\d+ blocks")


def e2fsck_percent(line: str) -> float | None:
    """Overall percent from one ``-C FD`` line: ``pass current max device``."""
    fields = line.split()
    if len(fields) < 3 or not all(field.isdigit() for field in fields[:3]):
        return None
    number, current, maximum = (int(field) for field in fields[:3])
    if number not in E2FSCK_PASSES or maximum <= 0:
        return None
    start, share = E2FSCK_PASSES[number]
    return start + share * min(current, maximum) / maximum


class Fsck(DeviceKind):
    name = "fsck"
    description = ("Check the ext2/3/4 or xfs filesystem of a block device, read-only unless "
                   "repair (then the device must not be in use).")
    destructive = True  # only with repair=true
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["device"],
        "additionalProperties": False,
        "properties": {
            "device": safety.DEVICE_SCHEMA,
            "repair": {"type": "boolean", "default": False,
                       "description": "Fix what the check finds (writes to the device)."},
            "expect": safety.EXPECT_SCHEMA,
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["clean", "fstype", "summary"],
        "properties": {
            "clean": {"type": "boolean",
                      "description": "The filesystem is consistent (after repairs, if any)."},
            "fstype": {"enum": list(FSTYPES)},
            "summary": {"type": "string", "description": "The tool's last words."},
            "repaired": {"type": "boolean", "description": "Errors were found and fixed."},
            "exitCode": {"type": "integer"},
            "target": safety.TARGET_SCHEMA,
            "verified": {"type": "boolean", "description": "Set by verify (resetTaskState)."},
        },
    }

    @classmethod
    def _check(cls, params: dict[str, Any], target: paths.Target) -> dict[str, Any]:
        device = safety.check_target(target, params.get("expect"),
                                     destructive=params["repair"])
        fstype = device["fstype"]
        if device["probeError"]:
            raise errors.InvalidParams(f"{target.path}: the filesystem type cannot be read "
                                       f"({device['probeError']})",
                                       field="params.params.device", rule="fstype")
        if fstype not in FSTYPES:
            found = f"a {fstype} signature" if fstype else "no filesystem"
            raise errors.InvalidParams(f"{target.path} has {found}; fsck checks "
                                       f"{', '.join(FSTYPES)}", field="params.params.device",
                                       rule="fstype", fstype=fstype)
        return device

    @classmethod
    def _verify(cls, params: dict[str, Any], env: KindEnv) -> Verification:
        """A read-only check now: complete when the filesystem is clean."""
        read_only = {**params, "repair": False}
        with cls._resolve(read_only) as target:
            device = cls._check(read_only, target)
            if safety.in_use_reasons(target, device):
                return Verification(False, f"{target.path} is in use: a check now is "
                                           "unreliable")
            kind = cls(read_only, _Quiet())
            kind.device, kind.path, kind.fstype = target, target.path, device["fstype"]
            kind.target = safety.target_of(device, target)
            result = kind.perform()
        if not result["clean"]:
            return Verification(False, f"{target.path} is not clean: {result['summary']}")
        return Verification(True, f"{target.path}: a read-only check finds it clean",
                            {**result, "verified": True})

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: TaskContext) -> None:
        super().__init__(params, ctx)
        self.device: paths.Target | None = None  # the descriptor, held to the end
        self.path = ""
        self.fstype = ""
        self.target: dict[str, Any] = {}

    def pre(self) -> None:
        self.device = target = self._resolve(self.params)
        device = self._check(self.params, target)
        self.path, self.fstype = target.path, device["fstype"]
        self.target = safety.target_of(device, target)
        if not self.params["repair"]:
            reasons = safety.in_use_reasons(target, device)
            if reasons:
                self.ctx.warn(f"{target.path} is in use ("
                              + "; ".join(reason["message"] for reason in reasons)
                              + "): the results of a check of a live filesystem are unreliable")
        mode = "repair" if self.params["repair"] else "read-only check"
        self.ctx.print(f"fsck ({mode}) of {safety.describe_device(device)}")

    def perform(self) -> dict[str, Any]:
        self.ctx.progress(0, 100)
        result = self._e2fsck() if self.fstype in EXT else self._xfs()
        self.ctx.progress(100, 100)
        return {**result, "fstype": self.fstype, "target": self.target}

    def post(self, result: dict[str, Any]) -> dict[str, Any]:
        self.cleanup()
        return result

    def cleanup(self) -> None:
        # A check writes nothing to undo (a repair cannot be undone); release the device.
        if self.device is not None:
            self.device.close()
            self.device = None

    def _held(self) -> paths.Target:
        assert self.device is not None, "pre() resolves the device"
        return self.device

    def _e2fsck(self) -> dict[str, Any]:
        device = self._held()
        mode = "-y" if self.params["repair"] else "-n"

        def progress(line: str) -> None:
            percent = e2fsck_percent(line)
            if percent is not None:
                self.ctx.progress(int(percent), 100)

        run = tools.run(self.ctx, ["e2fsck", "-f", mode, "-C", "{progress_fd}", "--",
                                   device.fd_path],
                        progress_fd=True, on_progress=progress, fds={device.fd: device.path})
        code = run.returncode
        summary = next((line.strip() for line in reversed(run.tail)
                        if E2FSCK_SUMMARY.search(line)), run.summary())
        if code >= 8:
            raise TaskFailure(Failure.TOOL_FAILED, f"e2fsck failed with exit code {code}: "
                              f"{run.summary()}", exitCode=code)
        repaired = bool(code & 3)
        if repaired:
            self.ctx.warn(f"e2fsck found and corrected errors on {self.path} (exit code {code})")
        clean = not code & 4
        if not clean:
            self.ctx.print(f"errors left uncorrected on {self.path} (exit code {code})")
        return {"clean": clean, "summary": summary, "repaired": repaired, "exitCode": code}

    def _xfs_run(self, read_only: bool) -> tools.ToolResult:
        device = self._held()

        def phase(text: str) -> None:
            match = PHASE.match(text)
            if match:
                self.ctx.progress(int(match.group(1)) * 100 // (XFS_PHASES + 1), 100)

        argv = ["xfs_repair", *(["-n"] if read_only else []), "--", device.fd_path]
        run = tools.run(self.ctx, argv, on_segment=phase, fds={device.fd: device.path})
        if not read_only and run.returncode == 2:
            raise TaskFailure(Failure.DIRTY_LOG, f"{self.path} has a dirty xfs log; mount and "
                              "unmount the filesystem to replay it, then check again", exitCode=2)
        return run

    def _xfs(self) -> dict[str, Any]:
        check = self._xfs_run(read_only=True)
        if check.returncode not in (0, 1):
            raise TaskFailure(Failure.TOOL_FAILED, f"xfs_repair -n failed with exit code "
                              f"{check.returncode}: {check.summary()}",
                              exitCode=check.returncode)
        if check.returncode == 0:
            return {"clean": True, "summary": "no problems found", "repaired": False,
                    "exitCode": 0}
        if not self.params["repair"]:
            self.ctx.print(f"xfs_repair -n found problems on {self.path}")
            return {"clean": False, "summary": "problems found (read-only check)",
                    "repaired": False, "exitCode": 1}
        fix = self._xfs_run(read_only=False)
        if fix.returncode != 0:
            raise TaskFailure(Failure.TOOL_FAILED, f"xfs_repair failed with exit code "
                              f"{fix.returncode}: {fix.summary()}", exitCode=fix.returncode)
        self.ctx.warn(f"xfs_repair found and corrected errors on {self.path}")
        return {"clean": True, "summary": fix.summary() or "repaired", "repaired": True,
                "exitCode": 0}


class _Quiet:
    """A TaskContext for a check run by verify in the agent: output is dropped."""

    env = KindEnv()
    cancel_requested = False

    def progress(self, done: int, total: int | None) -> None: ...
    def heartbeat(self) -> None: ...
    def print(self, line: str) -> None: ...
    def write(self, data: bytes) -> None: ...
    def warn(self, message: str) -> None: ...
    def check_cancel(self) -> None: ...
    def sleep(self, seconds: float) -> None: ...
    def throttle(self, nbytes: int) -> None: ...
    def report_external(self, **values: Any) -> None: ...
