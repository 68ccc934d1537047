"""Conditional resync (issue 18, point 2) against real agent processes.

``listTasks`` and ``getStorageConnectionList`` take ``changedSince`` (the
``changeToken`` of an earlier answer): an unchanged host answers "not
modified"; a task created, changed or deleted, a connection managed or
unmanaged, is a full answer again; a token from before a kill -9 and a
restart of the agent is a full answer, never "not modified". Then the
engine's resync uses the tokens: an unchanged host is read for nothing and
a change made meanwhile still reaches its views.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_support import EngineClient, FleetAgent, async_until, engine_config
from tests.support import until
from tests.tasks_support import AgentRunner, agent_runner, become_subreaper
from vdsm_agent.engine.app import make_app


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[AgentRunner]:
    with agent_runner(tmp_path) as made:
        made.start()
        yield made


def _tasks(runner: AgentRunner, since: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"pageSize": 1000}
    if since is not None:
        params["changedSince"] = since
    answer: dict[str, Any] = runner.agent.call("listTasks", **params)
    return answer


def _connections(runner: AgentRunner, since: str = "") -> dict[str, Any]:
    answer: dict[str, Any] = runner.agent.call("getStorageConnectionList", changedSince=since)
    return answer


def _managed(connections: dict[str, Any]) -> dict[str, Any]:
    """The managed IDs (mounts of other tests on this machine are listed as unmanaged)."""
    return {key: value for key, value in connections.items() if value["managed"]}


def _sleep_task(runner: AgentRunner, seconds: float) -> str:
    task = runner.agent.call("startTask", kind="test.sleep", params={"seconds": seconds})
    return str(task["taskID"])


def _wait_final(runner: AgentRunner, task_id: str) -> None:
    until(lambda: runner.agent.call("getTask", taskID=task_id)["state"] == "done",
          timeout=15)


def test_unchanged_host_is_not_modified_and_costs_no_listing(runner: AgentRunner) -> None:
    task_id = _sleep_task(runner, 0)
    _wait_final(runner, task_id)
    first = _tasks(runner)
    assert [task["id"] for task in first["tasks"]] == [task_id]
    token = first["changeToken"]
    assert first["notModified"] is False
    again = _tasks(runner, token)
    assert again == {"tasks": [], "nextPageToken": None, "changeToken": token,
                     "notModified": True}
    connections = _connections(runner)
    assert connections["notModified"] is False
    assert _managed(connections["connections"]) == {}
    same = _connections(runner, connections["changeToken"])
    assert same == {"connections": None, "changeToken": connections["changeToken"],
                    "notModified": True}
    # A token that is not this agent's is a full answer, never "not modified".
    assert _tasks(runner, "someone-else.1")["tasks"][0]["id"] == task_id


def test_created_changed_and_deleted_tasks_are_seen(runner: AgentRunner) -> None:
    token = _tasks(runner)["changeToken"]
    task_id = _sleep_task(runner, 0.6)
    created = _tasks(runner, token)
    assert created["notModified"] is False
    assert [task["id"] for task in created["tasks"]] == [task_id]
    # Each listing's token, passed back, sees the task move on until it is done.
    token = created["changeToken"]
    states = {created["tasks"][0]["state"]}
    while "done" not in states:
        answer = _tasks(runner, token)
        if not answer["notModified"]:
            states.add(answer["tasks"][0]["state"])
            token = answer["changeToken"]
    done_token = token
    assert _tasks(runner, done_token)["notModified"] is True
    runner.agent.call("deleteTask", taskID=task_id)
    deleted = _tasks(runner, done_token)
    assert deleted["notModified"] is False
    assert deleted["tasks"] == []


def test_connection_managed_and_unmanaged_are_seen(runner: AgentRunner, tmp_path: Path) -> None:
    directory = runner.images / "export"
    directory.mkdir()
    token = _connections(runner)["changeToken"]
    runner.agent.call("manageStorageConnection", uri=f"file://{directory}",
                      connectionID="sd-1")
    managed = _connections(runner, token)
    assert managed["notModified"] is False
    assert "sd-1" in managed["connections"]
    token = managed["changeToken"]
    # It connects (a state change) within a probe; then nothing changes.
    until(lambda: _connections(runner)["connections"]["sd-1"]["state"] == "connected")
    token = _connections(runner, token)["changeToken"]
    assert _connections(runner, token)["notModified"] is True
    runner.agent.call("unmanageStorageConnection", connectionID="sd-1")
    unmanaged = _connections(runner, token)
    assert unmanaged["notModified"] is False
    assert "sd-1" not in unmanaged["connections"]


def test_token_from_before_a_kill9_restart_gets_the_full_answer(runner: AgentRunner) -> None:
    task_id = _sleep_task(runner, 0)
    _wait_final(runner, task_id)
    tasks_token = _tasks(runner)["changeToken"]
    connections_token = _connections(runner)["changeToken"]
    assert _tasks(runner, tasks_token)["notModified"] is True
    runner.kill9()
    runner.start()
    # The same tasks (nothing changed them), but another process: a full answer.
    answer = _tasks(runner, tasks_token)
    assert answer["notModified"] is False
    assert [task["id"] for task in answer["tasks"]] == [task_id]
    assert answer["changeToken"] != tasks_token
    connections = _connections(runner, connections_token)
    assert connections["notModified"] is False
    assert _managed(connections["connections"]) == {}


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FleetAgent]:
    made = FleetAgent(tmp_path, "host1")
    try:
        made.start()
        yield made
    finally:
        made.close()


async def test_the_engine_reads_an_unchanged_host_for_nothing_and_misses_no_change(
        aiohttp_client: Any, tmp_path: Path, agent: FleetAgent) -> None:
    # A resync every ~0.3 s: many rounds in a second or two.
    client = await aiohttp_client(make_app(engine_config(tmp_path, resync_interval=0.3)))
    engine = EngineClient(client)
    done = await asyncio.to_thread(agent.call, "startTask", kind="test.sleep",
                                   params={"seconds": 0})
    await engine.call("addHost", name="host1", url=agent.url)
    await engine.wait_status("host1", "up")
    worker = engine.engine.workers["host1"]
    await async_until(lambda: engine.task("host1", done["taskID"]), timeout=10)

    # Nothing changes: the resyncs go on, and read nothing.
    before = worker.not_modified
    rounds = worker.sync_count
    async def rounds_done() -> bool:
        return bool(worker.sync_count >= rounds + 3)
    await async_until(rounds_done, timeout=10)
    assert worker.not_modified >= before + 2
    assert worker.listings.conditional is True

    # A task deleted on the host (no event tells of it): gone from the engine's view.
    await asyncio.to_thread(agent.call, "deleteTask", taskID=done["taskID"])

    async def gone() -> bool:
        return await engine.task("host1", done["taskID"]) is None
    await async_until(gone, timeout=10)
    # A connection managed on the host behind the engine's back: in its view.
    export = agent.images / "export"
    export.mkdir()
    await asyncio.to_thread(agent.call, "manageStorageConnection", uri=f"file://{export}",
                            connectionID="sd-behind")

    async def health() -> dict[str, Any]:
        found = await engine.call("getConnectionHealth", connectionID="sd-behind")
        return {host: item["state"] for entry in found["connections"]
                for host, item in entry["hosts"].items()}

    async def listed() -> bool:
        return (await health()).get("host1") == "connected"
    await async_until(listed, timeout=10)
    # ... and unmanaged there: gone from it.
    await asyncio.to_thread(agent.call, "unmanageStorageConnection", connectionID="sd-behind")

    async def unlisted() -> bool:
        return "host1" not in await health()
    await async_until(unlisted, timeout=10)
