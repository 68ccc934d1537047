"""gluster.removeBrick and gluster.removeBrickCommit.

``gluster.removeBrick`` runs ``gluster volume remove-brick VOLUME BRICK...
start`` (the data on the bricks migrates to the others) and follows it to
its end (``gluster_task``); cancel stops it. With ``migrate: false`` it
runs ``... force`` instead: the bricks leave at once, and their files with
them (destructive).

``gluster.removeBrickCommit`` commits a remove-brick whose migration
completed: the bricks leave the volume. Before the migration completed it is
refused at submit with ``GlusterTaskNotComplete`` (data.status), and checked
again in the task's process before the commit. Both lock
``gluster-volume:VOLUME`` like a rebalance.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vdsm_agent import errors
from vdsm_agent.system import gluster
from vdsm_agent.tasks.kinds import safety
from vdsm_agent.tasks.kinds.base import KindEnv
from vdsm_agent.tasks.kinds.gluster_task import (
    BRICKS_SCHEMA,
    COUNTS_SCHEMA,
    STATUS_TIMEOUT,
    TASK_ID_SCHEMA,
    VOLUME_SCHEMA,
    GlusterTask,
    check_names,
    command_error,
    forgotten,
    mark,
    volume_resource,
)


class GlusterRemoveBrick(GlusterTask):
    name = "gluster.removeBrick"
    gluster_name = "remove-brick"
    description = ("Remove bricks from a Gluster volume: with migrate (the default) "
                   "gluster volume remove-brick VOLUME BRICK... start, followed until the "
                   "data has moved off them (then gluster.removeBrickCommit); cancel stops "
                   "it. Without migrate, remove-brick ... force: the bricks and the files "
                   "on them leave at once.")
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["volume", "bricks"],
        "additionalProperties": False,
        "properties": {
            "volume": VOLUME_SCHEMA,
            "bricks": BRICKS_SCHEMA,
            "migrate": {"type": "boolean", "default": True,
                        "description": "Move the bricks' data to the other bricks first "
                                       "(false: remove them at once, their files lost)."},
            "glusterTaskID": TASK_ID_SCHEMA,
        },
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["volume", "status"],
        "properties": {**COUNTS_SCHEMA, "bricks": {"type": "array",
                                                   "items": {"type": "string"}}},
    }

    def perform(self) -> dict[str, Any]:
        if self.params["migrate"] or self.params.get("glusterTaskID"):
            return super().perform()
        self.ctx.check_cancel()
        try:
            gluster.remove_brick_force(self.params["volume"], self.params["bricks"])
        except gluster.GlusterError as exc:
            raise command_error(exc) from None
        self.ctx.print(f"removed {', '.join(self.params['bricks'])} from volume "
                       f"{self.params['volume']} without migrating their data")
        return {"volume": self.params["volume"], "bricks": self.params["bricks"],
                "status": "removed"}

    def result(self, status: gluster.TaskStatus) -> dict[str, Any]:
        return {**super().result(status), "bricks": self.params["bricks"]}

    def start(self) -> str:
        return gluster.remove_brick_start(self.params["volume"], self.params["bricks"])

    def status(self) -> gluster.TaskStatus:
        return gluster.remove_brick_status(self.params["volume"], self.params["bricks"],
                                           timeout=STATUS_TIMEOUT)

    def stop(self) -> None:
        gluster.remove_brick_stop(self.params["volume"], self.params["bricks"])


def check_completed(volume: str, bricks: list[str]) -> gluster.TaskStatus:
    """The remove-brick's status; GlusterTaskNotComplete unless it completed."""
    try:
        status = gluster.remove_brick_status(volume, bricks, STATUS_TIMEOUT)
    except gluster.GlusterError as exc:
        # Gluster forgets a stopped remove-brick: "remove-brick not started for volume V."
        if not forgotten(exc):
            raise command_error(exc) from None
        status = gluster.TaskStatus(None, 0, gluster.NOT_STARTED)
    if status.status != gluster.COMPLETED:
        raise errors.GlusterTaskNotComplete(
            f"the remove-brick of {', '.join(bricks)} from volume {volume} is "
            f"{status.status!r}, not completed: commit only after its data migration "
            "completed (its task done), or stop it", volume=volume, bricks=bricks,
            status=status.status, glusterTaskID=status.task_id)
    return status


class GlusterRemoveBrickCommit(GlusterTask):
    name = "gluster.removeBrickCommit"
    gluster_name = "remove-brick commit"
    destructive = True
    description = ("Commit a remove-brick whose data migration completed (gluster volume "
                   "remove-brick VOLUME BRICK... commit): the bricks leave the volume. "
                   "Refused with GlusterTaskNotComplete before the migration completed.")
    params_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["volume", "bricks"],
        "additionalProperties": False,
        "properties": {"volume": VOLUME_SCHEMA, "bricks": BRICKS_SCHEMA},
    }
    result_schema: ClassVar[dict[str, Any]] = {
        "type": "object",
        "required": ["volume", "bricks", "glusterTaskID", "committed"],
        "properties": {"volume": {"type": "string"},
                       "bricks": {"type": "array", "items": {"type": "string"}},
                       "glusterTaskID": {"type": ["string", "null"]},
                       "committed": {"type": "boolean"}},
    }

    @classmethod
    def validate(cls, params: dict[str, Any], env: KindEnv) -> None:
        check_names(params)
        if not safety.in_child(env):
            check_completed(params["volume"], params["bricks"])

    @classmethod
    def resources(cls, params: dict[str, Any], env: KindEnv) -> list[str]:
        return [volume_resource(params["volume"])]

    def perform(self) -> dict[str, Any]:
        volume, bricks = self.params["volume"], self.params["bricks"]
        status = check_completed(volume, bricks)  # again: it may have changed since
        self.ctx.check_cancel()
        if status.task_id:
            mark(self.ctx.env, status.task_id)
        try:
            gluster.remove_brick_commit(volume, bricks)
        except gluster.GlusterError as exc:
            raise command_error(exc) from None
        self.ctx.print(f"committed the remove-brick of {', '.join(bricks)} from volume "
                       f"{volume} (Gluster task {status.task_id})")
        return {"volume": volume, "bricks": bricks, "glusterTaskID": status.task_id,
                "committed": True}

    # A commit is one command: nothing to start, follow or stop.
    def start(self) -> str:
        raise NotImplementedError

    def status(self) -> gluster.TaskStatus:
        raise NotImplementedError

    def stop(self) -> None:
        return None
