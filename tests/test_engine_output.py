"""A real engine process over real agents, as its user sees it (issue 16, points 4 and 5):

* a task's output through the engine: ``getTaskOutput(host, taskID, offset,
  maxBytes)`` and the live stream ``GET /hosts/H/tasks/T/output?follow=1``, and
  ``vdsm-engine call getTask ... --watch`` showing the task's latest output line
  in a real terminal (so nobody needs to ssh to a host);
* a host that is down turns only its unfinished tasks ``unknown``;
* host errors in words (no aiohttp internals), a step that succeeded keeps no
  old ``lastError``;
* ``GET /`` and ``GET /jsonrpc`` of the engine.
"""

from __future__ import annotations

import http.client
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_process import ENGINE, EngineProcess
from tests.engine_support import Fleet, fleet
from tests.support import until
from tests.terminal_support import Terminal

pytestmark = pytest.mark.slow

NO_TASK = "0b6f3c1e-6a3c-4f5e-9d61-1f1c2a3b4c5d"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EngineProcess, Fleet]]:
    root = tmp_path_factory.mktemp("engine-output")
    with fleet(root / "agents", 2) as agents:
        engine = EngineProcess(root).start()
        try:
            for agent in agents:
                engine.call("addHost", f"name={agent.name}", f"url={agent.url}")
            for agent in agents:
                until(lambda name=agent.name: engine.call("getHost", f"name={name}")["status"]
                      == "up", timeout=20, interval=0.2)
            yield engine, agents
        finally:
            engine.stop()


@pytest.fixture
def terminals(tmp_path: Path) -> Iterator[Any]:
    made: list[Terminal] = []

    def make(width: int) -> Terminal:
        terminal = Terminal(tmp_path / f"tty{len(made)}", width)
        made.append(terminal)
        return terminal

    yield make
    for terminal in made:
        terminal.close()


def start_task(engine: EngineProcess, host: str, **params: Any) -> str:
    job = engine.call("startTask", f"host={host}", "kind=test.sleep",
                      f"params:={json.dumps(params)}")
    return str(job["steps"][0]["taskID"])


def engine_state(engine: EngineProcess, host: str, task_id: str) -> str | None:
    done = engine.cli("getTask", f"host={host}", f"taskID={task_id}", check=False)
    return json.loads(done.stdout)["task"]["state"] if done.returncode == 0 else None


# -- the output, through the engine -----------------------------------------------------------


def test_get_task_output_through_the_engine(world):
    engine, _ = world
    task_id = start_task(engine, "host1", seconds=0.6, printEvery=0.2)
    until(lambda: engine_state(engine, "host1", task_id) == "done", timeout=20)
    first = engine.call("getTaskOutput", "host=host1", f"taskID={task_id}", "maxBytes=4096")
    assert first["host"] == "host1"
    assert first["eof"] is True
    assert f"task {task_id} (test.sleep) starting" in first["data"]
    assert first["data"].rstrip("\n").endswith(" done")
    assert "slept 0.2s of 0.6s" in first["data"]
    # By offset, as a follower reads it: the rest from nextOffset.
    head = engine.call("getTaskOutput", "host=host1", f"taskID={task_id}", "maxBytes=10")
    rest = engine.call("getTaskOutput", "host=host1", f"taskID={task_id}",
                       f"offset={head['nextOffset']}", "maxBytes=4096")
    assert head["data"] + rest["data"] == first["data"]
    missing = engine.cli("getTaskOutput", "host=host1", f"taskID={NO_TASK}", check=False)
    assert missing.returncode == 1
    assert f"TaskNotFound: Unknown task ID (no task {NO_TASK} on host host1)" in missing.stderr


def test_the_output_stream_is_relayed_live(world):
    engine, _ = world
    task_id = start_task(engine, "host1", seconds=2, printEvery=0.5)
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=30)
    arrivals: list[tuple[float, bytes]] = []
    try:
        began = time.monotonic()
        conn.request("GET", f"/hosts/host1/tasks/{task_id}/output?follow=1")
        response = conn.getresponse()
        assert response.status == 200
        assert response.getheader("Content-Type") == "text/plain; charset=utf-8"
        while line := response.readline():
            arrivals.append((time.monotonic() - began, line))
    finally:
        conn.close()
    text = b"".join(line for _, line in arrivals).decode()
    assert f"task {task_id} (test.sleep) starting" in text
    assert text.rstrip("\n").endswith(" done")
    assert b"\0" not in text.encode()  # no keep-alive asked for, none relayed
    slept = [at for at, line in arrivals if b"slept" in line]
    # Live: the lines came as they were written, spread over the task's 2 s, and
    # the stream ended with the task.
    assert slept[-1] - slept[0] >= 0.8, arrivals
    assert engine_state(engine, "host1", task_id) in ("done", "running")


@pytest.mark.parametrize(("path", "status", "name"), [
    ("/hosts/nohost/tasks/{task}/output", 404, "HostNotFound"),
    ("/hosts/host1/tasks/{task}/output?follow=1", 404, "TaskNotFound"),
    ("/hosts/host1/tasks/not-an-id/output", 404, "TaskNotFound"),
    ("/hosts/host1/tasks/{task}/output?offset=-1", 400, "InvalidParams"),
])
def test_the_output_stream_refuses_in_json(world, path, status, name):
    engine, _ = world
    got, headers, body = engine.get(path.format(task=NO_TASK))
    assert got == status
    assert headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["error"]["name"] == name


@pytest.mark.tool("tmux")
def test_watching_a_host_task_shows_its_output_line(world, terminals):
    engine, agents = world
    task_id = str(agents[0].call("startTask", kind="test.sleep",
                                 params={"seconds": 4, "printEvery": 0.3})["taskID"])
    until(lambda: engine_state(engine, "host1", task_id) is not None, timeout=10)
    terminal = terminals(80)
    terminal.run([ENGINE, "call", "--url", engine.url, "getTask", "host=host1",
                  f"taskID={task_id}", "--watch"])
    # The bar, and under it the latest line (without its timestamp) from getTaskOutput.
    seen = until(lambda: re.search(r"^host1 test\.sleep \w{8} running .*\n *slept [\d.]+s "
                                   r"of 4s *$", terminal.screen(), re.M), timeout=10,
                 what="the task's output line under the bar")
    assert seen
    assert terminal.wait_exit(30) == 0, terminal.screen()
    assert re.search(rf"^task {task_id} on host1 done", terminal.screen(), re.M)


# -- a host that is down ---------------------------------------------------------------------


def test_a_down_host_turns_only_its_unfinished_tasks_unknown(world):
    engine, agents = world
    host2 = agents[1]
    finished = start_task(engine, "host2", seconds=0.1)
    until(lambda: engine_state(engine, "host2", finished) == "done", timeout=20)
    running = start_task(engine, "host2", seconds=30)
    until(lambda: engine_state(engine, "host2", running) == "running", timeout=20)
    host2.kill()
    try:
        until(lambda: engine.call("getHost", "name=host2")["status"] == "non-responsive",
              timeout=20, interval=0.2)
        listed = {task["id"]: task for task in engine.call(
            "listTasks", "host=host2", "pageSize=1000")["tasks"]}
        assert (listed[finished]["state"], listed[finished]["hostStatus"]) == (
            "done", "non-responsive")
        assert (listed[running]["state"], listed[running]["lastKnownState"]) == (
            "unknown", "running")
        done_ids = {task["id"] for task in engine.call(
            "listTasks", "host=host2", "state=done", "pageSize=1000")["tasks"]}
        unknown_ids = {task["id"] for task in engine.call(
            "listTasks", "host=host2", "state=unknown", "pageSize=1000")["tasks"]}
        assert finished in done_ids
        assert finished not in unknown_ids
        assert running in unknown_ids
        assert engine_state(engine, "host2", finished) == "done"
    finally:
        host2.start()
        host2.call("cancelTask", taskID=running)
        until(lambda: engine.call("getHost", "name=host2")["status"] == "up", timeout=20)


def test_a_step_that_succeeded_keeps_no_old_error_and_errors_are_words(world, tmp_path):
    engine, agents = world
    host2 = agents[1]
    share = tmp_path / "share"
    share.mkdir()
    host2.kill()
    try:
        job = engine.call("manageStorageConnection", "hosts=host2", f"uri=file://{share}",
                          "connectionID=later")

        def failed_once() -> dict[str, Any] | None:
            step = engine.call("getJob", f"jobID={job['jobID']}")["steps"][0]
            return step if step["lastError"] else None
        step = until(failed_once, timeout=20, interval=0.2)
        assert step["state"] == "pending"
        assert step["lastError"]["name"] == "HostUnreachable"
        detail = step["lastError"]["detail"]
        assert re.fullmatch(rf"manageStorageConnection: cannot connect to 127\.0\.0\.1:"
                            rf"{host2.port}: connection refused", detail), detail
        host = until(lambda: engine.call("getHost", "name=host2")
                     if engine.call("getHost", "name=host2")["lastError"] else None,
                     timeout=20)
        assert "ssl:default" not in host["lastError"]
        assert "Connect call failed" not in host["lastError"]
        assert re.fullmatch(rf"\w+: cannot connect to 127\.0\.0\.1:{host2.port}: "
                            "connection refused", host["lastError"]), host["lastError"]
    finally:
        host2.start()
    done = engine.call("waitJob", f"jobID={job['jobID']}", "timeout=30")
    assert done["state"] == "done", done
    (step,) = done["steps"]
    assert step["attempts"] >= 2
    assert step["lastError"] is None
    engine.call("unmanageStorageConnection", "hosts=host2", "connectionID=later")


# -- GET / and GET /jsonrpc ------------------------------------------------------------------


def test_get_root_and_get_jsonrpc_of_the_engine(world):
    engine, _ = world
    version = engine.call("ping")["version"]
    status, headers, body = engine.get("/")
    text = body.decode()
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert text.startswith(f"vdsm-engine {version}: ")
    assert (f"curl -s -d '{{\"jsonrpc\":\"2.0\",\"method\":\"listHosts\",\"id\":1}}' "
            f"{engine.url}") in text
    assert "vdsm-engine call listHosts --table" in text
    assert "GET /hosts/HOST/tasks/TASK_ID/output?follow=1" in text
    assert "docs/engine.md" in text
    status, headers, body = engine.get("/", accept="text/html")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert f"<h1>vdsm-engine {version}</h1>" in body.decode()
    status, headers, body = engine.get("/jsonrpc")
    assert status == 405
    assert headers["Allow"] == "POST"
    assert body.decode() == ("/jsonrpc takes JSON-RPC 2.0 by POST, not GET; try: curl -s -d "
                             f"'{{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":1}}' "
                             f"{engine.url}\n")
