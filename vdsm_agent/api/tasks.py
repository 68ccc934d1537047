"""Task verbs: thin wrappers over ``vdsm_agent.tasks.manager.TaskManager``."""

from __future__ import annotations

from typing import Any

from vdsm_agent import errors
from vdsm_agent.agent import Agent
from vdsm_agent.tasks.manager import TaskManager


def _tasks(agent: Agent) -> TaskManager:
    if agent.tasks is None:
        raise RuntimeError("the task manager is not running")
    return agent.tasks


async def start_task(agent: Agent, kind: str, params: dict[str, Any],
                     taskID: str | None = None, deadline: str | None = None) -> dict[str, Any]:
    return await _tasks(agent).submit(kind, params, taskID, deadline)


async def get_task(agent: Agent, taskID: str) -> dict[str, Any]:
    return await _tasks(agent).get(taskID)


async def list_tasks(agent: Agent, filter: dict[str, Any] | None = None, pageSize: int = 100,
                     pageToken: str | None = None,
                     changedSince: str | None = None) -> dict[str, Any]:
    return await _tasks(agent).list_tasks(filter, pageSize, pageToken, changedSince)


async def get_task_output(agent: Agent, taskID: str, offset: int = 0, maxBytes: int = 65536,
                          encoding: str = "utf-8") -> dict[str, Any]:
    return await _tasks(agent).read_output(taskID, offset, maxBytes, encoding)


async def cancel_task(agent: Agent, taskID: str) -> dict[str, Any]:
    return await _tasks(agent).cancel(taskID)


async def delete_task(agent: Agent, taskID: str) -> dict[str, Any]:
    return await _tasks(agent).delete(taskID)


async def wait_task(agent: Agent, taskID: str,
                    timeout: float = 30.0) -> dict[str, Any]:
    limit = agent.config.task_max_wait
    if timeout > limit:
        # The schema cannot know the setting (like getEvents and events_max_wait).
        raise errors.InvalidParams(
            f"params.timeout must be at most {limit:g} seconds (setting task_max_wait)",
            field="params.timeout", rule="maximum", maximum=limit)
    return await _tasks(agent).wait(taskID, timeout)


async def reset_task_state(agent: Agent, taskID: str, state: str,
                           reason: str) -> dict[str, Any]:
    return await _tasks(agent).reset(taskID, state, reason)


async def get_task_kinds(agent: Agent) -> dict[str, Any]:
    return {"kinds": _tasks(agent).kinds_info()}


HANDLERS = {
    "startTask": start_task,
    "getTask": get_task,
    "listTasks": list_tasks,
    "getTaskOutput": get_task_output,
    "cancelTask": cancel_task,
    "deleteTask": delete_task,
    "waitTask": wait_task,
    "resetTaskState": reset_task_state,
    "getTaskKinds": get_task_kinds,
}
