"""The engine's runtime context: what every verb handler receives first.

The engine makes and wires its parts: one ``poller.HostWorker`` per host, the
``jobs.Jobs`` and their ``jobs.StepRunner``. Each part sees the engine (and
the others) only through the narrow interfaces of ``ports``, so none of them
imports this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable

from rpc_schema import ApiSchema
from vdsm_agent.common import clock
from vdsm_agent.common.supervision import Background
from vdsm_agent.engine.jobs import Jobs, StepRunner
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import EngineStore, repository
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

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started

    @staticmethod
    def now() -> float:
        return clock.now()

    # -- life cycle --------------------------------------------------------------------

    async def start(self) -> None:
        rows = await self.store.run(repository.list_hosts)
        for row in rows:
            await self.add_worker(row)
        self._background.loop(self._sweep_loop, "retention", restart_delay=self._sweep_interval())
        log.info("engine started with %d hosts", len(rows))

    async def close(self) -> None:
        await self._background.close()
        workers, self.workers = list(self.workers.values()), {}
        await asyncio.gather(*(worker.stop() for worker in workers))

    async def add_worker(self, row: HostRow) -> HostWorker:
        worker = HostWorker(self, row)
        self.workers[worker.name] = worker
        await worker.start()
        return worker

    async def remove_worker(self, name: str) -> None:
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop()

    # -- what the jobs and views need to know (ports.JobContext, ports.ViewContext) -------

    def host(self, name: str) -> HostWorker | None:
        """The host's worker: what the jobs and views see of it (``ports.HostHandle``)."""
        return self.workers.get(name)

    def hosts(self) -> list[HostWorker]:
        """Every polled host's worker (``ports.HostView``: the console, metrics, health)."""
        return list(self.workers.values())

    def not_current(self) -> list[str]:
        """Hosts whose state the engine does not currently see (shown as unknown)."""
        return sorted(name for name, worker in self.workers.items() if not worker.current)

    def unreachable(self) -> list[str]:
        """Hosts that should answer and do not (yet): the partial-result list."""
        return sorted(name for name, worker in self.workers.items()
                      if worker.status in (HostStatus.CONNECTING, HostStatus.NON_RESPONSIVE))

    # -- change notifications (waitJob, the console) ---------------------------------------

    def notify(self, kind: str, host: str, key: str | None = None) -> None:
        """Tell the listeners that something the views show changed (never blocks:
        a listener only takes note)."""
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
