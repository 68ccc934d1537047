"""The engine's runtime context: what every verb handler receives first.

The engine makes and wires its parts: one ``poller.HostWorker`` per host (on
PostgreSQL, per host it leases: ``leases.LeaseKeeper``), the ``jobs.Jobs`` and
their ``jobs.StepRunner``. Each part sees the engine (and
the others) only through the narrow interfaces of ``ports``, so none of them
imports this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable

from rpc_schema import ApiSchema
from vdsm_agent.common import clock
from vdsm_agent.common.supervision import Background
from vdsm_agent.engine.jobs import Jobs, StepRunner
from vdsm_agent.engine.leases import LeasedWorker, LeaseKeeper, Listener, Visitor, lock_sqlite
from vdsm_agent.engine.peers import Peers, PeerView
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store.leases import Fence
from vdsm_agent.engine.store.models import HostRow
from vdsm_agent.metrics.counters import EngineStats

log = logging.getLogger(__name__)

# A change the views show: (kind, host, key), e.g. ("task", "host1", taskID),
# ("host", "host1", None), ("job", "", jobID). The console's live updates listen.
ChangeListener = Callable[[str, str, str | None], None]

# Retention sweeps run at least this often (and at most every half retention).
SWEEP_INTERVAL = 60.0


@dataclasses.dataclass(eq=False)
class Engine:
    config: EngineConfig
    schema: ApiSchema
    store: EngineStore
    started: float = dataclasses.field(default_factory=time.monotonic)
    workers: dict[str, HostWorker] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.jobs = Jobs(self)
        self.steps = StepRunner(self)
        self._jobs_event = asyncio.Event()
        self._background = Background("engine", log)
        self.stats = EngineStats()  # resyncs, step retries (GET /metrics, docs/metrics.md)
        self.listeners: list[ChangeListener] = []  # notify(): the console's live updates
        # PostgreSQL: several engines may share the store; each polls the hosts it leases.
        self.leases: LeaseKeeper | None = None
        self._sqlite_lock: int | None = None  # sqlite: one engine per database file
        self.visitors: dict[str, Visitor] = {}  # hosts another engine polls, called from here
        self._id = uuid.uuid4().hex  # sqlite: the one engine's (listEngines)
        self._name = f"{socket.gethostname()}:{os.getpid()}"
        self.listener: Listener | None = None
        self.peers: Peers | None = None  # PostgreSQL: the hosts other engines poll

    @property
    def engine_id(self) -> str:
        return self.leases.id if self.leases is not None else self._id

    @property
    def name(self) -> str:
        return self.leases.name if self.leases is not None else self._name

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    @staticmethod
    def now() -> float:
        return clock.now()

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self.store.kind == "postgresql":
            self.listener = Listener(self.store.url, self._notified)
            self.listener.start(self.config.retry_interval)
            self.leases = LeaseKeeper(self, self.config.lease_time)
            await self.leases.start()
            self.peers = Peers(self.store, lambda: self.engine_id, self._publish)
            await self.peers.refresh()
            self._background.loop(lambda: self._peers().refresh_loop(
                self.config.lease_time / 3), "peer hosts", self.config.retry_interval)
            self._background.loop(self._peers().relay_loop, "change relay",
                                  self.config.retry_interval)
        else:
            self._sqlite_lock = lock_sqlite(self.store.url)
            for row in await self.store.run(repository.list_hosts):
                await self.add_worker(row)
        self._background.loop(self._sweep_loop, "retention", restart_delay=self._sweep_interval())
        log.info("engine started with %d hosts", len(self.workers))

    async def close(self) -> None:
        await self._background.close()
        if self.listener is not None:
            await self.listener.close()
        if self.leases is not None:
            await self.leases.close()  # stops its workers, then gives the leases back
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(worker.stop() for worker in workers))
        visitors, self.visitors = list(self.visitors.values()), {}
        await asyncio.gather(*(visitor.close() for visitor in visitors))
        if self._sqlite_lock is not None:
            os.close(self._sqlite_lock)
            self._sqlite_lock = None

    async def reach(self, name: str) -> HostWorker | Visitor:
        """What calls the host's agent from here: its worker, or (several engines) a
        visitor of a host another engine polls (HostNotFound: no such host)."""
        worker = self.workers.get(name)
        if worker is not None:
            return worker
        row = await self.store.run(repository.get_host, name)
        visitor = self.visitors.get(name)
        if visitor is None or (visitor.url, visitor.tls) != (row.url, (
                row.ca_file, row.cert_file, row.key_file)):
            if visitor is not None:
                await visitor.close()
            visitor = self.visitors[name] = Visitor(row, self.config)
        visitor.update(row)
        return visitor

    async def add_worker(self, row: HostRow, fence: Fence | None = None) -> HostWorker:
        worker = HostWorker(self, row) if fence is None else LeasedWorker(self, row, fence)
        self.workers[worker.name] = worker
        await worker.start()
        return worker

    async def host_added(self, row: HostRow) -> None:
        """A new host: polled here (sqlite), or by whichever engine leases it."""
        if self.leases is None:
            await self.add_worker(row)
        else:
            self.leases.wake()

    def _notified(self, payload: str) -> None:
        """A NOTIFY of the engines' channel: ``job ID`` (a job moved), ``steps H1 H2 ...``
        (new steps for these hosts; ``steps *``: for any), ``*`` (the listener
        reconnected: anything may have changed)."""
        kind, _, rest = payload.partition(" ")
        if kind == "job" and rest:
            self.jobs_changed([rest])
            return
        if kind == "changes" and self.peers is not None:
            self._background.start(self.peers.received(rest))
            return
        names = rest.split() if kind == "steps" and rest != "*" else list(self.workers)
        for name in names:
            worker = self.workers.get(name)
            if worker is not None:
                worker.kick()
        if kind == "*":
            event, self._jobs_event = self._jobs_event, asyncio.Event()
            event.set()  # every waitJob reads its job again
            if self.peers is not None:
                self._background.start(self.peers.reread())

    async def remove_worker(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop()

    # -- what the jobs and views need to know (ports.JobContext, ports.ViewContext) -------

    def host(self, name: str) -> HostWorker | None:
        """The host's worker: what the jobs and views see of it (``ports.HostHandle``)."""
        return self.workers.get(name)

    def hosts(self) -> list[HostWorker]:
        """Every polled host's worker (``ports.HostView``: metrics, health)."""
        return list(self.workers.values())

    def _peers(self) -> Peers:
        assert self.peers is not None
        return self.peers

    def _peer_views(self) -> list[PeerView]:
        """The hosts other engines poll (none on sqlite), this engine's own left out."""
        if self.peers is None:
            return []
        return [peer for name, peer in self.peers.hosts.items() if name not in self.workers]

    def seen(self, name: str) -> HostWorker | PeerView | None:
        """The host as this engine sees it: its worker, or (several engines) what the
        engine that polls it wrote (the console)."""
        worker = self.workers.get(name)
        if worker is not None or self.peers is None:
            return worker
        return self.peers.hosts.get(name)

    def every_host(self) -> list[HostWorker | PeerView]:
        """Every host, whichever engine polls it (the console)."""
        return [*self.workers.values(), *self._peer_views()]

    def not_current(self) -> list[str]:
        """Hosts whose state the engine does not currently see (shown as unknown):
        several engines: also another engine's host that does not answer it, or
        that nobody holds a live lease on."""
        return sorted([*(name for name, worker in self.workers.items() if not worker.current),
                       *(peer.name for peer in self._peer_views() if not peer.current)])

    def unreachable(self) -> list[str]:
        """Hosts that should answer and do not (yet): the partial-result list, every
        engine's hosts."""
        return sorted([*(name for name, worker in self.workers.items()
                         if worker.status in (HostStatus.CONNECTING,
                                              HostStatus.NON_RESPONSIVE)),
                       *(peer.name for peer in self._peer_views() if peer.unreachable)])

    # -- change notifications (waitJob, the console) ---------------------------------------

    def notify(self, kind: str, host: str, key: str | None = None) -> None:
        """Tell the listeners that something the views show changed (never blocks:
        a listener only takes note). Several engines: a change of a host leased here
        is relayed to the other engines' consoles too (``peers``)."""
        self._publish(kind, host, key)
        if self.peers is not None and host in self.workers:
            self.peers.offer(kind, host, key)

    def _publish(self, kind: str, host: str, key: str | None = None) -> None:
        for listener in self.listeners:
            listener(kind, host, key)

    def jobs_changed(self, job_ids: Iterable[str]) -> None:
        if job_ids:
            event, self._jobs_event = self._jobs_event, asyncio.Event()
            event.set()
            for job_id in job_ids:
                self.notify("job", "", job_id)

    def jobs_event(self) -> asyncio.Event:
        """Set at the next change of any job (take it before reading the job)."""
        return self._jobs_event

    def _sweep_interval(self) -> float:
        return min(SWEEP_INTERVAL, max(self.config.job_retention / 2, 0.05))

    async def _sweep_loop(self) -> None:
        """Delete finished jobs past job_retention (a failed round is logged and the
        loop starts again after an interval: common.supervision)."""
        retention = self.config.job_retention
        while True:
            removed = await self.store.run(repository.delete_finished_jobs,
                                           self.now() - retention)
            if removed:
                log.info("retention: removed %d finished jobs", removed)
            await asyncio.sleep(self._sweep_interval())
