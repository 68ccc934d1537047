"""What the Gluster task kinds share: following a Gluster task to its end.

A rebalance and a remove-brick run in Gluster's own rebalance process, not in
the task's: the task's process starts it (or, for a task the agent found,
``glusterTaskID`` in the params, only follows it), then reads Gluster's
status every ``POLL`` seconds until it ends, and maps it onto ours:

==========================  =================================================
Gluster's status            the task
==========================  =================================================
in progress, not started    running; counts in the output, scanned in progress
completed                   done, the counts in the result
failed                      failed with GlusterTaskFailed
stopped                     canceled (someone ran ``... stop``)
"not started" (an error)    canceled: Gluster forgets a stopped task at once
anything else (paused...)   running, a warning names the status
==========================  =================================================

A cancel runs ``... stop``. While glusterd does not answer, the process
withholds its heartbeat: the task turns ``stale`` after ``stale_after`` (and
the output says why), and back to ``running`` once glusterd answers again;
the rebalance process itself goes on meanwhile.

Each Gluster task ID the agent follows is marked in the state directory
(``gluster-tasks/ID``) so that discovery (``tasks/gluster_discovery.py``)
does not take a task this agent started for one started elsewhere.
"""

from __future__ import annotations

import abc
import time
from pathlib import Path
from typing import Any, ClassVar, NoReturn

from rpc_schema.words import UUID
from vdsm_agent import errors
from vdsm_agent.errors import Failure
from vdsm_agent.system import gluster
from vdsm_agent.tasks import files
from vdsm_agent.tasks.kinds import notes, safety
from vdsm_agent.tasks.kinds.base import Canceled, KindEnv, TaskFailure, TaskKind

POLL = 1.0  # seconds between two status reads
# The longest a status read may take in the task: a hung glusterd must not stop
# the task's cancel for long.
STATUS_TIMEOUT = 10.0
# How long Gluster may answer a status read with an error before the task is
# taken for lost (after a glusterd restart it does so for a few seconds).
LOST_AFTER = 30.0
PRINT_EVERY = 10.0  # a counts line at least this often while they do not change
MARKS = "gluster-tasks"  # under the state directory

VOLUME_SCHEMA: dict[str, Any] = {
    "type": "string", "pattern": gluster.VOLUME_PATTERN,
    "description": "The Gluster volume (letters, digits, '-' and '_')."}
BRICKS_SCHEMA: dict[str, Any] = {
    "type": "array", "minItems": 1, "maxItems": 64, "uniqueItems": True,
    "items": {"type": "string", "pattern": gluster.BRICK_PATTERN, "maxLength": 4096},
    "description": "Bricks as host:/path, exactly as the volume lists them."}
TASK_ID_SCHEMA: dict[str, Any] = {
    "type": "string", "pattern": UUID,
    "description": "Follow this Gluster task (started elsewhere) instead of starting one: "
                   "how the agent's discovery records a task started with the gluster CLI."}
COUNTS_SCHEMA: dict[str, Any] = {
    "glusterTaskID": {"type": "string"},
    "volume": {"type": "string"},
    "status": {"type": "string", "description": "Gluster's last status (statusStr)."},
    "files": {"type": "integer", "description": "Files moved."},
    "bytes": {"type": "integer", "description": "Bytes moved."},
    "scanned": {"type": "integer", "description": "Files scanned (Gluster's lookups)."},
    "failures": {"type": "integer"},
    "skipped": {"type": "integer"},
    "runtime": {"type": "number", "description": "Seconds, as Gluster counts them."},
}

# Gluster's status -> how the task ends (statuses not listed keep it running).
ENDS = {gluster.COMPLETED: "done", gluster.FAILED: "failed", gluster.STOPPED: "canceled",
        "fix-layout completed": "done", "fix-layout failed": "failed",
        "fix-layout stopped": "canceled"}
RUNNING = frozenset({gluster.IN_PROGRESS, gluster.NOT_STARTED, "fix-layout in progress"})


VOLUME = "gluster-volume"  # the resource class of a volume (resource_params)


def volume_resource(volume: str) -> str:
    return f"{VOLUME}:{volume}"


def marks_dir(state_dir: Path) -> Path:
    return state_dir / MARKS


def mark(env: KindEnv, gluster_task_id: str) -> None:
    """Record that this agent follows ``gluster_task_id`` (see the module)."""
    notes.save(env, glusterTaskID=gluster_task_id)
    if not env.task_dir:
        return
    # The task directory is STATE/tasks/ID (files.task_files).
    directory = marks_dir(Path(env.task_dir).parent.parent)
    directory.mkdir(mode=0o750, exist_ok=True)
    files.write_json_atomic(directory / gluster_task_id, {"taskID": env.task_id},
                            durable=True)


def forgotten(exc: gluster.GlusterError) -> bool:
    """Gluster no longer knows the volume's task: "Rebalance not started for volume
    V." / "remove-brick not started for volume V." (GlusterFS 10.3 answers so right
    after a ``... stop``, never reporting "stopped" to a later status read, and
    after a remove-brick's commit)."""
    return not isinstance(exc, gluster.GlusterUnavailable) and "not started" in exc.message


def command_error(exc: gluster.GlusterError, field: str | None = None) -> errors.RpcError:
    """The caller's error for a gluster CLI failure at submit."""
    data: dict[str, Any] = {"opErrstr": exc.message, "opErrno": exc.op_errno}
    if isinstance(exc, gluster.GlusterUnavailable):
        data["reason"] = "unavailable"
    if field:
        data["field"] = field
    return errors.GlusterCommandFailed(f"gluster: {exc.message}", **data)


def check_names(params: dict[str, Any]) -> None:
    """InvalidParams for a volume or brick the CLI could misread (beyond the schema's
    patterns: a keyword such as "all", a '..' in a brick's path)."""
    try:
        gluster.check_volume(params["volume"])
    except ValueError as exc:
        raise errors.InvalidParams(str(exc), field="params.params.volume",
                                   rule="volume") from None
    for index, brick in enumerate(params.get("bricks", ())):
        try:
            gluster.check_brick(brick)
        except ValueError as exc:
            raise errors.InvalidParams(str(exc), field=f"params.params.bricks[{index}]",
                                       rule="brick") from None


class GlusterTask(TaskKind):
    """A kind that starts (or follows) one Gluster task on a volume."""

    progress_unit = "files scanned"
    gluster_name: ClassVar[str]  # "rebalance" or "remove-brick", for messages
    resource_params = {"volume": VOLUME}

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        return [volume_resource(params["volume"])]

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        check_names(params)
        if safety.in_child(env):
            return  # the start itself says what is wrong
        try:
            gluster.volume_exists(params["volume"], STATUS_TIMEOUT)
        except gluster.GlusterError as exc:
            raise command_error(exc, "params.params.volume") from None

    # -- child side --------------------------------------------------------------------

    def __init__(self, params: dict[str, Any], ctx: Any) -> None:
        super().__init__(params, ctx)
        self.gluster_task_id: str | None = None
        self.stop_needed = False  # started or followed, and not seen ending
        self.last: gluster.TaskStatus | None = None

    @abc.abstractmethod
    def start(self) -> str:
        """Start the Gluster task; its ID."""

    @abc.abstractmethod
    def status(self) -> gluster.TaskStatus:
        """Gluster's status of the task (GlusterError when it cannot say)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask Gluster to stop the task."""

    def perform(self) -> dict[str, Any]:
        volume = self.params["volume"]
        adopted = self.params.get("glusterTaskID")
        if adopted:
            self.gluster_task_id = adopted
            self.ctx.print(f"following the {self.gluster_name} of volume {volume} started "
                           f"outside the agent, Gluster task {adopted}")
        else:
            self.ctx.check_cancel()
            try:
                self.gluster_task_id = self.start()
            except gluster.GlusterError as exc:
                raise command_error(exc) from None
            self.ctx.print(f"started the {self.gluster_name} of volume {volume}: Gluster "
                           f"task {self.gluster_task_id}")
        self.stop_needed = True
        mark(self.ctx.env, self.gluster_task_id)
        # In the task's record (external.glusterTaskID) from now on, not only at its end.
        self.ctx.report_external(glusterTaskID=self.gluster_task_id)
        return self.follow()

    def follow(self) -> dict[str, Any]:
        assert self.gluster_task_id is not None
        unreachable_since: float | None = None
        failing_since: float | None = None
        warned: set[str] = set()
        printed: tuple[tuple[str, int, int, int] | None, float] = (None, 0.0)
        while True:
            self.ctx.check_cancel()
            try:
                status = self.status()
            except gluster.GlusterUnavailable as exc:
                unreachable_since = self._unreachable(exc, unreachable_since)
                continue
            except gluster.GlusterError as exc:
                if forgotten(exc):
                    self._stopped_elsewhere(f"Gluster no longer knows it: {exc.message}")
                # Right after glusterd restarts it answers "brick operations failed"
                # for a while: lost only if that lasts.
                failing_since = self._failing(exc, failing_since)
                continue
            failing_since = None
            if unreachable_since is not None:
                self.ctx.print(f"glusterd answers again after "
                               f"{time.monotonic() - unreachable_since:.1f}s")
                unreachable_since = None
            if status.task_id is not None and status.task_id != self.gluster_task_id:
                self._lost(f"Gluster now reports task {status.task_id} on this volume")
            self.last = status
            self.ctx.progress(status.lookups, None)
            key = (status.status, status.files, status.lookups, status.failures)
            if key != printed[0] or time.monotonic() - printed[1] >= PRINT_EVERY:
                printed = (key, time.monotonic())
                self.ctx.print(self._line(status))
            if status.status not in RUNNING and status.status not in ENDS \
                    and status.status not in warned:
                warned.add(status.status)
                self.ctx.warn(f"Gluster reports the {self.gluster_name} as {status.status!r}")
            end = ENDS.get(status.status)
            if end is not None:
                return self._end(end, status)
            self.ctx.sleep(POLL)

    def _unreachable(self, exc: gluster.GlusterError, since: float | None) -> float:
        """glusterd does not answer: say so once, then wait without a heartbeat (the
        task turns stale) but still honour a cancel."""
        if since is None:
            since = time.monotonic()
            self.ctx.warn(f"glusterd does not answer ({exc.message}); the {self.gluster_name} "
                          "is followed again when it does")
        deadline = time.monotonic() + POLL
        while time.monotonic() < deadline:
            self.ctx.check_cancel()
            time.sleep(0.05)
        return since

    def _failing(self, exc: gluster.GlusterError, since: float | None) -> float:
        """glusterd answers with an error: said once, lost after LOST_AFTER seconds."""
        now = time.monotonic()
        if since is None:
            since = now
            self.ctx.print(f"Gluster cannot report the {self.gluster_name} now: {exc.message}")
        elif now - since >= LOST_AFTER:
            self._lost(exc.message)
        self.ctx.sleep(POLL)
        return since

    def _lost(self, why: str) -> NoReturn:
        self.stop_needed = False
        raise TaskFailure(Failure.GLUSTER_TASK_LOST,
                          f"Gluster no longer reports task {self.gluster_task_id}: {why}",
                          glusterTaskID=self.gluster_task_id)

    def _line(self, status: gluster.TaskStatus) -> str:
        return (f"{status.status}: {status.files} files ({status.size} bytes) moved, "
                f"{status.lookups} scanned, {status.failures} failures, {status.skipped} "
                f"skipped, {status.runtime:.0f}s")

    def result(self, status: gluster.TaskStatus) -> dict[str, Any]:
        return {"glusterTaskID": self.gluster_task_id, "volume": self.params["volume"],
                "status": status.status, **status.counts()}

    def _end(self, end: str, status: gluster.TaskStatus) -> dict[str, Any]:
        self.stop_needed = False
        if end == "done":
            return self.result(status)
        if end == "failed":
            raise TaskFailure(Failure.GLUSTER_TASK_FAILED,
                              f"the {self.gluster_name} of volume {self.params['volume']} "
                              f"failed ({status.failures} failures)",
                              glusterTaskID=self.gluster_task_id, counts=status.counts())
        self._stopped_elsewhere(f"Gluster reports it {status.status}")

    def _stopped_elsewhere(self, why: str) -> NoReturn:
        """Someone ran ``... stop`` (the gluster CLI, another tool): canceled."""
        self.stop_needed = False
        self.ctx.print(f"the {self.gluster_name} was stopped outside the agent ({why})")
        raise Canceled()

    def cleanup(self) -> None:
        """After a cancel (or a failure while it runs): stop the Gluster task."""
        if not self.stop_needed:
            return
        self.stop_needed = False
        try:
            self.stop()
        except gluster.GlusterError as exc:
            self.ctx.warn(f"could not stop the {self.gluster_name} (Gluster task "
                          f"{self.gluster_task_id}): {exc.message}; it may still run")
            return
        self.ctx.print(f"stopped the {self.gluster_name} (Gluster task {self.gluster_task_id})")
