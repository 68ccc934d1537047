"""A connection as getStorageConnectionList and getStorageConnection show it.

Times are RFC 3339 with milliseconds (``lastCheck``, ``nextRetryAt``,
``lastError.time``): the contract's precision for connections.
"""

from __future__ import annotations

from typing import Any

from vdsm_agent.common.clock import rfc3339
from vdsm_agent.connections.backends.base import Discovered
from vdsm_agent.connections.monitor import ErrorInfo, State, TargetMonitor
from vdsm_agent.connections.registry import Registration


def managed(registration: Registration, monitor: TargetMonitor) -> dict[str, Any]:
    """A managed connection ID: its target's health and what its backend says."""
    health = monitor.health
    info = monitor.backend.describe(registration.endpoint, monitor.attachment)
    info.update(health.probe_info)
    info["adopted"] = bool(monitor.attachment and monitor.attachment.adopted)
    info["sharedWith"] = sorted(monitor.ids - {registration.connection_id})
    info["probeInFlight"] = monitor.probe_in_flight
    if registration.options:
        info["options"] = registration.options
    return {
        "uri": registration.endpoint.uri,
        "managed": True,
        "connected": monitor.attached,
        "state": health.state.value,
        "lastError": health.last_error.to_json() if health.last_error else None,
        "lastCheck": rfc3339(health.last_check, 3),
        "latencyMs": None if health.latency_ms is None else round(health.latency_ms, 3),
        "attempts": health.attempts,
        "nextRetryAt": (rfc3339(health.next_retry_at, 3)
                        if health.state is State.DISCONNECTED else None),
        "connectionInfo": info,
    }


def unmanaged(scheme: str, found: Discovered, leftover: ErrorInfo | None) -> dict[str, Any]:
    """What a backend found on the host and no ID manages (``leftover``: the failed
    disconnect that left it there, if that is how it came)."""
    return {
        "uri": found.uri,
        "managed": False,
        "connected": True,
        "state": State.CONNECTED.value,
        "lastError": leftover.to_json() if leftover else None,
        "lastCheck": None,
        "latencyMs": None,
        "attempts": 0,
        "nextRetryAt": None,
        "connectionInfo": {"scheme": scheme, **found.info},
    }
