"""Which managed targets hold a path: a task's paths become connection resources.

A task that reads or writes a path under a mount point (or a ``file://``
directory), or a device that a connection attached (a loop or iSCSI device),
also holds that connection (``connection:<id>``), so that unmanaging it is
refused while the task runs. Blocking (``realpath``, a backend's
``describe``): run in a worker thread, with the targets taken on the loop.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, Backend
from vdsm_agent.connections.backends.file import FileEndpoint
from vdsm_agent.connections.backends.mounts import MountBackend
from vdsm_agent.connections.monitor import TargetMonitor

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Footprint:
    """A target as ``resources_for_paths`` needs it, taken on the event loop."""

    ids: tuple[str, ...]
    backend: Backend[Any]
    endpoint: uris.Endpoint
    attachment: Attachment | None


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _resolved_parent(path: str) -> str:
    # Symlinks above the mount point are resolved; the mount point itself is
    # never touched (a stat of it waits for a hung server).
    head, leaf = os.path.split(path.rstrip("/") or "/")
    return os.path.join(os.path.realpath(head), leaf)


def ids_holding(paths: Sequence[str], targets: Sequence[Footprint]) -> set[str]:
    """Blocking: the IDs of the targets that hold any of ``paths``."""
    held: set[str] = set()
    for target in targets:
        backend, endpoint = target.backend, target.endpoint
        if isinstance(backend, MountBackend):
            tree: str | None = backend.mount_point(endpoint)
        elif isinstance(endpoint, FileEndpoint):
            tree = endpoint.path
        else:
            tree = None
        if tree is not None:
            roots = {tree, _resolved_parent(tree)}
            hit = any(_within(path, root) for path in paths for root in roots)
        else:
            try:
                device = backend.describe(endpoint, target.attachment).get("device")
            except Exception:
                log.exception("connection %s: cannot tell its device", ", ".join(target.ids))
                device = None
            hit = isinstance(device, str) and os.path.realpath(device) in paths
        if hit:
            held.update(target.ids)
    return held




def claims_of(monitor: TargetMonitor) -> set[str]:
    """What a target occupies on the host (its attachment's identity, its mount
    point): a discovered item with one of these is that target, not an unmanaged one."""
    claims = set()
    if monitor.attachment is not None:
        claims.add(monitor.attachment.identity)
    if isinstance(monitor.backend, MountBackend):
        claims.add(monitor.backend.mount_point(monitor.endpoint))
    return claims
