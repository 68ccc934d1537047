"""Tasks against real agent processes: kill -9 and restart, re-attach, outcomes
recorded while the agent was down, ping latency under load, curl -N following.

Every agent and every task process group started here is killed by PID at
teardown (``tasks_support.agent_runner``), also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support import AgentProcess
from tests.tasks_support import (
    AgentRunner,
    agent_runner,
    become_subreaper,
    make_image,
    sha,
    task_pid,
    until,
)

FINAL = {"done", "failed", "canceled", "interrupted"}
MiB = 1024 * 1024
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[AgentRunner]:
    # Checksums read at 6 MiB/s so that they are still running across a restart.
    with agent_runner(tmp_path, task_io_rate_limit=6 * MiB) as made:
        yield made


def alive(pid: int) -> bool:
    """A zombie (exited, not yet reaped by us, the subreaper) is not alive."""
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def start(agent: AgentProcess, kind: str = "test.sleep", **params: Any) -> str:
    return str(agent.call("startTask", kind=kind, params=params)["taskID"])


def task(agent: AgentProcess, task_id: str) -> dict[str, Any]:
    return dict(agent.call("getTask", taskID=task_id))


def finish(agent: AgentProcess, task_id: str, timeout: float = 30) -> dict[str, Any]:
    answer = agent.call("waitTask", taskID=task_id, timeout=timeout)
    assert answer["state"] in FINAL, answer
    return dict(answer)


def running(agent: AgentProcess, *task_ids: str) -> None:
    until(lambda: all(task(agent, t)["state"] == "running" for t in task_ids), timeout=15)


def output_text(agent: AgentProcess, task_id: str) -> str:
    chunk = agent.call("getTaskOutput", taskID=task_id, maxBytes=1 << 20)
    assert chunk["eof"] is True
    assert chunk["truncatedBefore"] == 0
    return str(chunk["data"])


def outcome_written(runner: AgentRunner, task_id: str) -> bool:
    return (runner.state_dir / "tasks" / task_id / "outcome.json").exists()


def test_kill9_agent_tasks_reattached_and_finish_correctly(runner: AgentRunner) -> None:
    agent = runner.start()
    images = [make_image(runner.images / f"disk{i}.img", 24 * MiB, seed=i) for i in range(2)]
    checksums = [start(agent, "checksum", path=str(image)) for image in images]
    sleeper = start(agent, seconds=5, printEvery=0.2)
    running(agent, *checksums, sleeper)
    until(lambda: task(agent, checksums[0])["progress"]["done"] > 0)
    pids = {t: task_pid(runner.state_dir, t) for t in (*checksums, sleeper)}
    runner.kill9()
    time.sleep(0.5)  # the tasks go on without the agent
    for pid in pids.values():
        os.kill(pid, 0)  # still alive
    agent = runner.start()
    for task_id in (*checksums, sleeper):
        current = task(agent, task_id)
        assert current["state"] in ("running", "stale", "done"), current
        assert current["pid"] == pids[task_id]
    for task_id, pid in pids.items():
        assert f"task {task_id}: re-attached to pid {pid}" in runner.logs()
    for image, task_id in zip(images, checksums, strict=True):
        done = finish(agent, task_id)
        assert done["state"] == "done", done
        assert done["result"] == {"checksum": sha(image), "algorithm": "sha256",
                                  "bytes": 24 * MiB}
        assert done["progress"]["done"] == 24 * MiB
        lines = output_text(agent, task_id).splitlines()
        assert "starting" in lines[0]
        assert sum("%" in line for line in lines) >= 5  # progress lines on both sides
        assert sha(image) in lines[-2]
        assert lines[-1].endswith("done")
    slept = finish(agent, sleeper)
    assert slept["state"] == "done"
    # A "slept" line every ~0.2 s: none may be missing around the restart.
    marks = [float(line.split()[2].rstrip("s")) for line in
             output_text(agent, sleeper).splitlines() if " slept " in line]
    assert marks[-1] >= 4.5
    assert max(b - a for a, b in zip([0.0, *marks], marks, strict=False)) < 0.8, marks


def test_outcome_recorded_while_agent_was_down_is_applied(runner: AgentRunner) -> None:
    agent = runner.start()
    image = make_image(runner.images / "small.img", 2 * MiB)
    ok = start(agent, seconds=0.8)
    bad = start(agent, seconds=0.8, fail="bad sector")
    summed = start(agent, "checksum", path=str(image))
    running(agent, ok, bad)
    runner.kill9()
    until(lambda: all(outcome_written(runner, t) for t in (ok, bad, summed)), timeout=15)
    agent = runner.start()
    assert task(agent, ok)["state"] == "done"
    assert task(agent, ok)["result"] == {"slept": 0.8}
    failed = task(agent, bad)
    assert failed["state"] == "failed"
    assert failed["error"] == {"name": "TestFailure", "detail": "bad sector"}
    assert task(agent, summed)["result"]["checksum"] == sha(image)


def test_task_killed_while_agent_was_down_is_interrupted(runner: AgentRunner) -> None:
    agent = runner.start()
    victim = start(agent, seconds=30)
    survivor = start(agent, seconds=30)
    running(agent, victim, survivor)
    runner.kill9()
    os.killpg(task_pid(runner.state_dir, victim), signal.SIGKILL)
    time.sleep(0.2)
    agent = runner.start()
    interrupted = task(agent, victim)
    assert interrupted["state"] == "interrupted"
    assert interrupted["error"]["name"] == "Interrupted"
    assert interrupted["endedAt"] is not None
    assert task(agent, survivor)["state"] in ("running", "stale")
    agent.call("cancelTask", taskID=survivor)
    assert finish(agent, survivor)["state"] == "canceled"


def test_submit_is_durable_before_the_answer(runner: AgentRunner) -> None:
    agent = runner.start()
    task_id = str(uuid.uuid4())
    agent.call("startTask", kind="test.sleep", params={"seconds": 0.2}, taskID=task_id)
    runner.kill9()  # at once: the answer was only sent once the row was committed
    agent = runner.start()
    assert finish(agent, task_id)["state"] in ("done", "interrupted")
    # And the retry after the crash is still idempotent.
    again = agent.call("startTask", kind="test.sleep", params={"seconds": 0.2}, taskID=task_id)
    assert again["taskID"] == task_id


def test_clean_restart_and_cancel_of_a_reattached_task(runner: AgentRunner) -> None:
    agent = runner.start()
    stubborn = start(agent, seconds=60, ignoreTerm=True)
    running(agent, stubborn)
    pid = task_pid(runner.state_dir, stubborn)
    agent.proc.send_signal(signal.SIGTERM)  # a clean stop (an upgrade) keeps tasks running
    assert agent.proc.wait(timeout=10) == 0
    os.kill(pid, 0)
    agent = runner.start()
    assert task(agent, stubborn)["state"] in ("running", "stale")
    started = time.monotonic()
    agent.call("cancelTask", taskID=stubborn)
    ended = finish(agent, stubborn, timeout=15)
    assert ended["state"] == "canceled"
    assert time.monotonic() - started >= 1.0  # the grace period, then SIGKILL
    assert not alive(pid)


def test_ping_stays_fast_while_20_tasks_run(tmp_path: Path) -> None:
    with agent_runner(tmp_path, max_running_tasks=25) as runner:
        agent = runner.start()
        ids = [start(agent, seconds=60, printEvery=0.1) for _ in range(20)]
        running(agent, *ids)
        latencies = []
        for _ in range(300):
            began = time.perf_counter()
            agent.call("ping")
            latencies.append(time.perf_counter() - began)
            time.sleep(0.005)
        latencies.sort()
        p50 = statistics.median(latencies)
        p99 = latencies[int(len(latencies) * 0.99) - 1]
        print(f"\nping with 20 running tasks: p50 {p50 * 1000:.2f} ms, "
              f"p99 {p99 * 1000:.2f} ms, max {latencies[-1] * 1000:.2f} ms")
        (tmp_path.parent / "ping-under-load.json").write_text(json.dumps(
            {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000, "max_ms": latencies[-1] * 1000}))
        assert latencies[-1] < 0.5
        assert all(task(agent, t)["state"] == "running" for t in ids)


@pytest.mark.tool("curl")
def test_curl_follows_output_until_the_task_ends(runner: AgentRunner) -> None:
    agent = runner.start()
    task_id = start(agent, seconds=1.5, printEvery=0.25)
    url = f"http://localhost/tasks/{task_id}/output?follow=1"
    curl = shutil.which("curl")
    assert curl is not None
    began = time.monotonic()
    # Over the Unix socket, as an administrator on the host would (root is admin there).
    with subprocess.Popen([curl, "-sN", "--unix-socket", str(agent.socket_path), url],
                          stdout=subprocess.PIPE) as proc:
        try:
            assert proc.stdout is not None
            first = proc.stdout.readline()
            first_at = time.monotonic() - began
            rest = proc.stdout.read()
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
    ended_at = time.monotonic() - began
    assert b"starting" in first
    assert first_at < 1.2 < ended_at  # printed while running, ended with the task
    body = (first + rest).decode()
    assert body.rstrip().endswith("done")
    assert task(agent, task_id)["state"] == "done"
    assert body == output_text(agent, task_id)
    missing = subprocess.run([curl, "-s", "-w", "\n%{http_code}", "--unix-socket",
                              str(agent.socket_path),
                              f"http://localhost/tasks/{uuid.uuid4()}/output"],
                             capture_output=True, text=True, check=True).stdout
    body_text, code = missing.rsplit("\n", 1)
    assert code == "404"
    assert json.loads(body_text)["error"]["name"] == "TaskNotFound"


def test_stale_task_stays_stale_across_a_restart_until_it_resumes(runner: AgentRunner) -> None:
    agent = runner.start()
    task_id = start(agent, seconds=60)
    running(agent, task_id)
    pid = task_pid(runner.state_dir, task_id)
    os.kill(pid, signal.SIGSTOP)
    try:
        until(lambda: task(agent, task_id)["state"] == "stale", timeout=10)
        runner.kill9()
        agent = runner.start()
        for _ in range(6):  # the restart itself is no sign of life
            assert task(agent, task_id)["state"] == "stale"
            time.sleep(0.1)
    finally:
        os.kill(pid, signal.SIGCONT)
    until(lambda: task(agent, task_id)["state"] == "running", timeout=5)
    agent.call("cancelTask", taskID=task_id)
    assert finish(agent, task_id)["state"] == "canceled"
