"""Shared and exclusive resource locks (issue 22, item 4).

A checksum only reads: it holds its image (or device) shared, so two checksums
of one target run together, while a wipe or a copy onto it (exclusive)
conflicts, and ResourceBusy names every holder. Real task processes of an
in-process agent, rate-limited so that the checksums are still running when
the conflicting submits arrive; a real loop device for the wipe.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests import devices_fixtures
from tests.device_ops_support import Agent, MiB, agents, fill
from tests.devices_fixtures import DeviceLab
from tests.engine_support import async_until, fleet
from tests.tasks_support import FINAL
from vdsm_agent import errors
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.states import State
from vdsm_agent.tasks.table import TaskTable

lab = devices_fixtures.lab
__all__ = ["agents", "lab"]  # fixtures, used by name

SIZE = 16 * MiB
RATE = 4 * MiB  # task_io_rate_limit: a checksum of SIZE takes about 4 s


async def both_running(agent: Agent, first: str, second: str) -> None:
    """Both checksums are running at the same time (neither waits for the other)."""
    for _ in range(200):
        states = [(await agent.task(task_id))["state"] for task_id in (first, second)]
        if states == ["running", "running"]:
            return
        assert not FINAL & set(states), states
        await asyncio.sleep(0.05)
    raise AssertionError("the two checksums never ran together")


@pytest.mark.root
@pytest.mark.tool("losetup")
async def test_two_checksums_of_one_device_run_together_a_wipe_conflicts(
        agents: object, lab: DeviceLab) -> None:
    image = lab.image("shared.img", SIZE)
    fill(image, SIZE, seed=3)
    device = lab.attach(image)
    agent: Agent = await agents(task_io_rate_limit=RATE)  # type: ignore[operator]
    first = await agent.start("checksum", path=device)
    second = await agent.start("checksum", path=device)
    await both_running(agent, first, second)

    busy = await agent.refused("wipe", device=device, method="zero")
    assert busy.name == "ResourceBusy"
    assert busy.data["resource"] == f"device:{device}"
    assert busy.data["holder"] in (first, second)  # kept for older callers
    holders = {holder["taskID"]: holder for holder in busy.data["holders"]}
    assert set(holders) == {first, second}
    assert all(holder["shared"] for holder in holders.values())
    assert first in busy.data["detail"]
    assert second in busy.data["detail"]

    done = [await agent.finish(task_id) for task_id in (first, second)]
    assert [task["state"] for task in done] == ["done", "done"]
    assert done[0]["result"]["checksum"] == done[1]["result"]["checksum"]


def record(task_id: str, kind: str, resources: tuple[str, ...]) -> TaskRecord:
    return TaskRecord(id=task_id, kind=kind, params={}, request_hash="", state=State.RUNNING,
                      created_at=0.0, resources=resources)


def test_table_shared_and_exclusive(tmp_path: Path) -> None:
    table = TaskTable(tmp_path)
    table.adopt(record("a", "checksum", ("file:/x",)))
    table.check_free(["file:/x"], shared=True)  # a second reader may come
    with pytest.raises(errors.ResourceBusy) as info:
        table.check_free(["file:/x"])  # a writer may not
    assert info.value.data["holder"] == "a"
    table.adopt(record("b", "checksum", ("file:/x",)))
    with pytest.raises(errors.ResourceBusy) as info:
        table.check_free(["file:/x"])
    assert [h["taskID"] for h in info.value.data["holders"]] == ["a", "b"]
    # The first reader ends: the other still holds it, and holder_of names it.
    table.forget(table.active["a"])
    assert table.holders["file:/x"] == "b"
    with pytest.raises(errors.ResourceBusy):
        table.check_free(["file:/x"])
    table.forget(table.active["b"])
    table.check_free(["file:/x"])
    assert "file:/x" not in table.holders
    assert "file:/x" not in table.locks
    # An exclusive holder keeps readers out too.
    table.adopt(record("w", "wipe", ("file:/x",)))
    with pytest.raises(errors.ResourceBusy) as info:
        table.check_free(["file:/x"], shared=True)
    assert info.value.data["holders"] == [{"taskID": "w", "state": "running",
                                           "shared": False}]


# -- the engine's own locks ---------------------------------------------------------------------


async def test_engine_runs_two_checksums_of_one_image_a_copy_onto_it_is_busy(
        make_engine: Any, tmp_path: Path) -> None:
    """The engine's lock table holds a checksum's image shared too: two checksum jobs of
    one image run at once through the engine (a real engine in process, a real agent
    process), and a copy onto it is the engine's ResourceBusy naming both holders."""
    with fleet(tmp_path / "agents", 1, task_io_rate_limit=RATE) as agents:
        agent = agents[0]
        image = agent.images / "shared.img"
        fill(image, SIZE, seed=5)
        engine = await make_engine()
        await engine.call("addHost", name=agent.name, url=agent.url)
        await engine.wait_status(agent.name, "up")
        jobs = [await engine.call("startTask", host=agent.name, kind="checksum",
                                  params={"path": str(image)}) for _ in range(2)]
        task_ids = [job["steps"][0]["taskID"] for job in jobs]

        async def both_running() -> bool:
            listed = await asyncio.to_thread(agent.call, "listTasks")
            states = {task["id"]: task["state"] for task in listed["tasks"]}
            assert not FINAL & set(states.values()), states
            return all(states.get(task_id) == "running" for task_id in task_ids)
        await async_until(both_running, timeout=15)

        # A copy onto the image (exclusive): the engine refuses it itself, before
        # any call to the host (its lock table has both checksums, shared).
        source = agent.images / "source.img"
        fill(source, MiB, seed=6)
        busy = await engine.error("startTask", host=agent.name, kind="copy",
                                  params={"source": str(source), "destination": str(image)})
        assert busy.name == "ResourceBusy", busy
        assert busy.data["resource"] == f"file:{image}"
        assert busy.data["holder"] in task_ids
        holders = {holder["taskID"]: holder for holder in busy.data["holders"]}
        assert sorted(holders) == sorted(task_ids)
        assert all(holder["shared"] for holder in holders.values())
        for job in jobs:
            assert (await engine.wait_job(job["jobID"], timeout=30))["state"] == "done"
