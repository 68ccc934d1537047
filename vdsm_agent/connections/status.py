"""A connection as getStorageConnectionList and getStorageConnection show it.

Times are RFC 3339 with milliseconds (``lastCheck``, ``nextRetryAt``,
``lastError.time``): the contract's precision for connections.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from vdsm_agent.common.clock import rfc3339
from vdsm_agent.connections.backends.base import Backend, Discovered
from vdsm_agent.connections.monitor import ErrorInfo, State, TargetMonitor
from vdsm_agent.connections.registry import Registration

log = logging.getLogger(__name__)


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


def change_summary(registrations: Mapping[str, Registration],
                   monitors: Mapping[str, TargetMonitor]) -> list[Any]:
    """What getStorageConnectionList's change token covers: what each managed ID
    shows that is not probe telemetry (uri, connected, state, lastError, the IDs it
    shares its target with, options). lastCheck, latencyMs, attempts, nextRetryAt,
    the connectionInfo of probes and the unmanaged entries found on the host are
    not covered: they are not compared, to keep the check free of I/O (the full
    answer, without changedSince, has them)."""
    summary = []
    for connection_id in sorted(registrations):
        registration = registrations[connection_id]
        monitor = monitors[registration.endpoint.key]
        error = monitor.health.last_error
        summary.append([connection_id, registration.endpoint.uri, monitor.attached,
                        monitor.health.state.value, error.to_json() if error else None,
                        sorted(monitor.ids), registration.options])
    return summary


def discover_all(backends: Mapping[str, Backend[Any]]) -> list[tuple[str, Discovered]]:
    """What every backend finds on the host (a worker thread: blocking reads)."""
    found: list[tuple[str, Discovered]] = []
    for scheme, backend in sorted(backends.items()):
        try:
            found.extend((scheme, item) for item in backend.discover())
        except Exception:
            log.exception("discovery of %s connections failed", scheme)
    return found
