"""Storage connection verbs (docs/connections.md); the work is in vdsm_agent.connections."""

from __future__ import annotations

from typing import Any

from vdsm_agent.agent import Agent
from vdsm_agent.connections.manager import ConnectionManager


def _manager(agent: Agent) -> ConnectionManager:
    if agent.connections is None:
        raise RuntimeError("the connection manager is not running")
    return agent.connections


async def manage_storage_connection(agent: Agent, uri: str, connectionID: str,
                                    options: dict[str, Any] | None = None) -> dict[str, Any]:
    return await _manager(agent).manage(connectionID, uri, options)


async def unmanage_storage_connection(agent: Agent,
                                      connectionID: str) -> dict[str, Any]:
    return await _manager(agent).unmanage(connectionID)


async def get_storage_connection_list(agent: Agent,
                                      changedSince: str | None = None) -> dict[str, Any]:
    manager = _manager(agent)
    if changedSince is None:
        return await manager.connection_list()
    # The conditional form: an envelope (the plain answer is the mapping itself).
    return await manager.conditional_list(changedSince)


async def get_storage_connection(agent: Agent, connectionID: str) -> dict[str, Any]:
    return _manager(agent).get(connectionID)


async def refresh_storage_connection(agent: Agent,
                                     connectionID: str) -> dict[str, Any]:
    return await _manager(agent).refresh(connectionID)


HANDLERS = {
    "manageStorageConnection": manage_storage_connection,
    "unmanageStorageConnection": unmanage_storage_connection,
    "getStorageConnectionList": get_storage_connection_list,
    "getStorageConnection": get_storage_connection,
    "refreshStorageConnection": refresh_storage_connection,
}
