"""The gluster CLI: ``gluster --mode=script --xml volume ...``, parsed with xml.etree.

Argument lists only (``system.commands``), never a shell. Volume and brick
names are checked strictly before they reach a command line (``check_volume``,
``check_brick``), so no caller's value can be taken for an option or a
keyword of the CLI.

With ``--xml`` the CLI exits 0 even when the operation failed: the answer's
``opRet`` (-1) and ``opErrstr`` say so (``GlusterError``). When glusterd does
not answer, the CLI prints "Connection failed. Please check if gluster daemon
is operational." and exits 1 with no XML (``GlusterUnavailable``).

Gluster's rebalance and remove-brick are both run by a rebalance process
(``gf_defrag_status_t``): the same status codes, and the same counters
(``files`` and ``size`` moved, ``lookups`` scanned, ``failures``, ``skipped``).
"""

from __future__ import annotations

import dataclasses
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence

from vdsm_agent.system import commands

GLUSTER = "gluster"
# A rebalance or remove-brick start waits for its rebalance process (about 5 s
# measured on GlusterFS 10.3); status and stop answer in a fraction of a second.
TIMEOUT = 60.0
# glusterd's answers while another operation holds its lock, retried (``run``).
_BUSY = ("Another transaction is in progress", "Locking failed", "Unable to acquire lock")
BUSY_WAIT = 10.0
BUSY_RETRY = 0.3

# Gluster's own rule for volume names (letters, digits, '-' and '_'), kept short;
# never a leading '-' (an option) and none of the CLI's keywords ("all").
_VOLUME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_RESERVED = frozenset({"all", "help", "force", "start", "stop", "status", "commit"})
# host:/path: a host name or IPv4 address, then an absolute path of plain
# characters (no '..', '.', empty or control parts).
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_PATH_PART = re.compile(r"[A-Za-z0-9_+@%=,-][A-Za-z0-9._+@%=,-]{0,254}")
VOLUME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
BRICK_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}:/[A-Za-z0-9._+@%=,/-]{1,4000}$"

# gf_defrag_status_t (libglusterfs) -> its statusStr, and our view of it.
NOT_STARTED, IN_PROGRESS, STOPPED, COMPLETED, FAILED = "not started", "in progress", \
    "stopped", "completed", "failed"
_CODES = {0: NOT_STARTED, 1: IN_PROGRESS, 2: STOPPED, 3: COMPLETED, 4: FAILED,
          5: "fix-layout in progress", 6: "fix-layout stopped",
          7: "fix-layout completed", 8: "fix-layout failed"}


class GlusterError(Exception):
    """The CLI refused or failed the operation (opRet -1, or no answer)."""

    def __init__(self, argv: Sequence[str], message: str, op_errno: int = 0) -> None:
        super().__init__(message)
        self.argv = list(argv)
        self.message = message
        self.op_errno = op_errno


class GlusterUnavailable(GlusterError):
    """glusterd does not answer (not running, or the CLI timed out)."""


def check_volume(name: str) -> str:
    """A volume name safe on the CLI's command line; ValueError otherwise."""
    if not isinstance(name, str) or _VOLUME.fullmatch(name) is None or name in _RESERVED:
        raise ValueError(f"{name!r} is not a valid volume name (letters, digits, '-' "
                         "and '_', at most 64, not starting with '-' or '_')")
    return name


def check_brick(brick: str) -> str:
    """``host:/path`` safe on the command line; ValueError otherwise."""
    host, sep, path = brick.partition(":") if isinstance(brick, str) else ("", "", "")
    parts = path.split("/")[1:] if path.startswith("/") else []
    if (not sep or len(host) > 253 or _HOST.fullmatch(host) is None or not parts
            or not all(_PATH_PART.fullmatch(part) for part in parts)):
        raise ValueError(f"{brick!r} is not a valid brick (host:/absolute/path: a host name "
                         "or address, then a path without '.', '..', empty parts or "
                         "special characters)")
    return brick


@dataclasses.dataclass(frozen=True)
class TaskStatus:
    """A rebalance or remove-brick as its status command reports it."""

    task_id: str | None
    code: int | None
    status: str  # gluster's statusStr ("in progress", "completed", ...)
    files: int = 0  # files moved
    size: int = 0  # bytes moved
    lookups: int = 0  # files scanned
    failures: int = 0
    skipped: int = 0
    runtime: float = 0.0

    def counts(self) -> dict[str, int | float]:
        return {"files": self.files, "bytes": self.size, "scanned": self.lookups,
                "failures": self.failures, "skipped": self.skipped,
                "runtime": self.runtime}


@dataclasses.dataclass(frozen=True)
class VolumeTask:
    """A task ``volume status all tasks`` lists."""

    volume: str
    type: str  # "Rebalance" or "Remove brick"
    task_id: str
    status: str
    bricks: tuple[str, ...] = ()


def _int(node: ET.Element | None, name: str) -> int:
    text = node.findtext(name) if node is not None else None
    try:
        return int(text) if text else 0
    except ValueError:
        return 0


def _float(node: ET.Element | None, name: str) -> float:
    text = node.findtext(name) if node is not None else None
    try:
        return float(text) if text else 0.0
    except ValueError:
        return 0.0


def status_name(code: int | None, text: str | None) -> str:
    """Gluster's statusStr, else the name of its code, else "unknown"."""
    if text:
        return text.strip()
    return _CODES.get(code, "unknown") if code is not None else "unknown"


def parse(argv: Sequence[str], stdout: str) -> ET.Element:
    """The ``cliOutput`` element; GlusterError when opRet says the operation failed."""
    try:
        root = ET.fromstring(stdout)
    except ET.ParseError:
        raise GlusterError(argv, f"unreadable answer from gluster: {stdout.strip()[:200]!r}") \
            from None
    if _int(root, "opRet") != 0:
        message = (root.findtext("opErrstr") or root.findtext("output") or "").strip()
        raise GlusterError(argv, message or "the operation failed", _int(root, "opErrno"))
    return root


def run(args: Sequence[str], timeout: float = TIMEOUT) -> ET.Element:
    """Blocking (a worker thread or a task's process): ``gluster volume ARGS``.

    glusterd runs one operation at a time: another one in flight (a status read
    of another agent's discovery, an administrator's command) makes it answer
    "Another transaction is in progress"; that is retried for up to BUSY_WAIT s."""
    deadline = time.monotonic() + BUSY_WAIT
    while True:
        try:
            return _run_once(args, timeout)
        except GlusterError as exc:
            if isinstance(exc, GlusterUnavailable) or not _busy(exc.message) \
                    or time.monotonic() >= deadline:
                raise
        time.sleep(BUSY_RETRY)


def _busy(message: str) -> bool:
    return any(text in message for text in _BUSY)


def _run_once(args: Sequence[str], timeout: float) -> ET.Element:
    argv = [GLUSTER, "--mode=script", "--xml", "volume", *args]
    try:
        result = commands.run(argv, timeout=timeout)
    except commands.CommandTimeout:
        raise GlusterUnavailable(argv, f"gluster did not answer in {timeout:g}s") from None
    except commands.CommandError as exc:
        raise GlusterUnavailable(argv, str(exc)) from None
    if result.returncode != 0 and not result.stdout.lstrip().startswith("<"):
        message = (result.stdout + result.stderr).strip().splitlines()
        raise GlusterUnavailable(argv, message[0] if message else
                                 f"gluster exited with {result.returncode}")
    return parse(argv, result.stdout)


def _task_status(section: ET.Element | None) -> TaskStatus:
    if section is None:
        return TaskStatus(None, None, "unknown")
    aggregate = section.find("aggregate")
    code_text = aggregate.findtext("status") if aggregate is not None else None
    code = int(code_text) if code_text and code_text.lstrip("-").isdigit() else None
    status = status_name(code, aggregate.findtext("statusStr") if aggregate is not None
                         else None)
    return TaskStatus(
        task_id=(section.findtext("task-id") or "").strip() or None, code=code, status=status,
        files=_int(aggregate, "files"), size=_int(aggregate, "size"),
        lookups=_int(aggregate, "lookups"), failures=_int(aggregate, "failures"),
        skipped=_int(aggregate, "skipped"), runtime=_float(aggregate, "runtime"))


def _started_id(root: ET.Element, section: str) -> str:
    task_id = (root.findtext(f"{section}/task-id") or "").strip()
    if not task_id:
        raise GlusterError([GLUSTER], "gluster started the task but gave no task ID")
    return task_id


# -- rebalance ---------------------------------------------------------------------------


def rebalance_start(volume: str) -> str:
    """Start a rebalance; Gluster's task ID."""
    return _started_id(run(["rebalance", check_volume(volume), "start"]), "volRebalance")


def rebalance_status(volume: str, timeout: float = TIMEOUT) -> TaskStatus:
    root = run(["rebalance", check_volume(volume), "status"], timeout)
    return _task_status(root.find("volRebalance"))


def rebalance_stop(volume: str) -> TaskStatus:
    return _task_status(run(["rebalance", check_volume(volume), "stop"]).find("volRebalance"))


# -- remove-brick ------------------------------------------------------------------------


def _brick_args(volume: str, bricks: Sequence[str]) -> list[str]:
    if not bricks:
        raise ValueError("no brick given")
    return ["remove-brick", check_volume(volume), *(check_brick(b) for b in bricks)]


def remove_brick_start(volume: str, bricks: Sequence[str]) -> str:
    return _started_id(run([*_brick_args(volume, bricks), "start"]), "volRemoveBrick")


def remove_brick_status(volume: str, bricks: Sequence[str],
                        timeout: float = TIMEOUT) -> TaskStatus:
    root = run([*_brick_args(volume, bricks), "status"], timeout)
    return _task_status(root.find("volRemoveBrick"))


def remove_brick_stop(volume: str, bricks: Sequence[str]) -> None:
    run([*_brick_args(volume, bricks), "stop"])


def remove_brick_commit(volume: str, bricks: Sequence[str]) -> None:
    run([*_brick_args(volume, bricks), "commit"])


def remove_brick_force(volume: str, bricks: Sequence[str]) -> None:
    """Remove the bricks at once, without moving their data off them."""
    run([*_brick_args(volume, bricks), "force"])


# -- volumes -----------------------------------------------------------------------------


def volume_exists(volume: str, timeout: float = TIMEOUT) -> None:
    """GlusterError ("Volume X does not exist") unless the volume exists."""
    run(["info", check_volume(volume)], timeout)


def volume_tasks(timeout: float = TIMEOUT) -> list[VolumeTask]:
    """Every rebalance and remove-brick glusterd knows of, on every volume."""
    root = run(["status", "all", "tasks"], timeout)
    found: list[VolumeTask] = []
    for volume in root.iterfind("volStatus/volumes/volume"):
        name = (volume.findtext("volName") or "").strip()
        for task in volume.iterfind("tasks/task"):
            task_id = (task.findtext("id") or "").strip()
            if not name or not task_id:
                continue
            code_text = task.findtext("status")
            code = int(code_text) if code_text and code_text.isdigit() else None
            bricks = tuple((brick.text or "").strip() for brick in task.iterfind("params/brick"))
            found.append(VolumeTask(name, (task.findtext("type") or "").strip(), task_id,
                                    status_name(code, task.findtext("statusStr")), bricks))
    return found
