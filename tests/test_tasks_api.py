"""Task verbs against an in-process agent whose tasks are real child processes.

Every result is checked against rpc_schema by RpcClient. Task processes are
killed (by process group) at teardown even when a test fails.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import datetime
import gc
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
import pytest

from tests.support import RpcFailure
from tests.tasks_support import (
    FINAL,
    TaskAgent,
    async_until,
    become_subreaper,
    in_process_agents,
    make_image,
    sha,
    task_pid,
)
from vdsm_agent.server.app import AGENT
from vdsm_agent.tasks import process, repository


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


class Agent(TaskAgent):
    async def state_of(self, task_id: str) -> str:
        return str((await self.call("getTask", taskID=task_id))["state"])

    def pid(self, task_id: str) -> int:
        return task_pid(self.state, task_id)


@pytest.fixture
async def agents(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[Any]:
    """Factory of in-process agents with task settings; kills task processes after."""
    async with in_process_agents(aiohttp_client, tmp_path, Agent) as make:
        yield make


@pytest.fixture
async def agent(agents: Any) -> Agent:
    result: Agent = await agents()
    return result


# -- kinds and capabilities ---------------------------------------------------------------


async def test_capabilities_and_kinds_list_registered_kinds(agent: Agent) -> None:
    caps = await agent.call("getCapabilities")
    assert caps["taskKinds"] == ["checksum", "copy", "format", "fsck", "gluster.rebalance",
                                 "gluster.removeBrick", "gluster.removeBrickCommit",
                                 "test.sleep", "wipe"]
    kinds = {k["name"]: k for k in (await agent.call("getTaskKinds"))["kinds"]}
    assert kinds["checksum"]["paramsSchema"]["properties"]["algorithm"]["enum"] == [
        "sha256", "sha1", "md5", "blake2b"]
    assert kinds["checksum"]["destructive"] is False


async def test_test_kinds_are_off_by_default(agents: Any) -> None:
    agent = await agents(enable_test_kinds=False)
    assert (await agent.call("getCapabilities"))["taskKinds"] == [
        "checksum", "copy", "format", "fsck", "gluster.rebalance", "gluster.removeBrick",
        "gluster.removeBrickCommit", "wipe"]
    failure = await agent.fails("startTask", kind="test.sleep", params={})
    assert failure.name == "UnknownTaskKind"
    assert failure.code == 207


# -- checksum ---------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["sha256", "sha1", "md5", "blake2b"])
async def test_checksum_matches_hashlib(agent: Agent, algorithm: str) -> None:
    image = make_image(agent.images / "disk.img", 3 * 1024 * 1024 + 17)
    task_id = await agent.start("checksum", path=str(image), algorithm=algorithm)
    task = await agent.finish(task_id)
    assert task["state"] == "done", task
    assert task["result"] == {"checksum": sha(image, algorithm), "algorithm": algorithm,
                              "bytes": image.stat().st_size}
    assert task["progress"]["percent"] == 100.0
    assert task["progress"]["done"] == image.stat().st_size
    assert task["resources"] == [f"file:{image.resolve()}"]
    for stamp in ("createdAt", "startedAt", "endedAt", "heartbeatAt"):
        assert task[stamp].endswith("Z")
        datetime.datetime.fromisoformat(task[stamp])


async def test_checksum_of_a_range_with_default_algorithm(agent: Agent) -> None:
    image = make_image(agent.images / "disk.img", 2 * 1024 * 1024 + 4096)
    # Whole 1 MiB blocks, or up to the end: no force needed.
    for offset, length in ((1 << 20, 1 << 20), (1 << 20, None)):
        params = {"offset": offset, **({"length": length} if length is not None else {})}
        task = await agent.finish(await agent.start("checksum", path=str(image), **params))
        assert task["params"] == {"path": str(image), "algorithm": "sha256", "force": False,
                                  **params}
        assert task["result"]["checksum"] == sha(image, "sha256", offset, length)
    # Any other range needs force (admin: docs/tasks.md).
    failure = await agent.fails("startTask", kind="checksum",
                                params={"path": str(image), "offset": 1000, "length": 500_000})
    assert (failure.data["field"], failure.data["rule"]) == ("params.params.offset",
                                                             "granularity")
    task_id = await agent.start("checksum", path=str(image), offset=1000, length=500_000,
                                force=True)
    task = await agent.finish(task_id)
    assert task["result"]["checksum"] == sha(image, "sha256", 1000, 500_000)
    assert task["result"]["bytes"] == 500_000


async def test_checksum_output_has_human_lines(agent: Agent) -> None:
    image = make_image(agent.images / "disk.img", 4 * 1024 * 1024)
    task_id = await agent.start("checksum", path=str(image))
    await agent.finish(task_id)
    text = (await agent.call("getTaskOutput", taskID=task_id))["data"]
    lines = text.splitlines()
    assert "starting" in lines[0]
    assert any("%" in line for line in lines), text
    assert any(sha(image) in line for line in lines)
    assert lines[-1].endswith("done")


async def test_checksum_range_beyond_the_end_is_invalid(agent: Agent) -> None:
    image = make_image(agent.images / "small.img", 1000)
    failure = await agent.fails("startTask", kind="checksum",
                                params={"path": str(image), "offset": 10, "length": 991})
    assert failure.code == -32602
    assert failure.data["field"] == "params.params.length"


@pytest.mark.parametrize(("params", "field", "rule"), [
    ({"path": "/x", "algorithm": "crc32"}, "params.params.algorithm", "enum"),
    ({}, "params.params.path", "required"),
    ({"path": "/x", "colour": "red"}, "params.params.colour", "additionalProperties"),
    ({"path": "/x", "offset": -1}, "params.params.offset", "minimum"),
    ({"path": "relative.img"}, "params.params.path", "pattern"),
])
async def test_kind_params_are_validated_against_the_kind_schema(
        agent: Agent, params: dict[str, Any], field: str, rule: str) -> None:
    failure = await agent.fails("startTask", kind="checksum", params=params)
    assert failure.code == -32602
    assert failure.data["name"] == "InvalidParams"
    assert failure.data["field"] == field
    assert failure.data["rule"] == rule


async def test_verb_params_are_validated_before_the_handler(agent: Agent) -> None:
    failure = await agent.fails("startTask", kind="checksum", params={"path": "/x"},
                                taskID="not-a-uuid")
    assert failure.code == -32602
    assert failure.data["field"] == "params.taskID"
    failure = await agent.fails("getTaskOutput", taskID=str(uuid.uuid4()), maxBytes=2 << 20)
    assert failure.data["field"] == "params.maxBytes"


# -- path confinement -----------------------------------------------------------------------


async def test_paths_outside_allowed_roots_are_refused(agent: Agent, tmp_path: Path) -> None:
    outside = make_image(tmp_path / "outside.img", 100)
    link = agent.images / "link.img"
    link.symlink_to(outside)
    for path in (str(outside), str(link), str(agent.images / ".." / ".." / "outside.img"),
                 "/etc/passwd"):
        failure = await agent.fails("startTask", kind="checksum", params={"path": path})
        assert failure.name == "PathNotAllowed", path
        assert failure.code == 302


async def test_dev_paths_must_be_block_devices(agent: Agent) -> None:
    failure = await agent.fails("startTask", kind="checksum", params={"path": "/dev/null"})
    assert failure.name == "PathNotAllowed"
    failure = await agent.fails("startTask", kind="checksum", params={"path": "/dev/nosuchdev"})
    assert failure.name == "DeviceNotFound"


async def test_missing_image_is_invalid_params(agent: Agent) -> None:
    failure = await agent.fails("startTask", kind="checksum",
                                params={"path": str(agent.images / "nope.img")})
    assert failure.code == -32602
    assert failure.data["field"] == "params.params.path"


@pytest.mark.root
@pytest.mark.tool("losetup")
async def test_checksum_of_a_block_device(agent: Agent) -> None:
    import subprocess

    image = make_image(agent.root / "backing.img", 4 * 1024 * 1024)
    device = subprocess.run(["losetup", "-f", "--show", "--read-only", str(image)],
                            check=True, capture_output=True, text=True).stdout.strip()
    try:
        task_id = await agent.start("checksum", path=device, algorithm="md5")
        task = await agent.finish(task_id)
        assert task["state"] == "done", task
        assert task["result"]["checksum"] == sha(image, "md5")
        assert task["resources"] == [f"device:{device}"]
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


# -- submit: idempotency, resources, queue ------------------------------------------------


async def test_retried_submit_with_the_same_id_is_idempotent(agent: Agent) -> None:
    task_id = str(uuid.uuid4())
    first = await agent.call("startTask", kind="test.sleep", params={"seconds": 0.3},
                             taskID=task_id)
    # Same request (defaults spelled out) -> the same task, however often.
    again = await agent.call("startTask", kind="test.sleep",
                             params={"seconds": 0.3, "tick": 0.05}, taskID=task_id.upper())
    assert first["taskID"] == again["taskID"] == task_id
    await agent.finish(task_id)
    after = await agent.call("startTask", kind="test.sleep", params={"seconds": 0.3},
                             taskID=task_id)
    assert after == {"taskID": task_id, "state": "done"}
    failure = await agent.fails("startTask", kind="test.sleep", params={"seconds": 5},
                                taskID=task_id)
    assert failure.name == "TaskIdConflict"
    assert failure.data["taskID"] == task_id
    listed = (await agent.call("listTasks"))["tasks"]
    assert [t["id"] for t in listed] == [task_id]


async def test_retry_is_answered_even_when_its_checks_would_now_fail(agent: Agent) -> None:
    # The store is asked about a submitted ID only when the checks fail (or at
    # the commit): a retry of an ended task must still get the first answer.
    task_id = str(uuid.uuid4())
    await agent.call("startTask", kind="test.sleep", taskID=task_id,
                     params={"seconds": 0.1, "resources": ["disk1"]})
    assert (await agent.finish(task_id))["state"] == "done"
    holder = await agent.start(seconds=30, resources=["disk1"])
    again = await agent.call("startTask", kind="test.sleep", taskID=task_id,
                             params={"seconds": 0.1, "resources": ["disk1"]})
    assert again == {"taskID": task_id, "state": "done"}
    # A different request under that ID is a conflict, not the check's error.
    failure = await agent.fails("startTask", kind="test.sleep", taskID=task_id,
                                params={"seconds": 9, "resources": ["disk1"]})
    assert failure.name == "TaskIdConflict"
    # A new ID meets the check's error.
    busy = await agent.fails("startTask", kind="test.sleep",
                             params={"seconds": 0.1, "resources": ["disk1"]})
    assert busy.name == "ResourceBusy"
    assert busy.data["holder"] == holder
    await agent.call("cancelTask", taskID=holder)
    assert len((await agent.call("listTasks"))["tasks"]) == 2


async def test_concurrent_identical_submits_make_one_task(agent: Agent) -> None:
    task_id = str(uuid.uuid4())
    answers = await asyncio.gather(*(
        agent.call("startTask", kind="test.sleep", params={"seconds": 0.2}, taskID=task_id)
        for _ in range(10)))
    assert {a["taskID"] for a in answers} == {task_id}
    assert len((await agent.call("listTasks"))["tasks"]) == 1


async def test_resource_busy_names_the_holder(agent: Agent) -> None:
    holder = await agent.start(seconds=30, resources=["disk1"])
    failure = await agent.fails("startTask", kind="test.sleep",
                                params={"seconds": 1, "resources": ["disk2", "disk1"]})
    assert failure.name == "ResourceBusy"
    assert failure.data["holder"] == holder
    assert failure.data["resource"] == "test:disk1"
    await agent.call("cancelTask", taskID=holder)
    await agent.finish(holder)
    other = await agent.start(seconds=0.1, resources=["disk1"])
    assert (await agent.finish(other))["state"] == "done"


async def test_two_checksums_of_one_file_share_it(agent: Agent) -> None:
    # A checksum holds its file shared (issue 22): a second one of the same file,
    # however spelt, runs beside it (exclusive holders: tests/test_shared_locks.py).
    image = make_image(agent.images / "disk.img", 1024)
    first = await agent.call("startTask", kind="checksum", params={"path": str(image)})
    second = await agent.call("startTask", kind="checksum",
                              params={"path": str(agent.images / "." / "disk.img")})
    tasks = [await agent.finish(answer["taskID"]) for answer in (first, second)]
    assert tasks[0]["resources"] == tasks[1]["resources"] == [f"file:{image}"]
    assert tasks[0]["result"]["checksum"] == tasks[1]["result"]["checksum"]


async def test_running_cap_queues_fifo_and_queue_cap_is_queue_full(agents: Any) -> None:
    agent = await agents(max_running_tasks=1, max_queued_tasks=2)
    first = await agent.start(seconds=0.6)
    second = await agent.start(seconds=0.1)
    third = await agent.start(seconds=0.1)
    await agent.reach(first, "running")
    assert await agent.state_of(second) == "accepted"
    failure = await agent.fails("startTask", kind="test.sleep", params={"seconds": 1})
    assert failure.name == "QueueFull"
    assert failure.code == 205
    tasks = [await agent.finish(t) for t in (first, second, third)]
    assert all(t["state"] == "done" for t in tasks)
    starts = [t["startedAt"] for t in tasks]
    ends = [t["endedAt"] for t in tasks]
    assert starts == sorted(starts)
    # One at a time: each started after the previous one ended.
    assert starts[1] >= ends[0]
    assert starts[2] >= ends[1]


async def test_a_queued_task_keeps_few_objects_for_the_garbage_collector(agents: Any) -> None:
    """Every collection walks every live container object, and a queue of tens of
    thousands of tasks paused the loop for up to 300 ms when each kept 13 (its
    asyncio lock and events, the record's lists, a progress throttle): what a
    queued task keeps is its TaskRecord, its Active and its event in the feed."""
    agent = await agents(max_running_tasks=1, max_queued_tasks=1000)
    manager = agent.rpc.app[AGENT].tasks
    await agent.start(seconds=60)  # holds the one run slot: the rest stay queued
    for _ in range(20):  # first-use caches and the like, outside the count
        await manager.submit("test.sleep", {"seconds": 1})
    gc.collect()
    # Held, not just their ids: a freed object's id can be a new object's.
    before = gc.get_objects()
    seen = {id(thing) for thing in before}
    count = 500
    for _ in range(count):
        await manager.submit("test.sleep", {"seconds": 1})
    gc.collect()
    kept = [thing for thing in gc.get_objects() if id(thing) not in seen]
    del before
    kinds = collections.Counter(type(thing).__name__ for thing in kept)
    assert kinds["Active"] == count
    assert len(kept) / count < 4, kinds.most_common(12)


async def test_startTask_returns_only_once_recorded(agent: Agent) -> None:
    task_id = await agent.start(seconds=0.1)
    # Straight from the store, not the manager's memory.
    manager = agent.rpc.app[AGENT].tasks
    record = await manager.store.run(repository.get, task_id)
    assert record is not None
    assert record.state in ("accepted", "initializing", "running", "done")


# -- getTask / listTasks ----------------------------------------------------------------------


async def test_unknown_task_is_task_not_found_everywhere(agent: Agent) -> None:
    missing = str(uuid.uuid4())
    for verb, extra in (("getTask", {}), ("cancelTask", {}), ("deleteTask", {}),
                        ("getTaskOutput", {}), ("waitTask", {"timeout": 0}),
                        ("resetTaskState", {"state": "failed", "reason": "x"})):
        failure = await agent.fails(verb, taskID=missing, **extra)
        assert failure.name == "TaskNotFound", verb
        assert failure.code == 200


async def test_list_filters_and_paginates_stably(agent: Agent) -> None:
    ids = []
    for index in range(5):
        ids.append(await agent.start(seconds=0.05 if index % 2 else 30))
        await asyncio.sleep(0.01)
    for task_id in ids[1::2]:
        await agent.finish(task_id)
    seen: list[str] = []
    token = None
    while True:
        params: dict[str, Any] = {"pageSize": 2}
        if token:
            params["pageToken"] = token
        page = await agent.call("listTasks", **params)
        assert len(page["tasks"]) <= 2
        seen += [t["id"] for t in page["tasks"]]
        token = page["nextPageToken"]
        if token is None:
            break
    assert seen == ids  # creation order, no duplicates, nothing missed
    done = await agent.call("listTasks", filter={"state": "done"})
    assert [t["id"] for t in done["tasks"]] == ids[1::2]
    unfinished = await agent.call("listTasks", filter={"state": ["accepted", "initializing",
                                                                 "running", "stale"]})
    assert [t["id"] for t in unfinished["tasks"]] == ids[0::2]
    assert (await agent.call("listTasks", filter={"kind": "checksum"}))["tasks"] == []
    first = await agent.call("getTask", taskID=ids[0])
    after = await agent.call("listTasks", filter={"createdAfter": first["createdAt"]})
    assert [t["id"] for t in after["tasks"]] == ids[1:]
    third = await agent.call("getTask", taskID=ids[2])
    before = await agent.call("listTasks", filter={"createdBefore": third["createdAt"]})
    assert [t["id"] for t in before["tasks"]] == ids[:2]


async def test_bad_page_tokens_are_invalid_params(agent: Agent) -> None:
    for _ in range(3):
        await agent.start(seconds=0.05)
    page = await agent.call("listTasks", pageSize=1)
    failure = await agent.fails("listTasks", pageToken="garbage!")
    assert failure.data["field"] == "params.pageToken"
    # A token is bound to its filter.
    failure = await agent.fails("listTasks", pageToken=page["nextPageToken"],
                                filter={"kind": "checksum"})
    assert failure.data["field"] == "params.pageToken"
    failure = await agent.fails("listTasks", filter={"createdAfter": "yesterday"})
    assert failure.code == -32602


async def test_progress_never_goes_backwards(agent: Agent) -> None:
    task_id = await agent.start(seconds=1.5)
    last = -1.0
    samples = 0
    while True:
        task = await agent.call("getTask", taskID=task_id)
        percent = task["progress"]["percent"]
        if percent is not None:
            assert percent >= last
            last = percent
            samples += 1
        if task["state"] in FINAL:
            break
        await asyncio.sleep(0.1)
    assert samples > 3
    assert last == 100.0


# -- output ----------------------------------------------------------------------------------


async def test_output_by_offset_and_base64(agent: Agent) -> None:
    task_id = await agent.start(seconds=0.1, outputBytes=10_000)
    await agent.finish(task_id)
    whole = await agent.call("getTaskOutput", taskID=task_id, maxBytes=1 << 20)
    assert whole["eof"] is True
    assert whole["truncatedBefore"] == 0
    size = whole["size"]
    assert whole["nextOffset"] == size
    parts = []
    offset = 0
    while True:
        chunk = await agent.call("getTaskOutput", taskID=task_id, offset=offset, maxBytes=777,
                                 encoding="base64")
        assert chunk["offset"] == offset
        parts.append(base64.b64decode(chunk["data"]))
        offset = chunk["nextOffset"]
        if chunk["eof"]:
            break
    assert b"".join(parts).decode() == whole["data"]
    task = await agent.call("getTask", taskID=task_id)
    assert task["outputSize"] == size


async def test_output_is_capped_keeping_the_newest_bytes(agents: Any) -> None:
    agent = await agents(output_max_bytes=8192)
    task_id = await agent.start(seconds=0.05, outputBytes=100_000)
    await agent.finish(task_id)
    chunk = await agent.call("getTaskOutput", taskID=task_id, offset=0, maxBytes=1 << 20)
    assert chunk["truncatedBefore"] > 90_000
    assert chunk["offset"] == chunk["truncatedBefore"]  # asked 0, got the first kept byte
    assert chunk["size"] - chunk["truncatedBefore"] <= 8192
    assert chunk["data"].endswith("done\n")
    assert chunk["eof"] is True
    segments = os.listdir(agent.state / "tasks" / task_id / "output")
    total = sum((agent.state / "tasks" / task_id / "output" / s).stat().st_size
                for s in segments)
    assert total <= 8192
    task = await agent.call("getTask", taskID=task_id)
    assert task["outputTruncatedBefore"] == chunk["truncatedBefore"]


async def test_output_of_a_running_task_is_not_eof(agent: Agent) -> None:
    task_id = await agent.start(seconds=30, printEvery=0.1)
    await agent.reach(task_id, "running")
    await asyncio.sleep(0.3)
    chunk = await agent.call("getTaskOutput", taskID=task_id)
    assert chunk["data"]
    assert chunk["eof"] is False
    later = await agent.call("getTaskOutput", taskID=task_id, offset=chunk["nextOffset"])
    assert later["offset"] == chunk["nextOffset"]


async def test_output_stream_follows_until_the_end(agent: Agent) -> None:
    task_id = await agent.start(seconds=1.0, printEvery=0.2)
    started = time.monotonic()
    response = await agent.rpc.client.get(f"/tasks/{task_id}/output?follow=1")
    assert response.status == 200
    received = []
    async for data in response.content.iter_any():
        received.append((time.monotonic() - started, data))
    body = b"".join(d for _, d in received).decode()
    assert body.splitlines()[-1].endswith("done")
    assert len(received) > 2  # arrived in pieces, as it was written
    task = await agent.call("getTask", taskID=task_id)
    assert task["state"] == "done"
    assert len(body.encode()) == task["outputSize"]
    # Without follow: what there is, then the end.
    again = await agent.rpc.client.get(f"/tasks/{task_id}/output")
    assert (await again.read()).decode() == body
    tail = await agent.rpc.client.get(f"/tasks/{task_id}/output?offset=10")
    assert (await tail.read()).decode() == body[10:]


async def test_output_stream_of_unknown_task_is_404_json(agent: Agent) -> None:
    for task_id in (str(uuid.uuid4()), "not-an-id"):
        response = await agent.rpc.client.get(f"/tasks/{task_id}/output?follow=1")
        assert response.status == 404
        body = await response.json()
        assert body["error"]["name"] == "TaskNotFound"
    task_id = await agent.start(seconds=0.05)
    response = await agent.rpc.client.get(f"/tasks/{task_id}/output?offset=-1")
    assert response.status == 400


# -- cancel ------------------------------------------------------------------------------------


async def test_cancel_queued_task_is_immediate(agents: Any) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = await agent.start(seconds=30)
    queued = await agent.start(seconds=1)
    task = await agent.call("cancelTask", taskID=queued)
    assert task["state"] == "canceled"
    assert task["error"]["name"] == "Canceled"
    assert task["startedAt"] is None
    await agent.call("cancelTask", taskID=blocker)
    assert (await agent.finish(blocker))["state"] == "canceled"


async def test_cancel_running_task_sigterm_then_canceled(agent: Agent) -> None:
    task_id = await agent.start(seconds=30)
    await agent.reach(task_id, "running")
    pid = agent.pid(task_id)
    answer = await agent.call("cancelTask", taskID=task_id)
    assert answer["stopRequested"]["reason"] == "cancel"
    again = await agent.call("cancelTask", taskID=task_id)  # a no-op
    assert again["id"] == task_id
    task = await agent.finish(task_id, timeout=10)
    assert task["state"] == "canceled"
    assert task["error"]["name"] == "Canceled"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    failure = await agent.fails("cancelTask", taskID=task_id)
    assert failure.name == "TaskNotActive"
    assert failure.code == 203


async def test_cancel_of_a_task_ignoring_sigterm_ends_with_sigkill(agent: Agent) -> None:
    task_id = await agent.start(seconds=60, ignoreTerm=True)
    await agent.reach(task_id, "running")
    pid = agent.pid(task_id)
    started = time.monotonic()
    await agent.call("cancelTask", taskID=task_id)
    await asyncio.sleep(0.5)
    # Still there inside the grace period: state is not canceled yet.
    assert await agent.state_of(task_id) == "running"
    task = await agent.finish(task_id, timeout=10)
    elapsed = time.monotonic() - started
    assert task["state"] == "canceled"
    assert "SIGKILL" in task["error"]["detail"]
    assert elapsed >= agent.config.cancel_grace
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


# -- delete, wait -------------------------------------------------------------------------------


async def test_delete_only_final_tasks_and_removes_output(agent: Agent) -> None:
    task_id = await agent.start(seconds=30)
    failure = await agent.fails("deleteTask", taskID=task_id)
    assert failure.name == "TaskActive"
    assert failure.code == 202
    await agent.call("cancelTask", taskID=task_id)
    await agent.finish(task_id)
    assert (agent.state / "tasks" / task_id).exists()
    assert await agent.call("deleteTask", taskID=task_id) == {"taskID": task_id,
                                                              "deleted": True}
    assert not (agent.state / "tasks" / task_id).exists()
    assert (await agent.fails("getTask", taskID=task_id)).name == "TaskNotFound"
    assert (await agent.fails("deleteTask", taskID=task_id)).name == "TaskNotFound"


async def test_wait_times_out_with_the_running_task(agent: Agent) -> None:
    task_id = await agent.start(seconds=30)
    started = time.monotonic()
    task = await agent.call("waitTask", taskID=task_id, timeout=0.5)
    assert 0.45 <= time.monotonic() - started < 2
    assert task["state"] in ("initializing", "running")


async def test_many_waiters_all_wake_at_the_end(agents: Any) -> None:
    agent: Agent = await agents(max_long_polls=200)  # 64 long-polls at once by default
    task_id = await agent.start(seconds=0.8)
    started = time.monotonic()
    answers = await asyncio.gather(*(agent.call("waitTask", taskID=task_id, timeout=30)
                                     for _ in range(200)))
    elapsed = time.monotonic() - started
    assert {a["state"] for a in answers} == {"done"}
    assert elapsed < 10


# -- outcomes: failure, warnings, crash, deadline -------------------------------------------------


# -- how task processes start: forked by the zygote, or spawned ------------------------------


async def test_task_processes_are_forked_by_the_zygote(agent: Agent) -> None:
    task_id = await agent.start(seconds=30)
    await agent.reach(task_id, "running")
    pid = agent.pid(task_id)
    task_process = psutil.Process(pid)
    zygote = task_process.parent()
    assert "vdsm_agent.tasks.zygote" in zygote.cmdline()
    assert zygote.ppid() == os.getpid()  # started by the (in-process) agent
    # Set up as a spawned one: its own session, its task dir as working directory.
    assert os.getsid(pid) == os.getpgid(pid) == pid
    task_dir = agent.state / "tasks" / task_id
    assert task_process.cwd() == str(task_dir)
    found = process.find_by_task_dir(task_dir)
    assert found is not None
    assert found.pid == pid
    assert (await agent.call("getTask", taskID=task_id))["pid"] == pid
    await agent.call("cancelTask", taskID=task_id)
    assert (await agent.finish(task_id))["state"] == "canceled"


async def test_a_forked_task_process_inherits_no_descriptor(agents: Any) -> None:
    # The agent (here: this test process) may hold descriptors without
    # close-on-exec; the zygote inherits them, its task processes must not.
    read_end, write_end = os.pipe()
    os.set_inheritable(write_end, True)
    try:
        agent = await agents()
        task_id = await agent.start(seconds=30)
        await agent.reach(task_id, "running")
        pid = agent.pid(task_id)
        assert "vdsm_agent.tasks.zygote" in psutil.Process(pid).cmdline()  # forked
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert os.readlink(f"/proc/self/fd/{write_end}") not in held
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/2").endswith(f"{task_id}/child.log")
        await agent.call("cancelTask", taskID=task_id)
        assert (await agent.finish(task_id))["state"] == "canceled"
    finally:
        os.close(read_end)
        os.close(write_end)


async def test_a_dead_zygote_is_replaced(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> None:
    from vdsm_agent.tasks import zygote

    monkeypatch.setattr(zygote, "RESTART_INTERVAL", 0.0)
    first = await agent.start(seconds=30)
    await agent.reach(first, "running")
    old_zygote = psutil.Process(agent.pid(first)).parent()
    old_zygote.kill()
    old_zygote.wait(timeout=5)
    # The launch that finds it dead is spawned and starts a new zygote ...
    spawned = await agent.start(seconds=30)
    await agent.reach(spawned, "running")
    assert "vdsm_agent.tasks.child" in psutil.Process(agent.pid(spawned)).cmdline()
    # ... which forks the next ones.
    forked = await agent.start(seconds=30)
    await agent.reach(forked, "running")
    new_zygote = psutil.Process(agent.pid(forked)).parent()
    assert "vdsm_agent.tasks.zygote" in new_zygote.cmdline()
    assert new_zygote.pid != old_zygote.pid
    for task_id in (first, spawned, forked):
        await agent.call("cancelTask", taskID=task_id)
        assert (await agent.finish(task_id))["state"] == "canceled"


async def test_task_processes_are_spawned_with_the_zygote_off(agents: Any) -> None:
    agent = await agents(task_zygote=False)
    task_id = await agent.start(seconds=30)
    await agent.reach(task_id, "running")
    task_process = psutil.Process(agent.pid(task_id))
    assert "vdsm_agent.tasks.child" in task_process.cmdline()
    assert task_process.ppid() == os.getpid()
    await agent.call("cancelTask", taskID=task_id)
    assert (await agent.finish(task_id))["state"] == "canceled"


async def test_a_killed_zygote_loses_no_task(agent: Agent) -> None:
    running = await agent.start(seconds=1.5)
    await agent.reach(running, "running")
    zygote = psutil.Process(agent.pid(running)).parent()
    zygote.kill()
    zygote.wait(timeout=5)
    # The task records its own outcome: it ends as it would have.
    assert (await agent.finish(running))["state"] == "done"
    # Later tasks are spawned instead.
    later = await agent.start(seconds=30)
    await agent.reach(later, "running")
    assert "vdsm_agent.tasks.child" in psutil.Process(agent.pid(later)).cmdline()
    await agent.call("cancelTask", taskID=later)
    assert (await agent.finish(later))["state"] == "canceled"


async def test_failure_warnings_and_crash_outcomes(agent: Agent) -> None:
    failing = await agent.start(seconds=0.05, fail="disk on fire")
    warned = await agent.start(seconds=0.05, warnings=["slow disk"])
    crashing = await agent.start(seconds=0.05, crash=True)
    task = await agent.finish(failing)
    assert task["state"] == "failed"
    assert task["error"] == {"name": "TestFailure", "detail": "disk on fire"}
    task = await agent.finish(warned)
    assert task["state"] == "done"
    assert task["warnings"] == ["slow disk"]
    task = await agent.finish(crashing)
    assert task["state"] == "interrupted"
    assert task["error"]["name"] == "Interrupted"
    assert "exit code 17" in task["error"]["detail"]


async def test_deadline_stops_and_fails_the_task(agent: Agent) -> None:
    deadline = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=1))
    answer = await agent.call("startTask", kind="test.sleep", params={"seconds": 30},
                              deadline=deadline.isoformat().replace("+00:00", "Z"))
    task = await agent.finish(answer["taskID"], timeout=15)
    assert task["state"] == "failed"
    assert task["error"]["name"] == "DeadlineExceeded"
    assert task["deadline"].endswith("Z")


async def test_deadline_of_a_queued_task_and_a_past_deadline(agents: Any) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = await agent.start(seconds=30)
    soon = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=0.5)).isoformat()
    queued = await agent.call("startTask", kind="test.sleep", params={}, deadline=soon)
    task = await agent.finish(queued["taskID"], timeout=10)
    assert task["state"] == "failed"
    assert task["error"]["name"] == "DeadlineExceeded"
    assert task["startedAt"] is None
    failure = await agent.fails("startTask", kind="test.sleep", params={},
                                deadline="2000-01-01T00:00:00Z")
    assert failure.data["field"] == "params.deadline"
    failure = await agent.fails("startTask", kind="test.sleep", params={}, deadline="soon")
    assert failure.code == -32602
    await agent.call("cancelTask", taskID=blocker)


# -- stale -----------------------------------------------------------------------------------------


async def test_stopped_process_becomes_stale_and_recovers(agent: Agent) -> None:
    task_id = await agent.start(seconds=30)
    await agent.reach(task_id, "running")
    pid = agent.pid(task_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped_at = time.monotonic()
        task = await agent.reach(task_id, "stale", timeout=10)
        assert time.monotonic() - stopped_at >= agent.config.stale_after - 0.1
        assert task["heartbeatAt"] is not None
    finally:
        os.kill(pid, signal.SIGCONT)
    await agent.reach(task_id, "running", timeout=5)
    await agent.call("cancelTask", taskID=task_id)
    assert (await agent.finish(task_id))["state"] == "canceled"


# -- reset -----------------------------------------------------------------------------------------


async def test_reset_running_task_to_failed_kills_it(agent: Agent) -> None:
    task_id = await agent.start(seconds=60, ignoreTerm=True)
    await agent.reach(task_id, "running")
    pid = agent.pid(task_id)
    answer = await agent.call("resetTaskState", taskID=task_id, state="failed",
                              reason="hung on a dead LUN")
    assert answer["killed"] is True
    assert answer["killedPid"] == pid
    task = answer["task"]
    assert task["state"] == "failed"
    assert task["error"] == {"name": "ResetByAdministrator", "detail": "hung on a dead LUN"}
    assert task["resets"][0]["from"] == "running"
    assert task["resets"][0]["to"] == "failed"
    assert task["resets"][0]["reason"] == "hung on a dead LUN"
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    stored = await agent.call("getTask", taskID=task_id)
    assert stored["resets"] == task["resets"]


async def test_reset_to_done_needs_the_kind_to_verify(agent: Agent) -> None:
    unverifiable = await agent.start(seconds=60)
    await agent.reach(unverifiable, "running")
    failure = await agent.fails("resetTaskState", taskID=unverifiable, state="done",
                                reason="I think it is done")
    assert failure.name == "InvalidStateTransition"
    assert await agent.state_of(unverifiable) == "running"  # untouched
    verifiable = await agent.start(seconds=60, verifiable=True)
    await agent.reach(verifiable, "running")
    answer = await agent.call("resetTaskState", taskID=verifiable, state="done",
                              reason="verified by hand")
    assert answer["task"]["state"] == "done"
    assert answer["task"]["result"] == {"slept": 60, "verified": True}
    assert answer["killed"] is True
    await agent.call("cancelTask", taskID=unverifiable)


async def test_reset_refuses_other_states_and_final_tasks(agents: Any) -> None:
    agent = await agents(max_running_tasks=1)
    blocker = await agent.start(seconds=60)
    queued = await agent.start(seconds=1)
    for state in ("running", "canceled", "accepted", "interrupted", "stale"):
        failure = await agent.fails("resetTaskState", taskID=blocker, state=state, reason="x")
        assert failure.name == "InvalidStateTransition", state
        assert failure.code == 206
    # A queued task has no process: reset without killing anything.
    answer = await agent.call("resetTaskState", taskID=queued, state="failed", reason="drop")
    assert answer["killed"] is False
    assert answer["task"]["state"] == "failed"
    failure = await agent.fails("resetTaskState", taskID=queued, state="failed", reason="again")
    assert failure.name == "InvalidStateTransition"
    await agent.call("cancelTask", taskID=blocker)


# -- retention -----------------------------------------------------------------------------------


async def test_retention_removes_old_finished_tasks(agents: Any) -> None:
    agent = await agents(retention_done=1.0, retention_failed=3600.0)
    done = await agent.start(seconds=0.05)
    failed = await agent.start(seconds=0.05, fail="x")
    running = await agent.start(seconds=30)
    await agent.finish(done)
    await agent.finish(failed)

    async def gone() -> bool:
        try:
            await agent.call("getTask", taskID=done)
        except RpcFailure:
            return True
        return False

    async def output_removed() -> bool:
        # The row goes first, the output directory right after (off the loop).
        return not (agent.state / "tasks" / done).exists()

    await async_until(gone, timeout=10)
    await async_until(output_removed, timeout=10)
    assert (await agent.call("getTask", taskID=failed))["state"] == "failed"
    assert await agent.state_of(running) in ("initializing", "running")
    await agent.call("cancelTask", taskID=running)


async def test_count_cap_never_removes_unfinished_tasks(agents: Any) -> None:
    agent = await agents(max_finished_tasks=2)
    running = await agent.start(seconds=30)
    finished = []
    for _ in range(4):
        task_id = await agent.start(seconds=0.01)
        await agent.finish(task_id)
        finished.append(task_id)

    async def capped() -> bool:
        listed = (await agent.call("listTasks"))["tasks"]
        return [t["id"] for t in listed] == [running, *finished[-2:]]

    await async_until(capped, timeout=10)
    await agent.call("cancelTask", taskID=running)
