"""The state directory across agents, against real agent processes: one agent at
a time (issue 15, item 8), and what a restarted agent shows (item 11).

The attack: a second ``vdsm-agent`` on the same ``--state-dir`` (and so the same
default Unix socket) re-attached the first one's running tasks, adopted its
connections and replaced its ``agent.sock``, leaving it deaf on the socket.
Now the second exits with code 2 naming the holder; the holder's task
processes and zygote never hold the lock, so a restart after ``kill -9`` of the
agent still gets it while they run.

A restarted agent showed ``progress.done`` of the task's last state change
(from the store) until its first monitor round read the status file: progress
went backwards for up to a second after every restart.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import agent_argv, free_port
from tests.tasks_support import (
    AgentRunner,
    agent_runner,
    become_subreaper,
    task_pid,
    task_processes,
    until,
)
from vdsm_agent.system import statelock

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[AgentRunner]:
    with agent_runner(tmp_path) as made:
        yield made


def holders_of(path: Path) -> list[int]:
    """PIDs of the processes with ``path`` open."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if any(Path(item.path) == path for item in proc.open_files()):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def running_task(runner: AgentRunner) -> str:
    agent = runner.agent
    task_id = str(agent.call("startTask", unix=True, kind="test.sleep",
                             params={"seconds": 60, "printEvery": 0.2})["taskID"])
    until(lambda: agent.call("getTask", unix=True, taskID=task_id)["state"] == "running",
          timeout=15, what="task running")
    return task_id


def test_second_agent_on_the_same_state_dir_exits_2_and_leaves_the_first_alone(
        runner: AgentRunner, tmp_path: Path) -> None:
    first = runner.start()
    task_id = running_task(runner)
    socket_before = os.stat(first.socket_path)
    # The second agent: same state dir and Unix socket (as with the default,
    # STATE_DIR/agent.sock), its own TCP port.
    argv = agent_argv(runner.state_dir, free_port(), first.socket_path, runner.flags)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, stderr = second.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        second.kill()
        _, stderr = second.communicate()
        pytest.fail(f"a second agent on the same state dir kept running: {stderr[-2000:]}")
    assert second.returncode == 2, stderr
    message = stderr.strip()
    assert "\n" not in message, message
    assert "Traceback" not in message, message
    assert f"pid {first.proc.pid}" in message, message
    assert str(runner.state_dir) in message
    # The first agent still answers on its socket, which is the same file.
    assert first.call("ping", unix=True)["uptime"] > 0
    assert first.call("getTask", unix=True, taskID=task_id)["state"] == "running"
    socket_after = os.stat(first.socket_path)
    assert (socket_after.st_ino, socket_after.st_ctime_ns) == (
        socket_before.st_ino, socket_before.st_ctime_ns)
    assert first.proc.poll() is None
    assert "re-attached" not in first.log_path.read_text()
    assert (runner.state_dir / statelock.LOCK_NAME).read_text() == f"{first.proc.pid}\n"


@pytest.mark.parametrize("zygote", [True, False], ids=["forked", "spawned"])
def test_restart_after_kill9_gets_the_lock_while_tasks_run(tmp_path: Path,
                                                           zygote: bool) -> None:
    with agent_runner(tmp_path, task_zygote=str(zygote).lower()) as runner:
        first = runner.start()
        task_id = running_task(runner)
        pid = task_pid(runner.state_dir, task_id)
        lock_path = (runner.state_dir / statelock.LOCK_NAME).resolve()
        # Only the agent holds the lock file: not its task process, not its zygote.
        others = {proc.pid for proc in task_processes(runner.state_dir)}
        assert pid in others
        assert holders_of(lock_path) == [first.proc.pid]
        runner.kill9()
        os.kill(pid, 0)  # the task goes on without its agent
        second = runner.start()
        assert f"task {task_id}: re-attached to pid {pid}" in runner.logs()
        assert second.call("getTask", unix=True, taskID=task_id)["state"] in ("running",
                                                                              "stale")
        assert lock_path.read_text() == f"{second.proc.pid}\n"
        assert statelock.holder_pid(lock_path) == second.proc.pid
        second.call("cancelTask", unix=True, taskID=task_id)
        ended = second.call("waitTask", unix=True, taskID=task_id, timeout=15)
        assert ended["state"] == "canceled"


def test_lock_is_refused_in_process_and_names_the_holder(tmp_path: Path) -> None:
    held = statelock.acquire(tmp_path / "state")
    try:
        with pytest.raises(statelock.StateDirBusy) as refused:
            statelock.acquire(tmp_path / "state")
        assert refused.value.holder == os.getpid()
    finally:
        held.release()
    again = statelock.acquire(tmp_path / "state")  # free once released
    again.release()


@pytest.mark.parametrize("how", ["kill9", "sigterm"])
def test_progress_never_goes_backwards_across_a_restart(tmp_path: Path, how: str) -> None:
    # A 2 s heartbeat (the default): the monitor's first round comes 0.5 s after
    # the restart, and the status file is 0-2 s old.
    with agent_runner(tmp_path, heartbeat_interval=2, stale_after=30) as runner:
        agent = runner.start()
        task_id = str(agent.call("startTask", unix=True, kind="test.sleep",
                                 params={"seconds": 120, "printEvery": 0})["taskID"])

        def done() -> int:
            answer = runner.agent.call("getTask", unix=True, taskID=task_id)
            assert answer["state"] not in ("done", "failed", "canceled", "interrupted"), answer
            return int(answer["progress"]["done"] or 0)

        until(lambda: done() > 2000, timeout=20, what="progress > 2 s")
        before = done()
        if how == "kill9":
            runner.kill9()
        else:
            agent.proc.terminate()
            assert agent.proc.wait(timeout=10) == 0
        runner.start()
        seen = [before]
        end = time.monotonic() + 3.0
        while time.monotonic() < end:
            seen.append(done())
        drops = [(a, b) for a, b in itertools.pairwise(seen) if b < a]
        assert drops == [], f"progress.done went backwards: {drops[:5]} (before: {before})"
        assert seen[-1] > before  # and it still moves
