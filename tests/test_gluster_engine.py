"""The engine's Gluster verbs against a real agent and real GlusterFS (issue 22, item 5).

An in-process engine, one real agent process (tests/engine_support.py
``fleet``) with discovery every second, a distributed volume per test
(tests/gluster_support.py): startRebalance runs to done as a job bound to the
agent's task; removeBricks is stopped by stopRemoveBricks, and
commitRemoveBricks before completion fails its step with
GlusterTaskNotComplete; a rebalance started with the gluster CLI shows in
the engine as an external task; then a new startRebalance is stopped by
stopRebalance.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.connections_support import GlusterServer, gluster
from tests.engine_support import EngineClient, async_until, engine_config, fleet
from tests.gluster_support import Volume, gluster_volume
from vdsm_agent.engine.app import make_app
from vdsm_agent.tasks.gluster_discovery import task_id_for

# The session's glusterd and its fixture (gluster_server), shared with the
# connection tests: one glusterd per session, on its fixed port.
pytest_plugins = ["tests.connections_support"]

pytestmark = [pytest.mark.root, pytest.mark.tool("glusterd"), pytest.mark.tool("gluster")]

FILES = 200
SIZE = 16 * 1024
DISCOVERY_INTERVAL = 1.0
# Discovery (an interval and a round) plus the engine seeing the host's new task.
ENGINE_BOUND = DISCOVERY_INTERVAL + 6.0


@pytest.fixture
def volume(gluster_server: GlusterServer, tmp_path: Path) -> Iterator[Volume]:
    with gluster_volume(gluster_server, tmp_path / "gluster", bricks=3) as made:
        made.write_files(FILES, SIZE)
        yield made


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Any]:
    with fleet(tmp_path / "agents", 1, gluster_discovery_interval=DISCOVERY_INTERVAL,
               cancel_grace=20) as agents:
        yield agents[0]


async def engine_task(engine: EngineClient, host: str, task_id: str) -> dict[str, Any] | None:
    return await engine.task(host, task_id)


async def wait_task(engine: EngineClient, host: str, task_id: str,
                    timeout: float = 60) -> dict[str, Any]:
    async def final() -> dict[str, Any] | None:
        task = await engine_task(engine, host, task_id)
        return task if task and task["state"] in ("done", "failed", "canceled") else None
    return dict(await async_until(final, timeout=timeout, interval=0.2))


async def test_gluster_verbs_through_the_engine(aiohttp_client: Any, tmp_path: Path,
                                                agent: Any, volume: Volume) -> None:
    engine = EngineClient(await aiohttp_client(make_app(engine_config(tmp_path))))
    await engine.call("addHost", name="h1", url=agent.url)
    await engine.wait_status("h1", "up")
    before = volume.checksums()

    # removeBricks, stopped at once by stopRemoveBricks (during Gluster's start).
    leaving = volume.brick(volume.bricks[2])
    job = await engine.call("removeBricks", host="h1", volume=volume.name, bricks=[leaving])
    (step,) = job["steps"]
    assert job["params"]["kind"] == "gluster.removeBrick"

    async def running() -> bool:
        task = await engine_task(engine, "h1", step["taskID"])
        return bool(task and task["state"] == "running")
    await async_until(running, timeout=20, interval=0.1)
    stop = await engine.call("stopRemoveBricks", host="h1", volume=volume.name)
    assert stop["action"] == "cancelTask"
    assert stop["steps"][0]["taskID"] == step["taskID"]
    assert (await wait_task(engine, "h1", step["taskID"]))["state"] == "canceled"
    assert (await engine.wait_job(stop["jobID"]))["state"] == "done"
    none = await engine.error("stopRemoveBricks", host="h1", volume=volume.name)
    assert none.name == "TaskNotFound"

    # A commit before the migration completed: the step fails, named.
    commit = await engine.call("commitRemoveBricks", host="h1", volume=volume.name,
                               bricks=[leaving])
    done = await engine.wait_job(commit["jobID"])
    assert done["state"] == "failed"
    assert done["steps"][0]["lastError"]["name"] == "GlusterTaskNotComplete"
    assert leaving in volume.brick_names()

    # startRebalance after an added brick: a job bound to the agent's task, done.
    volume.add_brick()
    job = await engine.call("startRebalance", host="h1", volume=volume.name)
    (step,) = job["steps"]
    # The engine locks the volume from the job's creation: a second start is refused.
    busy = await engine.error("startRebalance", host="h1", volume=volume.name)
    assert busy.name == "ResourceBusy"
    assert busy.data["resource"] == f"gluster-volume:{volume.name}"
    assert busy.data["holder"] == step["taskID"]
    task = await wait_task(engine, "h1", step["taskID"])
    assert task["state"] == "done"
    assert task["external"] is False
    assert task["jobID"] == job["jobID"]
    assert (await engine.wait_job(job["jobID"]))["state"] == "done"
    on_host = agent.call("getTask", taskID=step["taskID"])
    assert on_host["result"]["glusterTaskID"] == volume.rebalance_task_id()
    assert on_host["result"]["files"] > 0
    # The engine keeps the agent's document: Gluster's task ID is in it (external).
    kept = (await engine.call("getTask", host="h1", taskID=step["taskID"]))["task"]
    assert kept["detail"]["external"] == {"glusterTaskID": volume.rebalance_task_id()}

    # A rebalance started with the gluster CLI: the agent discovers it, the engine
    # shows it as external, to its end.
    volume.add_brick()
    answer = gluster("volume", "rebalance", volume.name, "start", "--xml").stdout
    started = time.monotonic()
    gluster_id = ET.fromstring(answer).findtext("volRebalance/task-id")
    assert gluster_id
    discovered = task_id_for(gluster_id)

    async def seen() -> dict[str, Any] | None:
        return await engine_task(engine, "h1", discovered)
    task = await async_until(seen, timeout=ENGINE_BOUND, interval=0.1)
    assert time.monotonic() - started <= ENGINE_BOUND
    assert task["external"] is True
    assert task["jobID"] is None
    assert task["kind"] == "gluster.rebalance"
    assert (await wait_task(engine, "h1", discovered))["state"] == "done"
    kept = (await engine.call("getTask", host="h1", taskID=discovered))["task"]
    assert kept["detail"]["external"] == {"glusterTaskID": gluster_id}
    listing = await engine.call("listTasks", filter={"host": "h1", "external": True})
    assert discovered in [item["id"] for item in listing["tasks"]]
    assert volume.checksums() == before

    # The engine's lock went with those tasks: a new startRebalance is a job at once,
    # and stopRebalance (during Gluster's start) cancels its task; the agent stopped
    # the rebalance in Gluster (which then forgets it).
    volume.add_brick()
    job = await engine.call("startRebalance", host="h1", volume=volume.name)
    (step,) = job["steps"]

    async def rebalancing() -> bool:
        task = await engine_task(engine, "h1", step["taskID"])
        return bool(task and task["state"] == "running")
    await async_until(rebalancing, timeout=20, interval=0.1)
    stop = await engine.call("stopRebalance", host="h1", volume=volume.name)
    assert stop["action"] == "cancelTask"
    assert stop["steps"][0]["taskID"] == step["taskID"]
    assert (await wait_task(engine, "h1", step["taskID"]))["state"] == "canceled"
    assert (await engine.wait_job(stop["jobID"]))["state"] == "done"
    output = agent.call("getTaskOutput", taskID=step["taskID"], offset=0, maxBytes=1 << 20)
    assert "stopped the rebalance" in output["data"]
    none = await engine.error("stopRebalance", host="h1", volume=volume.name)
    assert none.name == "TaskNotFound"
    assert volume.checksums() == before
