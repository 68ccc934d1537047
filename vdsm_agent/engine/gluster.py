"""The engine's Gluster verbs: rebalance and remove-brick as jobs (docs/engine.md).

Each verb is a job of the existing machinery (``engine.jobs``) with one step
bound to a task of the host's agent, which is itself bound to Gluster's task
(its ``glusterTaskID``: the task's result, its output, and the params of a
task the agent discovered):

* ``startRebalance`` / ``removeBricks`` / ``commitRemoveBricks``: a
  ``startTask`` job of kind ``gluster.rebalance``, ``gluster.removeBrick``
  or ``gluster.removeBrickCommit`` (the agent refuses a commit before the
  migration completed: the step fails with GlusterTaskNotComplete);
* ``stopRebalance`` / ``stopRemoveBricks``: the host is asked which of its
  unfinished tasks of that kind works on the volume (an external one too: a
  task the agent discovered), then a ``cancelTask`` job for it; the agent's
  cancel runs ``gluster ... stop``.

The volume's lock (``gluster-volume:NAME``) is the agent's, and the engine
holds it too once the host reports the task's resources, like any task's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vdsm_agent import errors
from vdsm_agent.engine.agentclient import AgentError, AgentUnreachable

if TYPE_CHECKING:
    from vdsm_agent.engine.engine import Engine

REBALANCE = "gluster.rebalance"
REMOVE_BRICK = "gluster.removeBrick"
COMMIT = "gluster.removeBrickCommit"
UNFINISHED = ["accepted", "initializing", "running", "stale"]


async def start_rebalance(engine: Engine, host: str, volume: str) -> dict[str, Any]:
    return await engine.jobs.start_task(host, REBALANCE, {"volume": volume}, None)


async def remove_bricks(engine: Engine, host: str, volume: str, bricks: list[str],
                        migrate: bool = True) -> dict[str, Any]:
    params = {"volume": volume, "bricks": bricks, "migrate": migrate}
    return await engine.jobs.start_task(host, REMOVE_BRICK, params, None)


async def commit_remove_bricks(engine: Engine, host: str, volume: str,
                               bricks: list[str]) -> dict[str, Any]:
    return await engine.jobs.start_task(host, COMMIT, {"volume": volume, "bricks": bricks},
                                        None)


async def stop_rebalance(engine: Engine, host: str, volume: str) -> dict[str, Any]:
    return await _cancel_volume_task(engine, host, REBALANCE, volume)


async def stop_remove_bricks(engine: Engine, host: str, volume: str) -> dict[str, Any]:
    return await _cancel_volume_task(engine, host, REMOVE_BRICK, volume)


async def _cancel_volume_task(engine: Engine, host: str, kind: str,
                              volume: str) -> dict[str, Any]:
    task_id = await _unfinished_task(engine, host, kind, volume)
    return await engine.jobs.cancel_task(host, task_id)


async def _unfinished_task(engine: Engine, host: str, kind: str, volume: str) -> str:
    """The host's unfinished task of ``kind`` on ``volume`` (asked of the host: the
    engine does not keep a task's params)."""
    # Another engine's host (several engines) is asked from here all the same.
    worker = await engine.reach(host) if engine.leases is not None else engine.host(host)
    if worker is None:
        raise errors.HostNotFound(f"no host {host!r}", host=host)
    where = {"kind": kind, "state": UNFINISHED}
    token: str | None = None
    while True:
        params: dict[str, Any] = {"filter": where, "pageSize": 100}
        if token:
            params["pageToken"] = token
        try:
            page = await worker.call("listTasks", params)
        except AgentUnreachable as exc:
            raise errors.HostUnreachable(f"host {host} does not answer: {exc}",
                                         host=host) from None
        except AgentError as exc:
            raise errors.HostUnreachable(f"host {host} refused listTasks: {exc}",
                                         host=host) from None
        for task in page.get("tasks", ()):
            if (task.get("params") or {}).get("volume") == volume:
                return str(task["id"])
        token = page.get("nextPageToken")
        if not token:
            break
    raise errors.TaskNotFound(f"no {kind} task in flight on volume {volume} of host {host}",
                              host=host, kind=kind, volume=volume)
