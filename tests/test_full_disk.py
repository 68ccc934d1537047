"""A full state disk (issue 15, item 7), on a real tiny filesystem with real agents.

The attack: fill the filesystem of the agent's state directory. Before, a task
process that could not write died without an outcome, the agent could not
record its end ("background job failed"), and the task stayed ``running``
with a dead PID for good: its run slot leaked, ``cancelTask`` did nothing,
``resetTaskState`` waited 10 s for a SIGKILL that could not come; every
``startTask`` answered -32603, and the agent could not start again (exit 1,
a traceback). Here the state directory is an 8 MiB tmpfs filled by a file of
zeros, and every step of that is replayed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import AgentProcess, RpcFailure
from tests.tasks_support import (
    AgentRunner,
    become_subreaper,
    task_pid,
    until,
)
from vdsm_agent import errors
from vdsm_agent.common import clock
from vdsm_agent.store import Store
from vdsm_agent.system import space
from vdsm_agent.tasks import output, repository
from vdsm_agent.tasks.record import TaskRecord
from vdsm_agent.tasks.states import State

pytestmark = [pytest.mark.root, pytest.mark.slow]

FINAL = {"done", "failed", "canceled", "interrupted"}
MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@contextlib.contextmanager
def tmpfs(directory: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory``; unmounted at the end, whatever happened."""
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0750", "vdsm-test-state",
                    str(directory)], check=True)
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], check=False)


@pytest.fixture
def tiny_state(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs as the state directory."""
    with tmpfs(tmp_path / "state", "8m") as state:
        yield state


@pytest.fixture
def runner(tmp_path: Path, tiny_state: Path) -> Iterator[AgentRunner]:
    """Agents on the tiny state directory (sockets and logs outside it); every agent
    and task process is killed by PID before the filesystem is unmounted."""
    made = AgentRunner(tmp_path, max_running_tasks=2)
    assert made.state_dir == tiny_state
    try:
        yield made
    finally:
        made.close()


def fill(directory: Path, name: str) -> int:
    """Write zeros to a new file until the filesystem is full; the bytes written."""
    written = 0
    with open(directory / name, "wb", buffering=0) as stream:
        for size in (MiB, 64 * 1024, 4096, 512):
            block = bytes(size)
            while True:
                try:
                    written += stream.write(block) or 0
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def error_of(call: Callable[[], Any]) -> tuple[str | None, int, float]:
    """The error name and code of a call that must fail, and how long it took."""
    began = time.monotonic()
    try:
        answer = call()
    except RpcFailure as failure:
        return failure.name, int(failure.code), time.monotonic() - began
    raise AssertionError(f"the call did not fail: {answer}")


def task(agent: AgentProcess, task_id: str) -> dict[str, Any]:
    return dict(agent.call("getTask", unix=True, taskID=task_id))


def submit(agent: AgentProcess, **params: Any) -> Any:
    return agent.call("startTask", unix=True, kind="test.sleep", params=params)


def test_full_state_disk_fails_tasks_cleanly_and_the_agent_restarts_on_it(
        runner: AgentRunner, tiny_state: Path) -> None:
    agent = runner.start()
    reserve = tiny_state / space.RESERVE_NAME
    assert reserve.stat().st_size == space.DEFAULT_RESERVE
    writer = submit(agent, seconds=120, printEvery=0.1)["taskID"]
    sleeper = submit(agent, seconds=120, printEvery=0)["taskID"]
    until(lambda: all(task(agent, t)["state"] == "running" for t in (writer, sleeper)),
          timeout=15, what="both tasks running")
    until(lambda: task(agent, writer)["progress"]["done"] > 0, what="progress")
    # The sleeper is stopped, so it writes nothing while the disk is full; its
    # process dies while the agent is down, below.
    sleeper_pid = task_pid(tiny_state, sleeper)
    os.kill(sleeper_pid, signal.SIGSTOP)

    filled = fill(tiny_state, "filler-1")
    assert filled > 0

    # The running task fails, named, and its end is recorded: not stuck running.
    ended = agent.call("waitTask", unix=True, taskID=writer, timeout=20)
    assert ended["state"] == "failed", ended
    assert ended["error"]["name"] == "StorageFull", ended
    assert ended["endedAt"] is not None
    # New work is refused, named (was -32603 InternalError).
    name, code, _ = error_of(lambda: submit(agent, seconds=1))
    assert (name, code) == ("StorageFull", 208)
    # cancel and reset answer at once (reset used to wait 10 s for a SIGKILL).
    name, _, took = error_of(lambda: agent.call("cancelTask", unix=True, taskID=writer))
    assert name == "TaskNotActive"
    assert took < 2
    name, _, took = error_of(lambda: agent.call("resetTaskState", unix=True, taskID=writer,
                                                state="failed", reason="test"))
    assert name == "InvalidStateTransition"
    assert took < 2
    assert "background job failed" not in runner.logs()

    # The room the agent gave back is taken too: now the disk is really full.
    fill(tiny_state, "filler-2")
    runner.kill9()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(sleeper_pid, signal.SIGKILL)
        os.kill(sleeper_pid, signal.SIGCONT)

    # The agent starts on the full disk and answers the read verbs.
    agent = runner.start()
    assert agent.call("ping", unix=True)["uptime"] >= 0
    assert task(agent, writer)["state"] == "failed"
    listed = agent.call("listTasks", unix=True)["tasks"]
    assert {t["id"] for t in listed} >= {writer, sleeper}
    output = agent.call("getTaskOutput", unix=True, taskID=writer, maxBytes=1 << 20)
    assert "slept" in output["data"]
    assert output["eof"] is True
    assert agent.call("getStorageConnectionList", unix=True) is not None
    assert agent.call("getTaskKinds", unix=True)
    name, code, _ = error_of(lambda: submit(agent, seconds=1))
    assert (name, code) == ("StorageFull", 208)
    # The sleeper's process died while the agent was down: it is concluded now,
    # or as soon as there is room; meanwhile cancel and reset say why, at once.
    if task(agent, sleeper)["state"] not in FINAL:
        for call in (lambda: agent.call("cancelTask", unix=True, taskID=sleeper),
                     lambda: agent.call("resetTaskState", unix=True, taskID=sleeper,
                                        state="failed", reason="test")):
            name, _, took = error_of(call)
            assert name in ("StorageFull", "TaskNotActive", "InvalidStateTransition")
            assert took < 2

    # Room again: the pending end is recorded, the reserve is back, tasks run again,
    # two at once (both run slots were given back).
    for name in ("filler-1", "filler-2"):
        (tiny_state / name).unlink()
    until(lambda: task(agent, sleeper)["state"] in FINAL, timeout=15, what="sleeper ended")
    assert task(agent, sleeper)["state"] == "interrupted"

    def accepted() -> Any:
        try:
            return submit(agent, seconds=1.0)
        except RpcFailure as failure:
            if failure.name != "StorageFull":
                raise
            return None

    first = until(accepted, timeout=15, what="startTask accepted again")["taskID"]
    second = submit(agent, seconds=1.0)["taskID"]
    until(lambda: all(task(agent, t)["state"] == "running" for t in (first, second)),
          timeout=15, what="two new tasks running at once")
    for task_id in (first, second):
        done = agent.call("waitTask", unix=True, taskID=task_id, timeout=20)
        assert done["state"] == "done", done
    assert reserve.stat().st_size == space.DEFAULT_RESERVE
    assert "Traceback" not in runner.logs()


# -- the pieces, in process, on a real tiny filesystem ---------------------------------------


def new_record(params: dict[str, Any]) -> TaskRecord:
    return TaskRecord(id=str(uuid.uuid4()), kind="test.sleep", params=params,
                      request_hash="r", state=State.ACCEPTED, created_at=clock.now())


async def test_store_answers_storage_full_and_gives_its_reserve_back(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "4m") as tiny:
        store = await Store.open(tiny / "agent.db", space_reserve=MiB)
        try:
            reserve = tiny / space.RESERVE_NAME
            assert reserve.stat().st_size == MiB
            assert not store.space.full
            fill(tiny, "filler")
            # A write that needs new pages fails, named, and changes nothing.
            big = new_record({"blob": "x" * (512 * 1024)})
            with pytest.raises(errors.StorageFull) as refused:
                await store.run(repository.insert_new, [big])
            assert refused.value.data["stateDir"] == str(tiny)
            assert await store.run(repository.get, big.id) is None
            # The store is now known full and its reserve was given back: a small
            # write (a task's end) has room, and reads never stopped working.
            assert store.space.full
            assert not reserve.exists()
            small = new_record({"seconds": 1})
            assert await store.run(repository.insert_new, [small]) == {}
            assert await store.run(repository.get, small.id) == small
            # Not full again until the reserve fits with room to spare.
            assert await asyncio.to_thread(store.space.check)
            (tiny / "filler").unlink()
            assert not await asyncio.to_thread(store.space.check)
            assert reserve.stat().st_size == MiB
        finally:
            await store.close()


def test_space_is_full_below_the_low_water_mark_and_has_room_again_with_room_to_spare(
        tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "8m") as tiny:
        state = space.StateSpace(tiny, MiB)
        assert not state.check()
        assert (tiny / space.RESERVE_NAME).stat().st_size == MiB
        # Just under the low-water mark: full, and the reserve is given back.
        filler = tiny / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC)
        try:
            os.posix_fallocate(fd, 0, state.available() - space.LOW_WATER + 4096)
        finally:
            os.close(fd)
        assert state.check()
        assert state.full
        assert not (tiny / space.RESERVE_NAME).exists()
        # With the reserve's room back, still full (no flapping) ...
        assert state.available() < MiB + space.RESUME_ROOM
        assert state.check()
        # ... until there is room for the reserve and RESUME_ROOM beyond it.
        filler.unlink()
        assert not state.check()
        assert (tiny / space.RESERVE_NAME).stat().st_size == MiB


def test_output_writer_survives_a_full_disk_and_keeps_its_offsets(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "tiny", "1m") as tiny:
        writer = output.Writer(tiny / "output", max_bytes=1 << 20)
        writer.write(b"before\n")
        fill(tiny, "filler")
        with pytest.raises(OSError) as failed:
            writer.write(b"y" * (64 * 1024))
        assert space.is_no_space(failed.value)
        lost_at = writer.offset
        (tiny / "filler").unlink()
        writer.write(b"after\n")
        writer.flush()
        writer.close()
        chunk = output.read(tiny / "output", 0, 1 << 20)
        assert chunk.data.startswith(b"before\n")
        assert chunk.data.endswith(b"after\n")
        assert chunk.end == lost_at + len(b"after\n") == len(chunk.data)
