"""Discovery of Gluster tasks started outside the agent (the gluster CLI, another tool).

Every ``gluster_discovery_interval`` seconds a worker thread asks glusterd for
every rebalance and remove-brick it knows (``gluster volume status all
tasks``) and leaves out those this agent already follows (each task's process
marks the Gluster task ID it follows: ``gluster_task.mark``). Each one left
becomes a task of this agent, submitted like any other with
``params.glusterTaskID``: its process follows the Gluster task instead of
starting one, so it shows in listTasks with the same progress and end, holds
``gluster-volume:NAME``, and a cancel stops it. Its ID is derived from
Gluster's (``task_id_for``: uuid5), so a second sighting is an idempotent
retry, and the same Gluster task has the same ID on every agent run.

Nothing of this runs on the event loop but the submit: the CLI and the marks
are read in a worker thread. A Gluster task whose volume a task of this agent
holds is left alone (ResourceBusy: it is that task's, or will be once it marks
it). Off when the interval is 0, or when there is no gluster CLI.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.system import gluster
from vdsm_agent.tasks.kinds.gluster_task import marks_dir

if TYPE_CHECKING:
    from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

# Task IDs of discovered tasks: uuid5(NAMESPACE, Gluster's task ID).
NAMESPACE = uuid.UUID("8d0f6f1e-5b7a-4c39-9a53-2f7c1e0b6d41")
KINDS = {"rebalance": "gluster.rebalance", "remove brick": "gluster.removeBrick"}


def task_id_for(gluster_task_id: str) -> str:
    """The agent's task ID for a discovered Gluster task (stable across runs)."""
    return str(uuid.uuid5(NAMESPACE, gluster_task_id.lower()))


@dataclasses.dataclass(frozen=True)
class Found:
    kind: str
    params: dict[str, Any]
    gluster_task_id: str


def unfollowed(state_dir: Path, timeout: float) -> list[Found]:
    """Blocking: the Gluster tasks no task of this agent follows yet."""
    marks = marks_dir(state_dir)
    found = []
    for task in gluster.volume_tasks(timeout):
        kind = KINDS.get(task.type.lower())
        if kind is None or (marks / task.task_id).exists():
            continue
        try:
            gluster.check_volume(task.volume)
            for brick in task.bricks:
                gluster.check_brick(brick)
        except ValueError:
            log.warning("gluster task %s: volume %r or bricks %r cannot be followed",
                        task.task_id, task.volume, task.bricks)
            continue
        params: dict[str, Any] = {"volume": task.volume, "glusterTaskID": task.task_id}
        if kind == "gluster.removeBrick":
            if not task.bricks:
                continue
            params["bricks"] = list(task.bricks)
        found.append(Found(kind, params, task.task_id))
    return found


class GlusterDiscovery:
    def __init__(self, manager: TaskManager) -> None:
        self.manager = manager
        self.interval = float(manager.config.gluster_discovery_interval)
        self._unavailable_logged = False

    async def enabled(self) -> bool:
        if self.interval <= 0:
            return False
        return await asyncio.to_thread(shutil.which, gluster.GLUSTER) is not None

    async def loop(self) -> None:
        """The background loop (``TaskManager.start``)."""
        if not await self.enabled():
            log.debug("gluster task discovery is off (interval 0 or no gluster CLI)")
            return
        # The first look one interval after start, not at once: an agent that lives
        # for less (a test's) never runs the CLI, and start-up is not slowed.
        while not await self._closed_within(self.interval):
            await self.round()

    async def _closed_within(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(self.manager.closing.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def round(self) -> list[str]:
        """One look: the IDs of the tasks it submitted (new or known)."""
        timeout = max(self.interval, 10.0)
        try:
            found = await asyncio.to_thread(unfollowed, self.manager.state_dir, timeout)
        except gluster.GlusterError as exc:
            if not self._unavailable_logged:
                log.info("gluster task discovery: %s", exc.message)
                self._unavailable_logged = True
            return []
        self._unavailable_logged = False
        submitted = []
        for item in found:
            task_id = task_id_for(item.gluster_task_id)
            try:
                await self.manager.submit(item.kind, item.params, task_id)
            except errors.ResourceBusy:
                continue  # the volume's holder started it (it marks it shortly)
            except errors.RpcError as exc:
                log.info("gluster task %s on volume %s: not followed: %s: %s",
                         item.gluster_task_id, item.params["volume"], exc.name,
                         exc.detail or exc)
                continue
            submitted.append(task_id)
            log.info("gluster task %s (%s of volume %s) discovered: task %s",
                     item.gluster_task_id, item.kind, item.params["volume"], task_id)
        return submitted
