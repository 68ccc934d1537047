"""Several engines on one PostgreSQL: host leases, fenced workers, cross-engine wake-ups.

Each engine (PostgreSQL only; sqlite is one engine that polls every host):

* registers itself (``engines`` row) at start and, every ``lease_time / 3``,
  runs ``store.leases.tick``: heartbeat, renewal of all its leases (one
  statement), surplus given back, expired or unowned leases taken up to its
  fair share. A ``HostWorker`` runs only for the hosts it leases: the keeper
  starts and stops workers as leases come and go (a lease taken again after it
  expired has a new generation: a new worker);
* runs each worker as a ``LeasedWorker``: every store call of its loops is
  fenced by the lease's generation (``store.db.FENCE``); a refused call
  (``LeaseLost``) stops the worker;
* stops every worker when it could not renew for ``lease_time`` (its leases
  may be someone else's by now), whatever the database says later;
* gives its leases back on SIGTERM (others take them at their next tick);
* listens on the engines' NOTIFY channel (``Listener``): a job another engine
  changed wakes ``waitJob`` here, a new step of a host leased here runs now.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from vdsm_agent import __version__
from vdsm_agent.common.supervision import Background
from vdsm_agent.engine.agentclient import AgentClient, AgentUnreachable, tls_context_of
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.ports import HostContext
from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import EngineStore, migrations
from vdsm_agent.engine.store import leases as store_leases
from vdsm_agent.engine.store.db import FENCE
from vdsm_agent.engine.store.leases import CHANNEL, Fence
from vdsm_agent.engine.store.models import HostRow
from vdsm_agent.metrics.counters import EngineStats
from vdsm_agent.security import audit

log = logging.getLogger(__name__)


class SecondEngine(RuntimeError):
    """Another engine uses this sqlite database (sqlite is for one engine)."""


def lock_sqlite(url: str) -> int:
    """An exclusive lock on ``DATABASE.engine-lock`` for the engine's life (its
    descriptor): a second engine on one sqlite file would poll every host twice
    and run their steps twice, so it is refused (``SecondEngine``)."""
    database = url.removeprefix("sqlite:///")
    fd = os.open(database + ".engine-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SecondEngine(f"another engine uses the database {database}: sqlite is for one "
                           "engine; run several engines on PostgreSQL (docs/engine.md, "
                           "'Several engines')") from None
    return fd


class LeasedWorker(HostWorker):
    """A host worker bound to one lease generation: its loops' store calls are fenced."""

    def __init__(self, engine: HostContext, row: HostRow, fence: Fence) -> None:
        super().__init__(engine, row)
        self.fence = fence

    async def start(self) -> None:
        # The loops' tasks are made here and keep a copy of this context.
        token = FENCE.set(self.fence)
        try:
            await super().start()
        finally:
            FENCE.reset(token)


class Visitor:
    """A host another engine polls, called from this one for what only its agent
    has (a task's output; the Gluster stop verbs' look at its tasks; its kind
    table, for a startTask's early locks): its own client, no loops, never a write.
    What it knows of the host (``current``, ``agent_version``) is what the host's
    engine last wrote in its row (``update``, at each ``Engine.reach``)."""

    def __init__(self, row: HostRow, config: EngineConfig) -> None:
        self.name: str = row.name
        self.url: str = row.url
        self.tls = (row.ca_file, row.cert_file, row.key_file)
        self.config = config
        self.client: AgentClient | None = None
        self.update(row)

    def update(self, row: HostRow) -> None:
        self.maintenance = bool(row.maintenance)
        self.agent_version: str | None = row.agent_version
        self.current = not self.maintenance and row.status == HostStatus.UP

    async def ensure_client(self) -> AgentClient:
        if self.client is None:
            context = await tls_context_of(self.name, self.url, self.tls)
            if self.client is None:
                self.client = AgentClient(
                    self.url, connect_timeout=self.config.connect_timeout,
                    request_timeout=self.config.request_timeout, ssl_context=context)
        return self.client

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        if self.maintenance:
            raise AgentUnreachable("the host is in maintenance (not polled)")
        client = await self.ensure_client()
        return await client.call(method, params, timeout)

    async def close(self) -> None:
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()


class LeaseHolder(Protocol):
    """What the keeper needs of the engine."""

    @property
    def store(self) -> EngineStore: ...
    @property
    def workers(self) -> dict[str, HostWorker]: ...
    @property
    def stats(self) -> EngineStats: ...

    async def add_worker(self, row: HostRow, fence: Fence | None = None) -> HostWorker: ...
    async def remove_worker(self, name: str) -> None: ...
    def jobs_changed(self, job_ids: Any) -> None: ...


class LeaseKeeper:
    """This engine's leases: takes, renews, gives back; starts and stops the workers."""

    def __init__(self, engine: LeaseHolder, lease_time: float) -> None:
        self.engine = engine
        self.lease_time = lease_time
        self.id = uuid.uuid4().hex
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self._wake = asyncio.Event()
        self._background = Background("leases", log)
        self._renewed: float | None = None  # monotonic start of the last good tick
        self._lock = asyncio.Lock()
        self.ticks = 0

    @property
    def interval(self) -> float:
        return self.lease_time / 3

    async def start(self) -> None:
        store = self.engine.store
        await store.run(store_leases.register_engine, self.id, self.name, os.getpid(),
                        __version__, migrations.latest_version())
        store.lease_lost = self._lost
        await self._tick()  # this engine's first share before it serves
        self._background.loop(self._loop, "lease loop", restart_delay=self.interval)
        log.info("engine %s (%s): leases of %d hosts, lease_time %.1f s", self.name, self.id,
                 len(self.engine.workers), self.lease_time)

    async def close(self) -> None:
        """Stop the loop (the engine stops the workers), then give every lease back."""
        await self._background.close()
        for name in list(self.engine.workers):
            await self.engine.remove_worker(name)
        with contextlib.suppress(Exception):
            released = await self.engine.store.run(store_leases.unregister_engine, self.id)
            for host in released:
                self._audit("leaseReleased", host, reason="stop")
            log.info("engine %s stopped: %d leases given back", self.name, len(released))

    def wake(self) -> None:
        """Tick now (a host was added)."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self._tick()
            except LookupError:  # our row was removed (taken for dead): register again
                await self.engine.store.run(
                    store_leases.register_engine, self.id, self.name, os.getpid(),
                    __version__, migrations.latest_version())
            except Exception as exc:
                await self._renewal_failed(exc)

    async def _renewal_failed(self, exc: Exception) -> None:
        since = time.monotonic() - (self._renewed or 0)
        log.warning("lease renewal failed (%s); last renewed %.1f s ago", exc, since)
        if since >= self.lease_time and self.engine.workers:
            log.warning("leases not renewed for lease_time (%.1f s): stopping every worker",
                        self.lease_time)
            for name in list(self.engine.workers):
                await self.engine.remove_worker(name)

    async def _tick(self) -> None:
        began = time.monotonic()
        result = await self.engine.store.run(store_leases.tick, self.id, self.lease_time)
        self._renewed = began
        self.ticks += 1
        async with self._lock:
            await self._apply(result)

    async def _apply(self, result: store_leases.Tick) -> None:
        workers = self.engine.workers
        for name, worker in list(workers.items()):
            held = result.held.get(name)
            fence = getattr(worker, "fence", None)
            if held is None or fence is None or fence.generation != held[0]:
                reason = "rebalance" if name in result.released else "lost"
                log.info("host %s: lease %s; its worker stops", name, reason)
                self._audit("leaseReleased", name, reason=reason)
                await self.engine.remove_worker(name)
        new = sorted(name for name in result.held if name not in workers)
        if new:
            rows = await self.engine.store.run(store_leases.hosts_named, new)
            for row in rows:
                generation = result.held[row.name][0]
                log.info("host %s: lease taken (generation %d)", row.name, generation)
                self._audit("leaseTaken", row.name, generation=generation)
                await self.engine.add_worker(row, Fence(row.name, self.id, generation))
        for name, (_generation, maintenance) in result.held.items():
            leased = workers.get(name)
            if leased is not None and leased.maintenance != maintenance:
                await leased.set_maintenance(maintenance)

    def _lost(self, fence: Fence) -> None:
        """A fenced call was refused: stop that worker now (if it is still that one)."""
        worker = self.engine.workers.get(fence.host)
        if worker is not None and getattr(worker, "fence", None) == fence:
            self._audit("leaseReleased", fence.host, reason="fenced")
            self._background.start(self.engine.remove_worker(fence.host))
        self.wake()

    def _audit(self, event: str, host: str, **details: Any) -> None:
        """An audit line, and the count of ``vdsm_engine_host_lease_changes_total``."""
        change = "taken" if event == "leaseTaken" else "released"
        self.engine.stats.lease_changes[change, str(details.get("reason", "expired"))] += 1
        audit.record(None, event, {"host": host, "engine": self.name, **details},
                     event="lease")


class Listener:
    """One LISTEN connection per engine: ``on_payload`` for each NOTIFY of the engines'
    channel, and ``on_payload("*")`` after each reconnection (what came while it was
    away is not known)."""

    def __init__(self, url: str, on_payload: Callable[[str], None]) -> None:
        self.url = url
        self.on_payload = on_payload
        self._background = Background("notify listener", log)
        self.connected = asyncio.Event()
        self.connections = 0

    def start(self, retry: float) -> None:
        self._background.loop(self._listen, "listener", restart_delay=retry)

    async def close(self) -> None:
        await self._background.close()

    async def _listen(self) -> None:
        import psycopg2  # type: ignore[import-untyped]

        conn = await asyncio.to_thread(psycopg2.connect, self.url,
                                       connect_timeout=10)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        # The descriptor's number, kept: psycopg2 closes the socket itself when it
        # finds the connection lost (fileno() then raises), and a reader left on
        # the number would break the next socket that gets it (an API connection).
        fd = conn.fileno()
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"LISTEN {CHANNEL}")
            loop.add_reader(fd, ready.set)
            self.connected.set()
            self.connections += 1
            if self.connections > 1:  # what came while it was away is not known
                self.on_payload("*")
            while True:
                await ready.wait()
                ready.clear()
                conn.poll()  # a dropped connection raises: the loop reconnects
                while conn.notifies:
                    self.on_payload(conn.notifies.pop(0).payload)
        finally:
            self.connected.clear()
            loop.remove_reader(fd)  # before anything else can get the number
            conn.close()
