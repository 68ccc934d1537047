"""Shared fixtures: an in-process agent (pytest-aiohttp) and a real agent process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import AgentProcess, RpcClient
from vdsm_agent import settings
from vdsm_agent.server.app import make_app


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked root/tool fail loudly (never skip) when CI can run them."""
    in_ci = os.environ.get("CI") == "true"
    for item in items:
        if item.get_closest_marker("root") and os.geteuid() != 0 and not in_ci:
            item.add_marker(pytest.mark.skip(reason="needs root (CI runs as root)"))
        for marker in item.iter_markers("tool"):
            tool = marker.args[0]
            if shutil.which(tool) is None and not in_ci:
                item.add_marker(pytest.mark.skip(reason=f"needs {tool} (scripts/bootstrap)"))


@pytest.fixture
def config(tmp_path: Path) -> settings.Config:
    return settings.defaults().replace(
        state_dir=str(tmp_path / "state"), unix_socket="none", listen=("127.0.0.1", 0))


@pytest.fixture
async def rpc(aiohttp_client: Any, config: settings.Config) -> RpcClient:
    """A JSON-RPC client of an in-process agent, checking results against the schema."""
    client = await aiohttp_client(make_app(config))
    return RpcClient(client)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    """A real vdsm-agent process on loopback and a Unix socket; killed at teardown."""
    state = tmp_path / "agent-state"
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", str(socket_path),
            "--log-level", "debug"]
    log_path = tmp_path / "agent.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    agent = AgentProcess(proc=proc, port=port, socket_path=socket_path, state_dir=state,
                         log_path=log_path, argv=argv)
    try:
        agent.wait_ready(timeout=20)
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def wait_until() -> Any:
    def _wait(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s")
            time.sleep(interval)
    return _wait
