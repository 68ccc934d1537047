"""The engine against real agent processes on loopback: learning state (events and
resynchronisation), dead, restarted and frozen hosts, partial results, external
tasks, fan-out jobs with retries, lost replies, locks, maintenance."""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.engine_support import (
    DroppingProxy,
    EngineClient,
    Fleet,
    FleetAgent,
    async_until,
    engine_config,
    fleet,
)
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.store.models import HostRow

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_fleet(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Three agents shared by the module (starting agents is the slow part): each
    test leaves them running, and ``three`` restarts or thaws any that is not."""
    with fleet(tmp_path_factory.mktemp("agents"), 3) as agents:
        yield agents


@pytest.fixture
def three(module_fleet: Fleet) -> Any:
    for agent in module_fleet:
        agent.thaw()
        if agent.proc.poll() is not None:
            agent.start()
    yield module_fleet
    for agent in module_fleet:
        agent.thaw()


async def register(engine: EngineClient, agents: Fleet | list[FleetAgent]) -> None:
    for agent in agents:
        await engine.call("addHost", name=agent.name, url=agent.url)
    for agent in agents:
        await engine.wait_status(agent.name, "up")


async def direct(agent: FleetAgent, method: str, **params: Any) -> Any:
    """A call straight to the agent (like curl on the host), off the event loop."""
    return await asyncio.to_thread(agent.call, method, **params)


async def start_external(agent: FleetAgent, **params: Any) -> str:
    answer = await direct(agent, "startTask", kind="test.sleep", params=params)
    return str(answer["taskID"])


async def engine_task(engine: EngineClient, host: str, task_id: str) -> dict[str, Any] | None:
    return await engine.task(host, task_id)


async def test_external_task_appears_within_a_second_and_its_end_is_recorded(make_engine,
                                                                             three):
    # Long resync and poll intervals: only the events feed can be this quick.
    engine = await make_engine(resync_interval=60, poll_interval=60)
    await register(engine, three)
    hosts = (await engine.call("listHosts"))["hosts"]
    assert [host["status"] for host in hosts] == ["up", "up", "up"]
    assert all(host["agentVersion"] for host in hosts)

    async def following() -> bool:
        return all(host["eventsFeed"] for host in (await engine.call("listHosts"))["hosts"])
    await async_until(following, timeout=10)

    started = time.monotonic()
    task_id = await start_external(three[1], seconds=0.6)

    async def seen() -> Any:
        return await engine_task(engine, "host2", task_id)
    task = await async_until(seen, timeout=1.0, interval=0.02)
    assert time.monotonic() - started < 1.0
    assert task["external"] is True
    assert task["jobID"] is None
    assert task["kind"] == "test.sleep"

    async def ended() -> Any:
        found = await engine_task(engine, "host2", task_id)
        return found if found and found["state"] == "done" else None
    task = await async_until(ended, timeout=5, interval=0.02)
    assert task["endedAt"] is not None
    listing = await engine.call("listTasks", filter={"host": "host2", "external": True},
                                pageSize=1000)
    assert task_id in [item["id"] for item in listing["tasks"]]
    assert listing["unreachableHosts"] == []
    counts = (await engine.host("host2"))["counts"]["tasks"]
    assert counts["done"] >= 1


async def test_killed_host_is_unknown_others_complete_then_refreshed(make_engine, three,
                                                                     tmp_path):
    engine = await make_engine()
    await register(engine, three)
    share = tmp_path / "share"
    share.mkdir()
    connection_id = f"share-{uuid.uuid4().hex[:8]}"
    job = await engine.call("manageStorageConnection", hosts=["host1", "host2", "host3"],
                            uri=f"file://{share}", connectionID=connection_id)
    assert (await engine.wait_job(job["jobID"]))["state"] == "done"
    began = time.monotonic()
    tasks = {agent.name: await start_external(agent, seconds=6) for agent in three}

    async def all_known() -> bool:
        listing = await engine.call("listTasks", pageSize=1000)
        return set(tasks.values()) <= {item["id"] for item in listing["tasks"]}

    await async_until(all_known, timeout=10)

    async def all_connected() -> bool:
        health = await engine.call("getConnectionHealth", connectionID=connection_id)
        return bool(health["connections"]
                    and health["connections"][0]["connected"] == ["host1", "host2", "host3"])
    await async_until(all_connected, timeout=15)

    three[2].kill()
    await engine.wait_status("host3", "non-responsive", timeout=10)
    listing = await engine.call("listTasks", pageSize=1000)
    assert listing["unreachableHosts"] == ["host3"]
    by_host = {item["host"]: item for item in listing["tasks"] if item["id"] in tasks.values()}
    assert by_host["host3"]["state"] == "unknown"
    assert by_host["host3"]["lastKnownState"] in ("running", "initializing", "accepted")
    assert by_host["host3"]["hostStatus"] == "non-responsive"
    for name in ("host1", "host2"):
        assert by_host[name]["state"] != "unknown"
        assert by_host[name]["id"] == tasks[name]
    health = (await engine.call("getConnectionHealth", connectionID=connection_id))
    assert health["unreachableHosts"] == ["host3"]
    (share_health,) = health["connections"]
    assert share_health["unknown"] == ["host3"]
    assert share_health["connected"] == ["host1", "host2"]
    unknown_only = await engine.call("listTasks", filter={"state": "unknown"}, pageSize=1000)
    assert {item["host"] for item in unknown_only["tasks"]} == {"host3"}
    assert tasks["host3"] in {item["id"] for item in unknown_only["tasks"]}

    # The task ends while its agent is down; the restarted agent finalizes it,
    # and the engine, once the host is up again, refreshes what it knows.
    await asyncio.sleep(max(0.0, began + 6.5 - time.monotonic()))
    await asyncio.to_thread(three[2].start)
    await engine.wait_status("host3", "up", timeout=15)

    async def refreshed() -> Any:
        found = await engine_task(engine, "host3", tasks["host3"])
        return found if found and found["state"] == "done" else None
    task = await async_until(refreshed, timeout=15)
    assert task["hostStatus"] == "up"
    assert (await engine.call("listTasks"))["unreachableHosts"] == []
    await async_until(all_connected, timeout=15)


async def test_frozen_host_never_delays_the_others(make_engine, three):
    engine = await make_engine(resync_interval=60, poll_interval=60)
    await register(engine, three)
    three[0].freeze()
    try:
        # Views answer at once from the store, whatever the frozen host does.
        started = time.monotonic()
        await engine.call("listTasks")
        await engine.call("listHosts")
        assert time.monotonic() - started < 1.0
        for agent in three.agents[1:]:
            began = time.monotonic()
            task_id = await start_external(agent, seconds=0.2)

            async def seen(agent: FleetAgent = agent, task_id: str = task_id) -> Any:
                return await engine_task(engine, agent.name, task_id)
            await async_until(seen, timeout=1.0, interval=0.02)
            assert time.monotonic() - began < 1.0
        await engine.wait_status("host1", "non-responsive", timeout=15)
        listing = await engine.call("listTasks", pageSize=1000)
        assert listing["unreachableHosts"] == ["host1"]
        for item in listing["tasks"]:
            # Only host1's unfinished tasks are unknown; finished ones stay final.
            unfinished = item["lastKnownState"] not in ("done", "failed", "canceled",
                                                        "interrupted")
            assert (item["state"] == "unknown") == (item["host"] == "host1" and unfinished)
        # Updates from the others still arrive on time while host1 stays frozen.
        task_id = await start_external(three[2], seconds=0.2)

        async def done() -> Any:
            found = await engine_task(engine, "host3", task_id)
            return found if found and found["state"] == "done" else None
        await async_until(done, timeout=3.0, interval=0.02)
    finally:
        three[0].thaw()
    await engine.wait_status("host1", "up", timeout=15)


async def test_fan_out_with_a_host_down_retries_when_it_returns(make_engine, three, tmp_path):
    engine = await make_engine()
    await register(engine, three)
    share = tmp_path / "share"
    share.mkdir()
    three[1].kill()
    data = f"data-{uuid.uuid4().hex[:8]}"
    job = await engine.call("manageStorageConnection", hosts=["host1", "host2", "host3"],
                            uri=f"file://{share}", connectionID=data)
    assert [step["connectionID"] for step in job["steps"]] == [data] * 3

    async def others_done() -> Any:
        current = await engine.call("getJob", jobID=job["jobID"])
        states = {step["host"]: step for step in current["steps"]}
        ok = (states["host1"]["state"] == states["host3"]["state"] == "done"
              and states["host2"]["attempts"] >= 1)
        return current if ok else None
    current = await async_until(others_done, timeout=15)
    host2_step = next(step for step in current["steps"] if step["host"] == "host2")
    assert host2_step["state"] == "pending"
    assert host2_step["lastError"]["name"] == "HostUnreachable"
    assert current["state"] == "running"
    health = await engine.call("getConnectionHealth", connectionID=data)
    assert "host2" in health["connections"][0]["unknown"]

    await asyncio.to_thread(three[1].start)
    done = await engine.wait_job(job["jobID"], timeout=30)
    assert done["state"] == "done", done
    assert done["endedAt"] is not None
    listed = await direct(three[1], "getStorageConnectionList")
    assert listed[data]["managed"] is True

    # Unmanage everywhere; a second unmanage finds nothing and is done too.
    job = await engine.call("unmanageStorageConnection", hosts=["host1", "host2", "host3"],
                            connectionID=data)
    assert (await engine.wait_job(job["jobID"]))["state"] == "done"
    again = await engine.call("unmanageStorageConnection", hosts=["host1"], connectionID=data)
    again = await engine.wait_job(again["jobID"])
    assert again["state"] == "done"
    assert again["steps"][0]["result"]["alreadyUnmanaged"] is True
    assert (await engine.call("getConnectionHealth", connectionID=data))["connections"] == []


async def test_lost_reply_never_runs_a_task_twice(make_engine, three):
    agent = three[0]
    before = {task["id"] for task in (await direct(agent, "listTasks",
                                                   pageSize=1000))["tasks"]}
    proxy = DroppingProxy(agent.port, "startTask", drops=1)
    await proxy.start()
    try:
        engine = await make_engine()
        await engine.call("addHost", name="host1", url=proxy.url)
        await engine.wait_status("host1", "up")
        job = await engine.call("startTask", host="host1", kind="test.sleep",
                                params={"seconds": 0.3})
        task_id = job["steps"][0]["taskID"]
        done = await engine.wait_job(job["jobID"], timeout=30)
        assert proxy.dropped == 1
        assert done["state"] == "done", done
        (step,) = done["steps"]
        assert step["taskID"] == task_id
        assert step["state"] == "done"
        # The agent ran exactly one task, the engine's, whatever the retries.
        listed = await direct(agent, "listTasks", pageSize=1000)
        ids = [task["id"] for task in listed["tasks"]]
        assert ids.count(task_id) == 1
        assert set(ids) - before == {task_id}
        task = await engine_task(engine, "host1", task_id)
        assert task["external"] is False
        assert task["jobID"] == job["jobID"]
    finally:
        await proxy.close()


async def test_resource_locks_and_cancel(make_engine, three):
    engine = await make_engine()
    await register(engine, three.agents[:2])
    job = await engine.call("startTask", host="host1", kind="test.sleep",
                            params={"seconds": 60, "resources": ["disk"]})
    task_id = job["steps"][0]["taskID"]

    async def running() -> bool:
        found = await engine_task(engine, "host1", task_id)
        return bool(found and found["state"] == "running")
    await async_until(running, timeout=15)
    busy = await engine.error("startTask", host="host1", kind="test.sleep",
                              params={"resources": ["disk"]})
    assert busy.name == "ResourceBusy"
    assert busy.data["holder"] == task_id
    assert busy.data["jobID"] == job["jobID"]
    assert busy.data["resource"] == "test:disk"
    # Another host has its own resources.
    other = await engine.call("startTask", host="host2", kind="test.sleep",
                              params={"seconds": 0.1, "resources": ["disk"]})
    assert (await engine.wait_job(other["jobID"]))["state"] == "done"
    # A kind the agent does not have: the step fails with the agent's error.
    bad = await engine.call("startTask", host="host2", kind="nosuchkind", params={})
    bad = await engine.wait_job(bad["jobID"])
    assert bad["state"] == "failed"
    assert bad["steps"][0]["lastError"]["name"] == "UnknownTaskKind"

    cancel = await engine.call("cancelTask", host="host1", taskID=task_id)
    cancel = await engine.wait_job(cancel["jobID"], timeout=30)
    assert cancel["state"] == "done"
    assert cancel["steps"][0]["result"]["taskState"] == "canceled"
    started = await engine.call("getJob", jobID=job["jobID"])
    assert started["state"] == "failed"
    assert started["steps"][0]["state"] == "canceled"
    assert (await engine.error("cancelTask", host="host1", taskID=task_id)
            ).name == "TaskNotActive"
    # The lock went with the task.
    again = await engine.call("startTask", host="host1", kind="test.sleep",
                              params={"seconds": 0.1, "resources": ["disk"]})
    assert (await engine.wait_job(again["jobID"]))["state"] == "done"
    refreshed = await engine.call("getTask", host="host1", taskID=task_id, refresh=True)
    assert refreshed["refreshed"] is True
    assert refreshed["task"]["detail"]["state"] == "canceled"


async def test_an_agent_without_a_kind_table_gets_no_early_lock(make_engine, three):
    """The engine's early locks come from the host's getTaskKinds (resourceParams): one
    agent seen as two hosts, directly ("new") and through a proxy that answers
    getTaskKinds "Method not found" ("old"). The old one gets no early lock (nor an
    early check: the host's own lock refuses a conflicting task)."""
    proxy = DroppingProxy(three[0].port, "none", drops=0, missing=("getTaskKinds",))
    await proxy.start()
    try:
        engine = await make_engine()
        await engine.call("addHost", name="old", url=proxy.url)
        await engine.call("addHost", name="new", url=three[0].url)
        await engine.wait_status("old", "up")
        await engine.wait_status("new", "up")
        disk = f"disk-{uuid.uuid4().hex[:8]}"
        params = {"seconds": 60, "resources": [disk]}
        kinds = engine.engine.jobs.kinds
        assert await kinds.early_locks(engine.engine.host("new"), "test.sleep", params) == [
            f"test:{disk}"]
        assert await kinds.early_locks(engine.engine.host("new"), "nosuchkind", params) == []
        assert await kinds.early_locks(engine.engine.host("old"), "test.sleep", params) == []
        first = await engine.call("startTask", host="old", kind="test.sleep", params=params)
        task_id = first["steps"][0]["taskID"]

        async def running() -> bool:
            found = await engine_task(engine, "old", task_id)
            return bool(found and found["state"] == "running")
        await async_until(running, timeout=15)
        # A conflicting start names no resource the engine can check: the job is made,
        # and its step fails with the host's own ResourceBusy.
        second = await engine.call("startTask", host="old", kind="test.sleep", params=params)
        refused = await engine.wait_job(second["jobID"], timeout=30)
        assert refused["state"] == "failed"
        assert refused["steps"][0]["lastError"]["name"] == "ResourceBusy"
        assert refused["steps"][0]["lastError"]["holder"] == task_id
        # The same agent as "new": the engine locks from the job's creation and refuses
        # a conflicting start itself, at once.
        other = {"seconds": 60, "resources": [f"{disk}-new"]}
        held = await engine.call("startTask", host="new", kind="test.sleep", params=other)
        busy = await engine.error("startTask", host="new", kind="test.sleep", params=other)
        assert busy.name == "ResourceBusy"
        assert busy.data["jobID"] == held["jobID"]
        held_id = held["steps"][0]["taskID"]

        async def known() -> bool:
            return await engine_task(engine, "new", held_id) is not None
        await async_until(known, timeout=15)
        cancel = await engine.call("cancelTask", host="new", taskID=held_id)
        assert (await engine.wait_job(cancel["jobID"], timeout=30))["state"] == "done"
        cancel = await engine.call("cancelTask", host="old", taskID=task_id)
        assert (await engine.wait_job(cancel["jobID"], timeout=30))["state"] == "done"
    finally:
        await proxy.close()


async def test_maintenance_stops_polling_until_taken_out(make_engine, three):
    agent = three[0]
    engine = await make_engine()
    await register(engine, [agent])
    await engine.call("setHostMaintenance", name="host1", maintenance=True)
    task_id = await start_external(agent, seconds=0.1)
    job = await engine.call("startTask", host="host1", kind="test.sleep",
                            params={"seconds": 0.1})
    await asyncio.sleep(1.5)
    assert await engine_task(engine, "host1", task_id) is None
    assert (await engine.call("getJob", jobID=job["jobID"]))["steps"][0]["attempts"] == 0
    assert (await engine.host("host1"))["status"] == "maintenance"
    await engine.call("setHostMaintenance", name="host1", maintenance=False)
    assert (await engine.wait_job(job["jobID"]))["state"] == "done"

    async def seen() -> Any:
        return await engine_task(engine, "host1", task_id)
    assert (await async_until(seen, timeout=10))["external"] is True
    unknown = uuid.uuid4()
    assert (await engine.error("getTask", host="host1", taskID=str(unknown))
            ).name == "TaskNotFound"


async def test_gap_in_the_feed_makes_a_resync_and_progress_is_followed(make_engine, three):
    agent = three[0]
    engine = await make_engine(resync_interval=60, poll_interval=60)
    await register(engine, [agent])
    worker = engine.engine.workers["host1"]

    async def following() -> bool:
        return bool(worker.events_supported and worker.sync_count)
    await async_until(following, timeout=10)
    syncs = worker.sync_count
    worker.feed.epoch = "an-epoch-of-a-previous-agent-process"  # as after an agent restart
    task_id = await start_external(agent, seconds=3, tick=0.05)

    async def resynced() -> bool:
        return worker.sync_count > syncs
    await async_until(resynced, timeout=10)

    async def progressed() -> Any:
        found = await engine_task(engine, "host1", task_id)
        percent = ((found or {}).get("progress") or {}).get("percent") or 0
        return found if percent > 0 else None
    task = await async_until(progressed, timeout=5)
    assert task["state"] == "running"
    await direct(agent, "cancelTask", taskID=task_id)


async def test_agent_without_events_feed_is_polled(make_engine, three):
    agent = three[1]
    proxy = DroppingProxy(agent.port, "none", drops=0, missing=("getEvents",))
    await proxy.start()
    try:
        engine = await make_engine(resync_interval=60, poll_interval=0.5)
        await engine.call("addHost", name="host2", url=proxy.url)
        await engine.wait_status("host2", "up")

        async def polled() -> bool:
            return (await engine.host("host2"))["eventsFeed"] is False
        await async_until(polled, timeout=10)
        task_id = await start_external(agent, seconds=0.1)

        async def done() -> Any:
            found = await engine_task(engine, "host2", task_id)
            return found if found and found["state"] == "done" else None
        assert (await async_until(done, timeout=5))["external"] is True
    finally:
        await proxy.close()


def test_a_failing_host_is_retried_with_jittered_backoff(tmp_path: Path) -> None:
    """Hosts that lost the engine together are not retried in lock-step: the
    delay after n failures is uniform up to retry_interval * 2^(n-1) (at most
    retry_max), never below retry_interval (it was exactly that ceiling)."""
    config = engine_config(tmp_path, retry_interval=2.0, retry_max=30.0)
    row = HostRow(name="h1", url="http://127.0.0.1:9", maintenance=False, last_seen=None,
                  last_error=None, agent_version=None, synced_at=None)
    worker = HostWorker(types.SimpleNamespace(config=config), row)
    worker.failures = 1
    assert {worker.retry_delay() for _ in range(20)} == {2.0}
    worker.failures = 4
    delays = [worker.retry_delay() for _ in range(200)]
    assert all(2.0 <= delay <= 16.0 for delay in delays)
    assert len({round(delay, 3) for delay in delays}) > 50
    worker.failures = 40
    assert max(worker.retry_delay() for _ in range(200)) <= 30.0
