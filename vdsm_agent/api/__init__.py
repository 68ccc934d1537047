"""Verb handlers, thin: one module per area, gathered into one methods table.

Each handler is ``async def verb(agent, **params) -> result``; params have
already been validated against ``rpc_schema``; errors are raised as
``vdsm_agent.errors`` exceptions and translated in ``server.jsonrpc``.
"""

from __future__ import annotations

from vdsm_agent.api import connections, devices, events, host, tasks
from vdsm_agent.server.routes import Handler


def methods_table() -> dict[str, Handler]:
    """A fresh methods table for one application (no global registry)."""
    table: dict[str, Handler] = {}
    for module in (host, devices, tasks, connections, events):
        for name, handler in module.HANDLERS.items():
            if name in table:
                raise RuntimeError(f"verb {name} registered twice")
            table[name] = handler
    return table
