"""Tasks hold the connections their paths are on; unmanage refuses while they do.

A task whose path (a kind's ``file:``/``device:`` resource) lies at or under a
managed connection's mount point (a ``file://`` connection's directory counts
as one), or is its block device, also holds ``connection:<id>`` for every ID
naming that target, from acceptance until it is final.
``unmanageStorageConnection`` of such an ID is ``ResourceBusy`` naming the
task. The in-process tests use real task processes and ``file://``
connections; ``resources_for_paths`` is also checked directly, with NFS mount
points (no mount: a fake runner) and a device-backed fake backend.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.connections_support import FakeRunner, ok
from tests.support import RpcFailure
from tests.tasks_support import (
    FINAL,
    TaskAgent,
    agent_runner,
    async_until,
    become_subreaper,
    in_process_agents,
    make_image,
    sha,
    until,
)
from vdsm_agent import errors, settings
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, Backend
from vdsm_agent.connections.backends.file import FileBackend
from vdsm_agent.connections.backends.nfs import NfsBackend
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.connections.probes import ProbeResult

# 2 MiB read at 128 KiB/s: the checksum runs ~16 s unless canceled (tests cancel it).
SLOW_RATE = 128 * 1024
SLOW_SIZE = 2 * 1024 * 1024


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


class Agent(TaskAgent):
    async def checksum(self, path: Path) -> str:
        answer = await self.call("startTask", kind="checksum", params={"path": str(path)})
        return str(answer["taskID"])

    async def reach(self, task_id: str, *states: str, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            task: dict[str, Any] = await self.call("getTask", taskID=task_id)
            assert task["state"] not in FINAL - set(states), task
            return task if task["state"] in states else None
        return dict(await async_until(check, timeout=timeout))

    async def stop(self, task_id: str) -> dict[str, Any]:
        await self.call("cancelTask", taskID=task_id)
        return await self.finish(task_id, timeout=20)


@pytest.fixture
async def agents(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    async with in_process_agents(aiohttp_client, tmp_path, Agent,
                                 probe_interval=0.3) as make:
        yield make


def storage_dir(agent: Agent, name: str = "sd") -> Path:
    directory = agent.images / name
    directory.mkdir()
    return directory


# -- the verbs, in-process --------------------------------------------------------------------


async def test_unmanage_refused_while_a_checksum_reads_under_the_connection(
        agents: Any) -> None:
    agent = await agents(task_io_rate_limit=SLOW_RATE)
    directory = storage_dir(agent)
    image = make_image(directory / "disk.img", SLOW_SIZE)
    await agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="sd")
    task_id = await agent.checksum(image)
    task = await agent.reach(task_id, "running")
    assert task["resources"] == ["connection:sd", f"file:{image.resolve()}"]

    failure = await agent.fails("unmanageStorageConnection", connectionID="sd")
    assert failure.code == errors.ResourceBusy.code == 204
    assert failure.name == "ResourceBusy"
    assert failure.data["taskID"] == task_id
    assert failure.data["holder"] == task_id
    assert failure.data["resource"] == "connection:sd"
    assert task_id in failure.data["detail"]
    assert (await agent.call("getStorageConnection", connectionID="sd"))["managed"] is True
    assert (await agent.call("getTask", taskID=task_id))["state"] == "running"

    assert (await agent.stop(task_id))["state"] == "canceled"
    answer = await agent.call("unmanageStorageConnection", connectionID="sd")
    assert answer["connectionID"] == "sd"
    assert answer["disconnected"] is True
    failure = await agent.fails("getStorageConnection", connectionID="sd")
    assert failure.name == "ConnectionNotFound"


async def test_a_task_on_a_connection_runs_to_done(agents: Any) -> None:
    # The child re-checks the kind's own resources; the connection is the agent's.
    agent = await agents()
    directory = storage_dir(agent)
    image = make_image(directory / "disk.img", 300_000, seed=3)
    await agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="sd")
    task_id = await agent.checksum(image)
    task = await agent.call("waitTask", taskID=task_id, timeout=20)
    assert task["state"] == "done", task
    assert task["result"]["checksum"] == sha(image)
    assert task["resources"] == ["connection:sd", f"file:{image.resolve()}"]
    spec = json.loads((agent.state / "tasks" / task_id / "spec.json").read_text())
    assert spec["resources"] == [f"file:{image.resolve()}"]
    assert spec["derivedResources"] == ["connection:sd"]
    assert (await agent.call("unmanageStorageConnection", connectionID="sd"))["disconnected"]


async def test_every_id_of_the_target_is_held_and_only_that_target(agents: Any) -> None:
    agent = await agents(task_io_rate_limit=SLOW_RATE)
    directory = storage_dir(agent, "sd")
    # A sibling whose name extends the first one's: not "under" it.
    sibling = storage_dir(agent, "sd2")
    image = make_image(directory / "disk.img", SLOW_SIZE)
    await agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="a")
    await agent.call("manageStorageConnection", uri=f"file://{directory}/", connectionID="b")
    await agent.call("manageStorageConnection", uri=f"file://{sibling}", connectionID="c")
    # A symlink is never followed (not even one inside the root); another spelling of
    # the same path is: the resolved path counts.
    link = agent.images / "link.img"
    link.symlink_to(image)
    assert (await agent.fails("startTask", kind="checksum",
                              params={"path": str(link)})).data["rule"] == "symlink"
    task_id = (await agent.call("startTask", kind="checksum", params={
        "path": f"{directory}//./{image.name}"}))["taskID"]
    task = await agent.call("getTask", taskID=task_id)
    assert task["resources"] == ["connection:a", "connection:b", f"file:{image.resolve()}"]
    for connection_id in ("a", "b"):
        failure = await agent.fails("unmanageStorageConnection", connectionID=connection_id)
        assert failure.name == "ResourceBusy"
        assert failure.data["holder"] == task_id
    assert (await agent.call("unmanageStorageConnection", connectionID="c"))["disconnected"]
    await agent.stop(task_id)
    assert (await agent.call("unmanageStorageConnection", connectionID="a"))["sharedWith"] == ["b"]
    assert (await agent.call("unmanageStorageConnection", connectionID="b"))["disconnected"]


async def test_a_queued_task_holds_the_connection_and_a_file_elsewhere_does_not(
        agents: Any) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = (await agent.call("startTask", kind="test.sleep",
                                params={"seconds": 60}))["taskID"]
    directory = storage_dir(agent)
    inside = make_image(directory / "disk.img", 4096)
    outside = make_image(agent.images / "other.img", 4096)
    await agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="sd")
    elsewhere = await agent.checksum(outside)
    assert (await agent.call("getTask", taskID=elsewhere))["resources"] == [
        f"file:{outside.resolve()}"]
    queued = await agent.checksum(inside)
    assert (await agent.call("getTask", taskID=queued))["state"] == "accepted"
    failure = await agent.fails("unmanageStorageConnection", connectionID="sd")
    assert failure.data["holder"] == queued
    # Canceled while queued: the resource is free at once.
    assert (await agent.stop(queued))["state"] == "canceled"
    assert (await agent.call("unmanageStorageConnection", connectionID="sd"))["disconnected"]
    await agent.stop(elsewhere)
    await agent.stop(blocker)


async def test_a_connection_managed_later_is_not_held(agents: Any) -> None:
    # Resources are fixed at submit: a connection managed afterwards is free.
    agent = await agents(task_io_rate_limit=SLOW_RATE)
    directory = storage_dir(agent)
    image = make_image(directory / "disk.img", SLOW_SIZE)
    task_id = await agent.checksum(image)
    await agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="sd")
    assert (await agent.call("getTask", taskID=task_id))["resources"] == [
        f"file:{image.resolve()}"]
    assert (await agent.call("unmanageStorageConnection", connectionID="sd"))["disconnected"]
    await agent.stop(task_id)


# -- a restarted agent still refuses -----------------------------------------------------------


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[Any]:
    with agent_runner(tmp_path, task_io_rate_limit=SLOW_RATE, probe_interval=0.3) as made:
        yield made


def test_the_hold_survives_an_agent_restart(runner: Any) -> None:
    directory = runner.images / "sd"
    directory.mkdir()
    image = make_image(directory / "disk.img", SLOW_SIZE)
    agent = runner.start()
    agent.call("manageStorageConnection", uri=f"file://{directory}", connectionID="sd")
    task_id = agent.call("startTask", kind="checksum", params={"path": str(image)})["taskID"]
    until(lambda: agent.call("getTask", taskID=task_id)["state"] == "running", timeout=15)
    runner.kill9()
    agent = runner.start()
    with pytest.raises(RpcFailure) as info:
        agent.call("unmanageStorageConnection", connectionID="sd")
    assert info.value.name == "ResourceBusy"
    assert info.value.data["holder"] == task_id
    agent.call("cancelTask", taskID=task_id)
    assert agent.call("waitTask", taskID=task_id, timeout=20)["state"] == "canceled"
    assert agent.call("unmanageStorageConnection", connectionID="sd")["disconnected"] is True


# -- resources_for_paths directly ------------------------------------------------------------


class DeviceBackend(Backend[uris.Endpoint]):
    """``dev://name``: attached at once; its block device is set by the test."""

    scheme = "dev"
    devices: dict[str, str] = {}

    def parse(self, uri: str) -> uris.Endpoint:
        return uris.Endpoint(scheme=self.scheme, uri=uri, key=uri)

    async def connect(self, endpoint: uris.Endpoint) -> Attachment:
        return Attachment(identity=endpoint.uri)

    async def disconnect(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> None:
        return None

    def probe(self, endpoint: uris.Endpoint, attachment: Attachment) -> ProbeResult:
        return ProbeResult.success(probeRead="session")

    def describe(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {"device": self.devices.get(endpoint.uri)}


async def test_resources_for_paths_mount_points_files_and_devices(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("")
    device = tmp_path / "fake-dev"
    device.write_text("")
    device_link = tmp_path / "by-id"
    device_link.symlink_to(device)
    DeviceBackend.devices = {"dev://one": str(device_link)}
    real_parent = tmp_path / "real-parent"
    (real_parent / "files").mkdir(parents=True)
    linked_parent = tmp_path / "linked-parent"  # the file:// URI goes through a symlink
    linked_parent.symlink_to(real_parent)
    files_dir = real_parent / "files"
    config = settings.defaults().replace(state_dir=str(tmp_path / "state"), probe_interval=5.0)
    failing = FakeRunner(lambda argv: ok(argv, stderr="no server", rc=32))
    manager = ConnectionManager(config, None, runner=failing, mountinfo=mountinfo,
                                backends={"nfs": NfsBackend, "file": FileBackend,
                                          "dev": DeviceBackend},
                                rng=random.Random(1))
    await manager.start()
    try:
        await manager.manage("n1", "nfs://server/exports/data")
        await manager.manage("n2", "nfs://server/exports/data/")
        await manager.manage("f", f"file://{linked_parent}/files")
        await manager.manage("d", "dev://one")
        await manager.manage("d-none", "dev://two")  # no device known
        mount_point = manager.status("n1")["connectionInfo"]["mountPoint"]

        # Under a mount point (not mounted here: only the name matters).
        assert await manager.resources_for_paths([f"{mount_point}/images/a.img"]) == [
            "connection:n1", "connection:n2"]
        assert await manager.resources_for_paths([mount_point]) == [
            "connection:n1", "connection:n2"]
        assert await manager.resources_for_paths([f"{mount_point}x/a.img"]) == []
        # Under a file:// directory, by its resolved path or the URI's own.
        assert await manager.resources_for_paths([str(files_dir / "x" / "y.img")]) == [
            "connection:f"]
        assert await manager.resources_for_paths([f"{linked_parent}/files/y.img"]) == [
            "connection:f"]
        # A block device: the resolved path of the target's device.
        assert await manager.resources_for_paths([str(device.resolve())]) == ["connection:d"]
        assert await manager.resources_for_paths([str(device_link)]) == []  # callers resolve
        assert await manager.resources_for_paths([]) == []
        assert await manager.resources_for_paths(
            ["/elsewhere/a.img", str(files_dir / "b.img"), str(device.resolve())]) == [
            "connection:d", "connection:f"]
        await manager.unmanage("f")
        assert await manager.resources_for_paths([str(files_dir / "b.img")]) == []
    finally:
        await manager.close()
