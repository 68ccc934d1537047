"""Following one host's events feed: what changed there, within a second.

The feed is long-polled with ``getEvents``. On first contact, and after
every gap (the agent restarted: another epoch; or the engine fell behind the
feed's bound), only the feed's position is taken and a full
resynchronisation is asked of the host worker (``HostWorker.resync``): what
came before is in it. Task and connection events are applied to the store
as they come; a task new to the engine, or one that ended, is fetched whole
(``getTask``). An agent without the feed (``MethodNotFound``) is polled
instead, and asked again after a while.

Applying events keeps the resync's change tokens good (``HostWorker.fed``):
the feed carries every change of what it reports, in order, so an event
older than a listing is followed by the events up to it, and the store ends
where the host is; a change with no event (a task deleted, retention) moves
the host's token, so the next resync has the list.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from vdsm_agent.common.clock import now
from vdsm_agent.engine.agentclient import METHOD_NOT_FOUND, AgentError, AgentUnreachable
from vdsm_agent.engine.listings import RESYNC_SPREAD
from vdsm_agent.engine.states import TASK_FINAL
from vdsm_agent.engine.store import host_tasks, repository

if TYPE_CHECKING:
    from vdsm_agent.engine.poller import HostWorker

log = logging.getLogger(__name__)

MAX_EVENTS = 1000  # events per getEvents answer
INVALID_PARAMS = -32602


class HostFeed:
    def __init__(self, worker: HostWorker) -> None:
        self.worker = worker
        self.supported: bool | None = None  # whether the host has a feed (None: not known)
        self.epoch: str | None = None  # the feed's epoch; None: take its position first
        self.since = 0  # the last event applied
        # The agent's longest long-poll, once it refused a longer one (its
        # events_max_wait is below the engine's events_timeout).
        self.max_timeout: float | None = None

    async def loop(self) -> None:
        worker = self.worker
        config = worker.config
        while True:
            if self.supported is False:
                # An agent without the feed: probe again after a while (an upgrade
                # restarts it); the sync loop polls meanwhile.
                await asyncio.sleep(max(config.resync_interval, config.poll_interval))
            due = worker.resync_due
            if due is not None and due <= asyncio.get_running_loop().time():
                await asyncio.sleep(0.01)  # the periodic resync's turn: let it take the baton
            async with worker.baton:
                delay = await self._poll()
            if delay:
                await asyncio.sleep(delay)

    def _timeout(self) -> float:
        """The long-poll's timeout: events_timeout (at most the agent's maximum),
        ending when the host's periodic resync is due, so that the resync finds the
        kept-alive connection free (``HostWorker.baton``)."""
        config = self.worker.config
        timeout = config.events_timeout
        if self.max_timeout is not None:
            timeout = min(timeout, self.max_timeout)
        due = self.worker.resync_due
        if due is None:
            # A resync is under way (or about to be): the next is due at least this
            # long after it; the poll after this one ends when it is.
            return min(timeout, config.resync_interval * (1 - RESYNC_SPREAD))
        left = due - asyncio.get_running_loop().time()
        if left > 0:
            timeout = min(timeout, round(left, 3))
        return timeout

    async def _poll(self) -> float:
        """One getEvents and what it brings applied; how long to wait before the next."""
        worker = self.worker
        config = worker.config
        first = self.epoch is None
        params: dict[str, Any] = {"since": self.since, "timeout": self._timeout(),
                                  "maxEvents": MAX_EVENTS}
        if first:
            # Only the feed's position: what came before is in the resync.
            params = {"since": 0, "timeout": 0, "maxEvents": 1}
        else:
            params["epoch"] = self.epoch
        try:
            answer = await worker.call(
                "getEvents", params, timeout=config.request_timeout + params["timeout"])
        except AgentUnreachable:
            return worker.retry_delay()
        except AgentError as exc:
            if exc.code == METHOD_NOT_FOUND:
                if self.supported is not False:
                    log.info("host %s has no events feed; polling every %g s",
                             worker.name, config.poll_interval)
                self.supported = False
                worker.request_resync()
                return 0
            if not first and self._shorter_poll(exc, params["timeout"]):
                return 0
            log.warning("host %s: getEvents refused: %s", worker.name, exc)
            self.epoch = None
            return worker.retry_delay()
        if self.supported is not True:
            self.supported = True
            log.info("host %s: following its events feed", worker.name)
        await self._take(answer, first)
        return 0

    def _shorter_poll(self, exc: AgentError, timeout: float) -> bool:
        """Whether the agent refused the long-poll's length and said its maximum (an
        agent whose events_max_wait is below events_timeout): the polls are that long
        from then on."""
        maximum = exc.data.get("maximum")
        if (exc.code != INVALID_PARAMS or exc.data.get("field") != "params.timeout"
                or not isinstance(maximum, (int, float)) or not 0 < maximum < timeout):
            return False
        log.info("host %s: getEvents long-polls of at most %g s (its limit)",
                 self.worker.name, maximum)
        self.max_timeout = float(maximum)
        return True

    async def _take(self, answer: Mapping[str, Any], first: bool) -> None:
        worker = self.worker
        epoch = str(answer.get("epoch"))
        if first:
            self.epoch = epoch
            self.since = int(answer.get("lastSeq") or 0)
            worker.request_resync()
            return
        gap = bool(answer.get("gap")) or epoch != self.epoch
        self.epoch = epoch
        self.since = int(answer.get("nextSince") or self.since)
        if gap:
            log.info("host %s: gap in its events feed; resynchronising", worker.name)
            worker.need_version = True
            worker.listings.conditional = None  # perhaps another version of the agent
            worker.request_resync()
        for event in answer.get("events") or ():
            try:
                await self._apply(event)
            except AgentUnreachable:
                # The task's details could not be fetched: the resync will have them.
                worker.request_resync()

    async def _apply(self, event: Mapping[str, Any]) -> None:
        worker = self.worker
        store = worker.engine.store
        worker.fed()
        kind = event.get("type")
        if kind == "task" and event.get("taskID"):
            task_id = str(event["taskID"])
            jobs: set[str] | None = None
            if str(event.get("state")) not in TASK_FINAL:
                # A task the engine has: the event is applied in the same DB hop
                # that finds it (None: new to the engine).
                jobs = await store.run(host_tasks.apply_known_task_event, worker.name, event,
                                       now())
            if jobs is None:
                # A task new to the engine, or one that ended: its whole document
                # (params, resources; result, error, warnings), not only its state.
                try:
                    doc = await worker.call("getTask", {"taskID": task_id})
                except AgentError:
                    doc = None  # deleted meanwhile: record what the event says
                if doc is not None:
                    jobs = await store.run(repository.apply_task_doc, worker.name, doc, now())
                else:
                    jobs = await store.run(repository.apply_task_event, worker.name, event,
                                           None, now())
            worker.engine.jobs_changed(jobs)
            worker.engine.notify("task", worker.name, task_id)
        elif kind == "connection":
            unknown = await store.run(repository.apply_connection_event, worker.name, event,
                                      now())
            for connection_id in event.get("connectionIDs") or ():
                worker.engine.notify("connection", worker.name, str(connection_id))
            if unknown:
                worker.request_resync()

