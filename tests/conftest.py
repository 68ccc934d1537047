"""Shared fixtures: an in-process agent (pytest-aiohttp) and a real agent process."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# free_port: imported from here by some test modules.
from tests.support import AgentProcess, RpcClient, agent_argv, free_port, spawn_agent, until
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
    # The in-process test client connects over loopback TCP, where a caller is
    # anonymous: it gets what loopback_role grants.
    return settings.defaults().replace(
        state_dir=str(tmp_path / "state"), unix_socket="none", listen=("127.0.0.1", 0),
        loopback_role="admin")


@pytest.fixture
async def rpc(aiohttp_client: Any, config: settings.Config) -> RpcClient:
    """A JSON-RPC client of an in-process agent, checking results against the schema."""
    client = await aiohttp_client(make_app(config))
    return RpcClient(client)


@pytest.fixture
def agent_process(tmp_path: Path) -> Iterator[AgentProcess]:
    """A real vdsm-agent process on loopback and a Unix socket; killed at teardown."""
    state = tmp_path / "agent-state"
    port = free_port()
    socket_path = tmp_path / "agent.sock"
    agent = spawn_agent(agent_argv(state, port, socket_path), port, socket_path, state,
                        tmp_path / "agent.log")
    try:
        agent.wait_ready(timeout=20)
        yield agent
    finally:
        agent.stop()


@pytest.fixture
def wait_until() -> Any:
    return until


@pytest.fixture
def make_engine(aiohttp_client: Any, tmp_path: Path) -> Any:
    """An in-process engine (pytest-aiohttp): ``await make_engine(**settings)``."""
    from tests.engine_support import EngineClient, engine_config
    from vdsm_agent.engine.app import make_app as make_engine_app

    async def factory(**overrides: Any) -> EngineClient:
        client = await aiohttp_client(make_engine_app(engine_config(tmp_path, **overrides)))
        return EngineClient(client)
    return factory
