"""A kind's own notes in its task directory (``kind-notes.json``).

The child writes what a later ``verify`` needs and cannot derive from the
params (the UUID a format chose, the identity of the device when the work
started, the file a copy created) durably *before* the destructive step, so
that ``resetTaskState(..., "done")`` can check the work even after the
process was killed. ``KindEnv.task_dir`` says where the task directory is;
without it (an older agent) there are no notes and verify says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vdsm_agent import errors
from vdsm_agent.tasks import files
from vdsm_agent.tasks.kinds.base import KindEnv, TaskFailure, Verification

NAME = "kind-notes.json"


def _path(env: KindEnv) -> Path | None:
    return Path(env.task_dir) / NAME if env.task_dir else None


def save(env: KindEnv, durable: bool = True, **values: Any) -> None:
    """Merge ``values`` into the notes (durably: fsync of the file and the directory)."""
    path = _path(env)
    if path is None:
        return
    notes = load(env)
    notes.update(values)
    files.write_json_atomic(path, notes, durable=durable)


def load(env: KindEnv) -> dict[str, Any]:
    path = _path(env)
    if path is None:
        return {}
    value = files.read_json(path)
    return value if isinstance(value, dict) else {}


def outcome_result(env: KindEnv) -> dict[str, Any] | None:
    """The result the child recorded in ``outcome.json``, if it got that far."""
    if not env.task_dir:
        return None
    outcome = files.read_json(files.TaskFiles(Path(env.task_dir)).outcome)
    if isinstance(outcome, dict) and isinstance(outcome.get("result"), dict):
        return dict(outcome["result"])
    return None


def cannot_verify(exc: Exception) -> Verification:
    """The verdict when checking the work itself failed (device gone, tool error...)."""
    if isinstance(exc, errors.RpcError | TaskFailure):
        return Verification(False, f"cannot verify: {exc.name}: {exc.detail or exc}")
    return Verification(False, f"cannot verify: {type(exc).__name__}: {exc}")
