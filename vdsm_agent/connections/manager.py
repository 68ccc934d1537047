"""The connection manager: connection IDs, shared targets, persistence, the list.

Two layers (shared/reference/connections.md §2): a registry of connection IDs,
each with its URI and options, persisted in the store; and one
``TargetMonitor`` per target (the endpoint's ``key``), shared by every ID that
names it. A target is connected while at least one ID references it and
disconnected when the last one is unmanaged (nova's ``_HostMountState``, the
RFC's rule).

* ``manage`` validates, records the ID durably and returns; it does not wait
  for the connect. The same ID with the same (canonical) URI is idempotent;
  with another URI it is ``ConnectionIdInUse``.
* ``unmanage`` refuses an ID held by an unfinished task (``ResourceBusy``,
  asked through ``resource_holder``), removes the ID, and disconnects when it
  was the last reference, waiting for the disconnect. A failed disconnect is
  not an error of the call: the target stays on the host and shows up in the
  list as an unmanaged connection carrying the failure as ``lastError``.
* At start-up every persisted ID is managed again; targets still attached are
  adopted by the backends, not attached again.
* ``connection_list`` merges the managed IDs with what the backends discover on the host
  (mounts, loop devices, iSCSI sessions the agent does not manage), the latter
  under temporary IDs ``unmanaged-<n>`` that are not stable across calls.

Registry changes are serialised by one asyncio lock (they are short: a DB
write); connects, probes and disconnects run in the monitors, per target, in
parallel. A target being disconnected is not adopted by a new ``manage`` of
the same URI: the new monitor waits for that disconnect first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from pathlib import Path
from typing import Any

from vdsm_agent.common import changes
from vdsm_agent.common.backoff import Backoff
from vdsm_agent.connections import registry, status
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends import BACKENDS, BackendClass
from vdsm_agent.connections.backends.base import (
    Backend,
    BackendContext,
    BackendError,
    Discovered,
    Runner,
    SystemRunner,
)
from vdsm_agent.connections.footprint import Footprint, claims_of, ids_holding
from vdsm_agent.connections.monitor import (
    ErrorInfo,
    MonitorPolicy,
    State,
    TargetMonitor,
)
from vdsm_agent.connections.probes import ProbePool
from vdsm_agent.connections.registry import Registration
from vdsm_agent.errors import (
    AgentError,
    ConnectionIdInUse,
    ConnectionNotFound,
    ResourceBusy,
    UnsupportedScheme,
)
from vdsm_agent.security import redact
from vdsm_agent.settings import Config
from vdsm_agent.store import Store

log = logging.getLogger(__name__)

ResourceHolder = Callable[[str], Awaitable[str | None]]
UNMANAGED_PREFIX = "unmanaged-"


def resource_name(connection_id: str) -> str:
    """The resource a task holds while it uses a connection."""
    return f"connection:{connection_id}"


@dataclasses.dataclass(frozen=True)
class ConnectionEvent:
    """A state change of a target, for every connection ID that names it."""

    connection_ids: tuple[str, ...]
    uri: str
    old_state: str
    new_state: str
    error: ErrorInfo | None
    at: float


Listener = Callable[[ConnectionEvent], None]


def policy_from(config: Config) -> MonitorPolicy:
    return MonitorPolicy(
        interval=config.probe_interval,
        failures_to_disconnect=config.probe_failures,
        successes_to_recover=config.probe_recoveries,
        backoff=Backoff(base=config.backoff_base, cap=config.backoff_cap,
                        floor=min(config.backoff_floor, config.backoff_cap)),
        backoff_reset=config.backoff_reset)


def mount_root_from(config: Config) -> Path:
    configured = config.mount_root
    return Path(configured).resolve() if configured else config.state_path / "mnt"


class ConnectionManager:
    def __init__(self, config: Config, store: Store | None, *,
                 runner: Runner | None = None,
                 resource_holder: ResourceHolder | None = None,
                 backends: Mapping[str, BackendClass] | None = None,
                 sysfs_root: Path = Path("/sys"), dev_root: Path = Path("/dev"),
                 mountinfo: Path = Path("/proc/self/mountinfo"),
                 proc_root: Path = Path("/proc"),
                 rng: random.Random | None = None) -> None:
        self.policy = policy_from(config)
        self.context = BackendContext(
            runner=runner or SystemRunner(), mount_root=mount_root_from(config),
            connect_timeout=config.connect_timeout,
            disconnect_timeout=config.disconnect_timeout, sysfs_root=sysfs_root,
            dev_root=dev_root, mountinfo=mountinfo, proc_root=proc_root,
            sshfs_identity_file=config.sshfs_identity_file,
            sshfs_host_key_checking=config.sshfs_host_key_checking,
            sshfs_known_hosts_file=config.sshfs_known_hosts_file,
            allowed_roots=tuple(config.allowed_roots))
        self.backends: dict[str, Backend[Any]] = {
            scheme: cls(self.context) for scheme, cls in (backends or BACKENDS).items()}
        self.pool = ProbePool(config.probe_workers)
        self.resource_holder = resource_holder
        # The hook for the events feed: called on the loop for every state change.
        self.listeners: list[Listener] = []
        self._store = store
        self._rng = rng or random.Random()
        self._registrations: dict[str, Registration] = {}
        self._monitors: dict[str, TargetMonitor] = {}
        self._disconnecting: dict[str, asyncio.Task[ErrorInfo | None]] = {}
        self._leftovers: dict[str, ErrorInfo] = {}  # identity or URI -> disconnect failure
        self._lock = asyncio.Lock()
        self._change_epoch = changes.new_epoch()

    @property
    def schemes(self) -> list[str]:
        """The schemes this host serves (its tools and kernel: backends/needs.py)."""
        return sorted(set(self.backends) - set(self.unserved_schemes()))

    def unserved_schemes(self) -> dict[str, str]:
        """The schemes with a backend that this host cannot serve, and why."""
        return {scheme: reason for scheme in sorted(self.backends)
                if (reason := self.backends[scheme].unserved())}

    @property
    def monitors(self) -> Mapping[str, TargetMonitor]:
        return self._monitors

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Create the mount root and manage every persisted ID again."""
        self.context.mount_root.mkdir(parents=True, exist_ok=True)
        if self._store is None:
            return
        rows = await self._store.run(registry.load_rows)
        for connection_id, uri, options, created_at in rows:
            try:
                endpoint = self.parse(uri)
            except AgentError as exc:
                log.error("connection %s: stored URI %s cannot be managed any more: %s",
                          connection_id, redact.uri(uri), exc)
                continue
            self._register(Registration(connection_id, endpoint, options, created_at))
        if rows:
            log.info("managing %d persisted connection(s) again", len(rows))

    async def close(self) -> None:
        """Stop monitoring; targets stay attached (a restart adopts them)."""
        await asyncio.gather(*(monitor.stop() for monitor in self._monitors.values()))
        pending = list(self._disconnecting.values())
        if pending:
            await asyncio.wait(pending, timeout=self.context.disconnect_timeout * 2 + 1)
            for task in pending:
                task.cancel()
        self.pool.close()

    # -- verbs --------------------------------------------------------------------------

    def parse(self, uri: str) -> uris.Endpoint:
        scheme = uris.scheme_of(uri)
        backend = self.backends.get(scheme)
        if backend is None:
            raise UnsupportedScheme(f"no backend for {scheme}://", scheme=scheme,
                                    supported=self.schemes)
        endpoint: uris.Endpoint = backend.parse(uri)
        return endpoint

    async def manage(self, connection_id: str, uri: str,
                     options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        endpoint = self.parse(uri)
        backend, known = self.backends[endpoint.scheme], self._registrations.get(connection_id)
        reason = backend.unserved()  # a new one could only fail; a persisted one is kept
        if reason and (known is None or known.endpoint.uri != endpoint.uri):
            raise UnsupportedScheme(f"{endpoint.scheme}:// is not served on this host: {reason}",
                                    scheme=endpoint.scheme, supported=self.schemes, reason=reason)
        backend.authorize(endpoint)
        async with self._lock:
            existing = self._registrations.get(connection_id)
            if existing is not None:
                if existing.endpoint.uri == endpoint.uri:
                    return self.status(connection_id)
                raise ConnectionIdInUse(
                    f"{connection_id} is registered for {existing.endpoint.uri}",
                    connectionID=connection_id, uri=existing.endpoint.uri)
            registration = Registration(connection_id, endpoint, dict(options or {}),
                                        time.time())
            if self._store is not None:
                await self._store.run(registry.insert_row, registration)
            self._register(registration)
        log.info("connection %s: managed %s", connection_id, endpoint.uri)
        return self.status(connection_id)

    async def unmanage(self, connection_id: str) -> dict[str, Any]:
        async with self._lock:
            registration = self._registration(connection_id)
            await self._check_not_held(connection_id)
            if self._store is not None:
                await self._store.run(registry.delete_row, connection_id)
            del self._registrations[connection_id]
            monitor = self._monitors[registration.endpoint.key]
            monitor.ids.discard(connection_id)
            log.info("connection %s: unmanaged %s", connection_id, registration.endpoint.uri)
            if monitor.ids:
                return {"connectionID": connection_id, "disconnected": False,
                        "sharedWith": sorted(monitor.ids), "lastError": None}
            del self._monitors[monitor.key]
            task = asyncio.create_task(self._disconnect(monitor, connection_id),
                                       name=f"disconnect {monitor.key}")
            self._disconnecting[monitor.key] = task
        error = await asyncio.shield(task)
        return {"connectionID": connection_id, "disconnected": error is None,
                "sharedWith": [], "lastError": error.to_json() if error else None}

    async def resources_for_paths(self, paths: Collection[str]) -> list[str]:
        """``connection:<id>`` of every managed ID whose target holds one of ``paths``.

        ``paths`` are resolved (a task kind's ``file:``/``device:`` resources). A
        path is on a target when it is at or under its mount point (a ``file://``
        connection's directory counts as one), or is its block device (loop, iSCSI
        LUN). Every ID naming that target counts. The filesystem work (resolving
        the mount points' parents, iSCSI sysfs) runs in a worker thread.
        """
        targets = [Footprint(tuple(sorted(monitor.ids)), monitor.backend, monitor.endpoint,
                              monitor.attachment)
                   for monitor in self._monitors.values() if monitor.ids]
        if not paths or not targets:
            return []
        held = await asyncio.to_thread(ids_holding, list(paths), targets)
        return sorted(resource_name(connection_id) for connection_id in held)

    def get(self, connection_id: str) -> dict[str, Any]:
        self._registration(connection_id)
        return self.status(connection_id)

    async def refresh(self, connection_id: str) -> dict[str, Any]:
        registration = self._registration(connection_id)
        monitor = self._monitors[registration.endpoint.key]
        await monitor.refresh(timeout=self.policy.interval * 2 + 1)
        return self.get(connection_id)

    async def connection_list(self) -> dict[str, dict[str, Any]]:
        result = {cid: self.status(cid) for cid in sorted(self._registrations)}
        discovered = await asyncio.to_thread(status.discover_all, self.backends)
        claimed = self._claimed()
        number = 0
        for scheme, found in discovered:
            if found.identity in claimed:
                continue
            number += 1
            while f"{UNMANAGED_PREFIX}{number}" in result:
                number += 1
            result[f"{UNMANAGED_PREFIX}{number}"] = self._unmanaged_status(scheme, found)
        self._forget_cleared_leftovers(discovered)
        return result

    def change_token(self) -> str:
        """getStorageConnectionList's change token (``status.change_summary``: what it
        covers and why probe telemetry is left out)."""
        return changes.digest_token(self._change_epoch,
                                    status.change_summary(self._registrations, self._monitors))

    async def conditional_list(self, changed_since: str) -> dict[str, Any]:
        """getStorageConnectionList with ``changedSince``: ``{connections, changeToken,
        notModified}``; connections null when nothing covered changed since the token."""
        current = self.change_token()
        if changes.not_modified(changed_since, current):
            return {"connections": None, "changeToken": current, "notModified": True}
        return {"connections": await self.connection_list(), "changeToken": current,
                "notModified": False}

    # -- internals ------------------------------------------------------------------------

    def _registration(self, connection_id: str) -> Registration:
        registration = self._registrations.get(connection_id)
        if registration is None:
            raise ConnectionNotFound(f"no managed connection {connection_id}",
                                     connectionID=connection_id)
        return registration

    async def _check_not_held(self, connection_id: str) -> None:
        if self.resource_holder is None:
            return
        resource = resource_name(connection_id)
        holder = await self.resource_holder(resource)
        if holder is not None:
            raise ResourceBusy(f"task {holder} uses connection {connection_id}",
                               resource=resource, taskID=holder, holder=holder)

    def _register(self, registration: Registration) -> None:
        endpoint = registration.endpoint
        self._registrations[registration.connection_id] = registration
        monitor = self._monitors.get(endpoint.key)
        if monitor is None:
            monitor = TargetMonitor(
                backend=self.backends[endpoint.scheme], endpoint=endpoint,
                policy=self.policy, pool=self.pool, rng=self._rng,
                on_change=self._state_changed, before=self._disconnecting.get(endpoint.key))
            self._monitors[endpoint.key] = monitor
            monitor.ids.add(registration.connection_id)
            monitor.start()
        else:
            monitor.ids.add(registration.connection_id)

    async def _disconnect(self, monitor: TargetMonitor, connection_id: str) -> ErrorInfo | None:
        try:
            await monitor.stop()
            try:
                await monitor.backend.disconnect(monitor.endpoint, monitor.attachment)
            except BackendError as exc:
                error = ErrorInfo(exc.code, exc.message, time.time())
                self._leftovers[self._identity(monitor)] = error
                log.warning("connection %s: disconnect of %s failed, left on the host: "
                            "%s: %s", connection_id, monitor.endpoint.uri, exc.code,
                            exc.message)
                return error
            log.info("connection %s: disconnected %s", connection_id, monitor.endpoint.uri)
            return None
        finally:
            if self._disconnecting.get(monitor.key) is asyncio.current_task():
                del self._disconnecting[monitor.key]

    def _identity(self, monitor: TargetMonitor) -> str:
        claims = claims_of(monitor)
        return next(iter(sorted(claims))) if claims else monitor.endpoint.uri

    def _claimed(self) -> set[str]:
        return set().union(*(claims_of(monitor) for monitor in self._monitors.values()))

    def _forget_cleared_leftovers(self, discovered: list[tuple[str, Discovered]]) -> None:
        present = {item.identity for _, item in discovered} | {
            item.uri for _, item in discovered}
        for identity in list(self._leftovers):
            if identity not in present:
                del self._leftovers[identity]

    def _state_changed(self, monitor: TargetMonitor, old: State, new: State) -> None:
        error = monitor.health.last_error if new is not State.CONNECTED else None
        reason = f": {error.code}: {error.message}" if error else ""
        for connection_id in sorted(monitor.ids):
            level = logging.INFO if new is State.CONNECTED else logging.WARNING
            log.log(level, "connection %s: %s -> %s%s", connection_id, old, new, reason)
        event = ConnectionEvent(tuple(sorted(monitor.ids)), monitor.endpoint.uri, old.value,
                                new.value, error, time.time())
        for listener in list(self.listeners):
            try:
                listener(event)
            except Exception:
                log.exception("connection event listener %r failed", listener)

    # -- status ------------------------------------------------------------------------

    def status(self, connection_id: str) -> dict[str, Any]:
        registration = self._registrations[connection_id]
        return status.managed(registration, self._monitors[registration.endpoint.key])

    def _unmanaged_status(self, scheme: str, found: Discovered) -> dict[str, Any]:
        leftover = self._leftovers.get(found.identity) or self._leftovers.get(found.uri)
        return status.unmanaged(scheme, found, leftover)
