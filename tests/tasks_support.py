"""Helpers for the task tests: configs with short timings, real agent processes,
and clean-up that kills every task process group a test started (by PID).

Task processes are detached from the agent on purpose (they survive it), so
nothing kills them when a test ends: ``kill_task_processes`` finds them by
their command line (``--task-dir`` under the test's state dir) and SIGKILLs
their process groups. The test process is made a child subreaper so that
orphaned task processes (their agent was killed) are re-parented to it and
can be reaped here instead of lingering as zombies of PID 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest

from tests.support import (
    AgentProcess,
    RpcClient,
    RpcFailure,
    agent_argv,
    check_result,
    free_port,
    spawn_agent,
)
from tests.support import async_until as async_until  # imported from here by tests
from tests.support import until as until
from vdsm_agent import settings
from vdsm_agent.server.app import make_app
from vdsm_agent.tasks.process import CHILD_MODULE
from vdsm_agent.tasks.zygote import ZYGOTE_MODULE

PR_SET_CHILD_SUBREAPER = 36

# Short timings so the suite stays fast (see the brief: stale 1.5 s, heartbeat 0.2 s).
FAST = {
    "heartbeat_interval": 0.2,
    "stale_after": 1.5,
    "cancel_grace": 1.0,
    "enable_test_kinds": True,
}


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def task_config(tmp_path: Path, **overrides: Any) -> settings.Config:
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    values: dict[str, Any] = {
        "state_dir": str(tmp_path / "state"),
        "unix_socket": "none",
        "listen": ("127.0.0.1", 0),
        "allowed_roots": [str(images)],
        # In-process test clients connect over loopback TCP, where a caller is
        # anonymous: it gets what loopback_role grants.
        "loopback_role": "admin",
        **FAST,
    }
    values.update(overrides)
    return settings.defaults().replace(**values)


def task_processes(state_dir: Path) -> list[psutil.Process]:
    """Live task child processes whose task dir is under ``state_dir``."""
    prefix = str(state_dir.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        # Spawned task processes name their task dir; the zygote and the task
        # processes it forked share its command line, which names the state dir.
        if ((CHILD_MODULE in cmdline or ZYGOTE_MODULE in cmdline)
                and any(arg.startswith(prefix) for arg in cmdline)):
            found.append(proc)
    return found


def kill_task_processes(state_dir: Path) -> None:
    """SIGKILL the process group of every task process of this state dir, then reap."""
    procs = task_processes(state_dir)
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process dies only when continued
    for proc in procs:
        reap(proc.pid, timeout=5)
    reap_orphan_zombies(state_dir)


def reap_orphan_zombies(state_dir: Path) -> None:
    """Reap task processes of this state dir that ended as zombies of this process.

    They were re-parented to us (the subreaper) when their agent was killed.
    Only exited children of ours are reaped, so no one else's exit status is taken.
    """
    for status_file in (state_dir / "tasks").glob("*/status.json"):
        try:
            pid = int(json.loads(status_file.read_text())["pid"])
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid() and proc.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(pid, os.WNOHANG)
        except (OSError, ValueError, KeyError, psutil.Error):
            continue


def reap(pid: int, timeout: float) -> None:
    """Reap ``pid`` if it is our child (or orphan, as subreaper); give up after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return  # not ours: its parent (the agent) reaps it
        if done:
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.02)


def task_pid(state_dir: Path, task_id: str) -> int:
    status = json.loads((state_dir / "tasks" / task_id / "status.json").read_text())
    return int(status["pid"])


def sha(path: Path, algorithm: str = "sha256", offset: int = 0,
        length: int | None = None) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as stream:
        stream.seek(offset)
        remaining = length
        while True:
            size = 1 << 20 if remaining is None else min(1 << 20, remaining)
            data = stream.read(size)
            if not data or size == 0:
                break
            digest.update(data)
            if remaining is not None:
                remaining -= len(data)
    return digest.hexdigest()


def make_image(path: Path, size: int, seed: int = 0) -> Path:
    """A file of pseudo-random bytes (fast, reproducible)."""
    block = hashlib.sha512(str(seed).encode()).digest() * 2048  # 128 KiB
    with open(path, "wb") as stream:
        left = size
        counter = 0
        while left > 0:
            chunk = hashlib.sha256(counter.to_bytes(8, "little")).digest() + block
            stream.write(chunk[:left])
            left -= len(chunk[:left])
            counter += 1
    return path


def error_name(call: Callable[[], Any]) -> str | None:
    try:
        call()
    except RpcFailure as failure:
        return failure.name
    raise AssertionError("the call did not fail")


class AgentRunner:
    """Starts real agents on one state dir (restartable); kills all it started."""

    def __init__(self, tmp_path: Path, **flags: Any) -> None:
        self.tmp_path = tmp_path
        self.state_dir = tmp_path / "state"
        self.images = tmp_path / "images"
        self.images.mkdir(exist_ok=True)
        self.flags = {"allowed-root": str(self.images), "heartbeat-interval": "0.2",
                      "stale-after": "1.5", "cancel-grace": "1", "enable-test-kinds": "true",
                      **{k.replace("_", "-"): str(v) for k, v in flags.items()}}
        self.agents: list[AgentProcess] = []
        self.starts = 0

    @property
    def agent(self) -> AgentProcess:
        return self.agents[-1]

    def start(self, timeout: float = 20) -> AgentProcess:
        self.starts += 1
        port = free_port()
        socket_path = self.tmp_path / f"agent{self.starts}.sock"
        argv = agent_argv(self.state_dir, port, socket_path, self.flags)
        agent = spawn_agent(argv, port, socket_path, self.state_dir,
                            self.tmp_path / f"agent{self.starts}.log")
        self.agents.append(agent)
        agent.wait_ready(timeout=timeout)
        return agent

    def kill9(self) -> None:
        proc = self.agent.proc
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def close(self) -> None:
        for agent in self.agents:
            if agent.proc.poll() is None:
                agent.proc.kill()
                agent.proc.wait(timeout=10)
        kill_task_processes(self.state_dir)

    def logs(self) -> str:
        return "\n".join(a.log_path.read_text(errors="replace") for a in self.agents)


@contextlib.contextmanager
def agent_runner(tmp_path: Path, **flags: Any) -> Iterator[AgentRunner]:
    runner = AgentRunner(tmp_path, **flags)
    try:
        yield runner
    finally:
        runner.close()


# -- an in-process agent (the real app, real task processes) ---------------------------------

FINAL = {"done", "failed", "canceled", "interrupted"}
T = TypeVar("T")


class TaskAgent:
    """An in-process agent plus the paths a test needs; test modules subclass it
    with their own helpers."""

    def __init__(self, rpc: RpcClient, root: Path, config: settings.Config) -> None:
        self.rpc = rpc
        self.root = root
        self.images = root / "images"
        self.state = config.state_path
        self.config = config
        self._next_id = 0

    async def call(self, method: str, **params: Any) -> Any:
        # Like RpcClient.call, but safe for concurrent calls (own request IDs).
        self._next_id += 1
        ident = self._next_id
        answer = await self.rpc.raw(json.dumps({"jsonrpc": "2.0", "method": method,
                                                "params": params, "id": ident}))
        assert answer["id"] == ident
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]

    async def fails(self, method: str, **params: Any) -> RpcFailure:
        with pytest.raises(RpcFailure) as info:
            await self.call(method, **params)
        return info.value

    async def start(self, kind: str = "test.sleep", **params: Any) -> str:
        answer = await self.call("startTask", kind=kind, params=params)
        assert answer["state"] == "accepted"
        return str(answer["taskID"])

    async def finish(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        task = await self.call("waitTask", taskID=task_id, timeout=timeout)
        assert task["state"] in FINAL, task
        return dict(task)

    async def reach(self, task_id: str, *states: str, timeout: float = 20) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            task = await self.call("getTask", taskID=task_id)
            return task if task["state"] in states else None
        return dict(await async_until(check, timeout=timeout))


@contextlib.asynccontextmanager
async def in_process_agents(aiohttp_client: Any, tmp_path: Path,
                            build: Callable[[RpcClient, Path, settings.Config], T],
                            **defaults: Any) -> AsyncIterator[Callable[..., Awaitable[T]]]:
    """A factory of in-process agents with task settings (``defaults``, then the
    factory's overrides); every task process they started is killed after."""
    states: list[Path] = []

    async def make(**overrides: Any) -> T:
        root = tmp_path / f"agent{len(states)}"
        root.mkdir()
        config = task_config(root, **{**defaults, **overrides})
        states.append(config.state_path)
        return build(RpcClient(await aiohttp_client(make_app(config))), root, config)

    try:
        yield make
    finally:
        for state in states:
            kill_task_processes(state)
