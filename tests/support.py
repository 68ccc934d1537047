"""Test helpers: a schema-checking JSON-RPC client, a real agent process handle
(and how to start one), free ports and polling."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema

import rpc_schema
from vdsm_agent.client.transport import UnixHTTPConnection

SCHEMA = rpc_schema.load("agent")


class RpcFailure(Exception):
    """A JSON-RPC error answer."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')} {error.get('data')}")
        self.error = error
        self.code = error["code"]
        data = error.get("data")
        self.name = data.get("name") if isinstance(data, dict) else None
        self.data = data


def check_result(method: str, result: Any) -> None:
    """Validate a verb's result against its result schema in rpc_schema."""
    verb = SCHEMA.verbs[method]
    schema = {**verb.result, "components": SCHEMA.components}
    jsonschema.validate(result, schema)


class RpcClient:
    """Calls verbs on an aiohttp test client."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._next_id = 0

    @property
    def app(self) -> Any:
        return self.client.server.app

    async def raw(self, body: bytes | str, status: int | None = 200) -> Any:
        response = await self.client.post("/jsonrpc", data=body)
        if status is not None:
            assert response.status == status, await response.text()
        text = await response.text()
        return json.loads(text) if text else None

    async def call(self, method: str, **params: Any) -> Any:
        self._next_id += 1
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params,
                           "id": self._next_id})
        answer = await self.raw(body)
        assert answer["id"] == self._next_id
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]


@dataclasses.dataclass
class AgentProcess:
    """A real agent subprocess, stopped by PID at teardown."""

    proc: subprocess.Popen[bytes]
    port: int
    socket_path: Path
    state_dir: Path
    log_path: Path
    argv: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"

    def http(self, method: str, path: str, body: bytes | None = None,
             unix: bool = True, timeout: float = 30) -> tuple[int, bytes]:
        """One HTTP exchange; over the Unix socket by default, where root is admin
        (a loopback TCP caller is anonymous: ``unix=False`` to be one)."""
        conn: http.client.HTTPConnection = (
            UnixHTTPConnection(str(self.socket_path), timeout) if unix
            else http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout))
        try:
            conn.request(method, path, body=body,
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def call(self, method: str, unix: bool = True, **params: Any) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        status, data = self.http("POST", "/jsonrpc", body.encode(), unix=unix)
        assert status == 200, data
        answer = json.loads(data)
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited: {self.log_path.read_text()}")
            try:
                status, _ = self.http("GET", "/health", unix=False, timeout=1)
                if status == 200 and self.socket_path.exists():
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"agent not ready in {timeout}s: {self.log_path.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05,
          what: str = "condition") -> Any:
    """Poll ``predicate()`` until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(interval)


async def async_until(predicate: Callable[[], Awaitable[Any]], timeout: float = 10.0,
                      interval: float = 0.05) -> Any:
    """``until`` for in-process agents: sleeps without blocking their event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def agent_argv(state_dir: Path, port: int, socket_path: Path,
               flags: dict[str, Any] | None = None, log_level: str | None = "debug") -> list[str]:
    """``python -m vdsm_agent.main`` on 127.0.0.1:port and a Unix socket; each flag as
    ``--name value`` (underscores in names become dashes)."""
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", str(socket_path)]
    if log_level is not None:
        argv += ["--log-level", log_level]
    for name, value in (flags or {}).items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    return argv


def spawn_agent(argv: list[str], port: int, socket_path: Path, state_dir: Path,
                log_path: Path, append_log: bool = False) -> AgentProcess:
    """Start an agent process (not yet ready: see ``AgentProcess.wait_ready``)."""
    with open(log_path, "ab" if append_log else "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    return AgentProcess(proc=proc, port=port, socket_path=socket_path, state_dir=state_dir,
                        log_path=log_path, argv=argv)


@contextlib.contextmanager
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProcess]]:
    """A factory of ready real agents, each ``start(nofile=None, socket_dir=None,
    **flags)`` (``nofile``: its RLIMIT_NOFILE from the start, with ``prlimit``);
    logging at info; every agent is stopped by PID on the way out."""
    started: list[AgentProcess] = []

    def start(nofile: int | None = None, socket_dir: Path | None = None,
              **flags: Any) -> AgentProcess:
        index = len(started)
        state = tmp_path / f"state{index}"
        port = free_port()
        socket_path = (socket_dir or tmp_path) / f"agent{index}.sock"
        argv = agent_argv(state, port, socket_path, flags, log_level="info")
        if nofile is not None:
            argv = ["prlimit", f"--nofile={nofile}", *argv]
        agent = spawn_agent(argv, port, socket_path, state, tmp_path / f"agent{index}.log")
        started.append(agent)
        agent.wait_ready(timeout=30)
        return agent

    try:
        yield start
    finally:
        for agent in started:
            agent.stop()
