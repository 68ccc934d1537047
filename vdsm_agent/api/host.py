"""Host-level verbs: ping, getCapabilities, rpc.discover."""

from __future__ import annotations

import socket
from typing import Any

from rpc_schema import openrpc
from vdsm_agent import API_VERSION, __version__
from vdsm_agent.agent import Agent
from vdsm_agent.connections.backends import BACKENDS


async def ping(agent: Agent) -> dict[str, Any]:
    return {"version": __version__, "uptime": round(agent.uptime, 3)}


async def get_capabilities(agent: Agent) -> dict[str, Any]:
    return {
        "version": __version__,
        "apiVersion": API_VERSION,
        "hostname": socket.gethostname(),
        **_schemes(agent),
        "allowedRoots": list(agent.config.allowed_roots),
        "taskKinds": agent.tasks.kind_names() if agent.tasks is not None else [],
        "limits": {
            "maxBodySize": agent.config.max_body_size,
            "maxBatch": agent.config.max_batch,
        },
    }


def _schemes(agent: Agent) -> dict[str, Any]:
    """The URI schemes this host serves (its tools and kernel), and why others are not."""
    manager = agent.connections
    if manager is None:  # not started (yet): every scheme with a backend
        return {"uriSchemes": sorted(BACKENDS), "unservedSchemes": {}}
    return {"uriSchemes": manager.schemes, "unservedSchemes": manager.unserved_schemes()}


async def discover(agent: Agent) -> dict[str, Any]:
    return openrpc.document(agent.schema)


HANDLERS = {
    "ping": ping,
    "getCapabilities": get_capabilities,
    "rpc.discover": discover,
}
