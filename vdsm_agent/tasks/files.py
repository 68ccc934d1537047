"""A task's directory in the state dir, shared by the agent and the child.

STATE_DIR/tasks/<id>/
    spec.json      what to run (written by the agent before spawning)
    status.json    heartbeat + progress, rewritten atomically by the child
    outcome.json   the child's final word, written atomically and fsync'ed
    child.log      the child's stdout/stderr (tracebacks; not the task output)
    output/        the task's console output in segments (see output.py)

Task IDs are UUIDs (checked by ``task_dir``), so no caller value can make a
path escape the tasks directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

SPEC = "spec.json"
STATUS = "status.json"
OUTCOME = "outcome.json"
CHILD_LOG = "child.log"
OUTPUT = "output"
TMP_SUFFIX = ".tmp"  # write_json_atomic writes NAME.tmp, then renames it to NAME
# Room the agent allocates for a task's outcome before it starts (the file
# outcome.json.tmp), so that the task can record how it ended on a full disk.
OUTCOME_ROOM = 64 * 1024
# The task process's exit code when it could not record its outcome for lack of
# space (EX_TEMPFAIL): the agent records the task failed with StorageFull.
EXIT_STORAGE_FULL = 75

# What str(uuid.UUID(...)) gives: the only form a task directory is named in.
_CANONICAL = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def canonical_task_id(text: str) -> str:
    """The canonical (lower-case, hyphenated) form of a UUID; ValueError otherwise."""
    if _CANONICAL.fullmatch(text) is not None:
        return text  # already canonical (the usual case): no need to parse it
    return str(uuid.UUID(text))


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    dir: Path

    @property
    def spec(self) -> Path:
        return self.dir / SPEC

    @property
    def status(self) -> Path:
        return self.dir / STATUS

    @property
    def outcome(self) -> Path:
        return self.dir / OUTCOME

    @property
    def outcome_room(self) -> Path:
        """The outcome's room, allocated before the task starts (OUTCOME_ROOM)."""
        return self.dir / (OUTCOME + TMP_SUFFIX)

    @property
    def child_log(self) -> Path:
        return self.dir / CHILD_LOG

    @property
    def output(self) -> Path:
        return self.dir / OUTPUT


def tasks_root(state_dir: Path) -> Path:
    return state_dir / "tasks"


def task_files(state_dir: Path, task_id: str) -> TaskFiles:
    if _CANONICAL.fullmatch(task_id) is None:
        raise ValueError(f"not a canonical task ID: {task_id!r}")
    return TaskFiles(tasks_root(state_dir) / task_id)


def write_json_atomic(path: Path, payload: Any, durable: bool = False) -> None:
    """Replace ``path`` with ``payload`` so readers see the old or the new file, never half.

    ``durable`` also fsyncs the file and its directory, so the new content
    survives a power loss (the outcome must; a heartbeat need not).

    A temporary file that is already there is written over, not truncated
    first: the outcome's is allocated before the task starts (``preallocate``),
    so on a full disk the outcome still fits; the length is cut afterwards
    (which never needs space).
    """
    tmp = path.with_name(path.name + TMP_SUFFIX)
    data = json.dumps(payload, separators=(",", ":")).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.ftruncate(fd, len(data))
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def preallocate(path: Path, size: int) -> None:
    """Create ``path`` with ``size`` bytes of allocated blocks (not a sparse file)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: Path) -> Any | None:
    """The JSON content of ``path``, or None if it is missing or not (yet) valid."""
    try:
        with open(path, "rb") as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
