"""The task zygote when its agent is killed (issue 15, item 11).

A killed agent is a normal event (an upgrade, kill -9, a crash). The zygote
must notice, say so in one line and exit 0: no traceback. The task processes
it forked keep running and the next agent re-attaches them.

The zygote's stderr is the agent's: the agent's log file here (the journal
under systemd), so everything it wrote is in that file, also after the agent
died. Each test waits for the zygote to exit (it is re-parented to this test
process, a child subreaper, when its agent dies) before reading the log.

An agent killed while a packet from the zygote is unread in its socket (a task
process ended a moment before: the zygote reported it) resets the socket
instead of closing it; the zygote used to die of that ``ConnectionResetError``
with a traceback. The second test makes that moment certain: the agent is
stopped (SIGSTOP, a hung agent) while a task ends, then killed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support import AgentProcess
from tests.tasks_support import AgentRunner, agent_runner, become_subreaper, task_pid, until
from vdsm_agent.tasks.zygote import ZYGOTE_MODULE

pytestmark = pytest.mark.slow
ZYGOTE_LOGGER = f"[{ZYGOTE_MODULE}]"


@pytest.fixture(autouse=True)
def _subreaper() -> None:
    become_subreaper()


@pytest.fixture
def runner(tmp_path: Path) -> Iterator[AgentRunner]:
    with agent_runner(tmp_path) as made:
        yield made


def start(agent: AgentProcess, **params: object) -> str:
    return str(agent.call("startTask", unix=True, kind="test.sleep", params=params)["taskID"])


def state(agent: AgentProcess, task_id: str) -> str:
    return str(agent.call("getTask", unix=True, taskID=task_id)["state"])


def zygote_pid(agent: AgentProcess) -> int:
    def find() -> int | None:
        for child in psutil.Process(agent.proc.pid).children():
            if ZYGOTE_MODULE in child.cmdline():
                return int(child.pid)
        return None
    return int(until(find, timeout=30, what="the task zygote"))


def exit_code(pid: int, timeout: float = 15) -> int:
    """Reap ``pid`` (ours since its agent died: we are its subreaper); its exit code."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < deadline, f"the zygote {pid} did not exit"
        time.sleep(0.02)


def alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def assert_quiet(runner: AgentRunner, zygote: int) -> str:
    """Everything the zygote wrote (the agent's log): one line, no traceback; the line."""
    logs = runner.logs()
    assert "Traceback" not in logs
    assert "ConnectionResetError" not in logs
    assert "BrokenPipeError" not in logs
    said = [line for line in logs.splitlines() if f"task zygote (pid {zygote})" in line]
    assert len(said) == 1, said
    assert ZYGOTE_LOGGER in said[0]
    assert " INFO " in said[0]
    return said[0]


def test_an_idle_zygote_exits_quietly_when_its_agent_is_killed(runner: AgentRunner) -> None:
    agent = runner.start()
    done = start(agent, seconds=0.1)
    until(lambda: state(agent, done) == "done", timeout=30)  # the zygote forked it: ready
    zygote = zygote_pid(agent)
    runner.kill9()
    assert exit_code(zygote) == 0
    line = assert_quiet(runner, zygote)
    assert "the agent closed its end of the socket" in line
    assert "still run: 0" in line


def test_a_reset_socket_is_no_traceback_and_tasks_survive(runner: AgentRunner) -> None:
    agent = runner.start()
    long_task = start(agent, seconds=60)
    short_task = start(agent, seconds=1.0)
    until(lambda: state(agent, long_task) == state(agent, short_task) == "running", timeout=30)
    zygote = zygote_pid(agent)
    long_pid, short_pid = (task_pid(runner.state_dir, t) for t in (long_task, short_task))
    assert psutil.Process(long_pid).ppid() == zygote  # forked by it

    # A hung agent: the zygote reports the short task's end into its unread socket ...
    agent.proc.send_signal(signal.SIGSTOP)
    until(lambda: not psutil.pid_exists(short_pid), timeout=30, what="the short task's end")
    time.sleep(0.3)  # the zygote reaped it and wrote {"exited": ...} to the agent
    # ... and is killed (a watchdog, the OOM killer): the zygote's socket is reset.
    runner.kill9()
    assert exit_code(zygote) == 0
    line = assert_quiet(runner, zygote)
    assert "the agent's end of the socket is gone" in line
    assert "still run: 1" in line

    assert alive(long_pid)  # the task process keeps running without agent or zygote
    agent = runner.start()
    assert f"task {long_task}: re-attached to pid {long_pid}" in runner.logs()
    assert state(agent, short_task) == "done"  # its outcome, written while no agent ran
    assert state(agent, long_task) in ("running", "stale")
    agent.call("cancelTask", unix=True, taskID=long_task)
    assert agent.call("waitTask", unix=True, taskID=long_task, timeout=30)["state"] == "canceled"
