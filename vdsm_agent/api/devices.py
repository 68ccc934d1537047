"""Device inventory verbs."""

from __future__ import annotations

from typing import Any

from vdsm_agent.agent import Agent


async def get_device_list(agent: Agent, paths: list[str] | None = None) -> dict[str, Any]:
    devices = await agent.inventory.list(paths)
    return {"devices": devices}


HANDLERS = {
    "getDeviceList": get_device_list,
}
