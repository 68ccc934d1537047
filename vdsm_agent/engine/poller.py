"""One worker per host: what the engine learns of it, and its status.

Each host has its own asyncio tasks, its own ``AgentClient`` (connection pool)
and its own timeouts, so a slow, frozen or dead host never delays another:

* the **events loop** long-polls the agent's ``getEvents`` and applies task
  and connection events as they come (within a second); on first contact and
  after every gap (the agent restarted, or the engine fell behind its bound)
  it takes the feed's position and asks for a full resynchronisation
  (``hostfeed.HostFeed``);
* the **sync loop** does the full resynchronisation (every page of
  ``listTasks`` and ``getStorageConnectionList``) every ``resync_interval``
  (each time drawn within ±25% of it, so that the hosts of an engine that
  started them together drift apart and do not resync in one burst), at
  once when asked, and every ``poll_interval`` for an agent without an
  events feed. A resync is *conditional*: each list verb is passed the
  ``changeToken`` of its last answer as ``changedSince``, and a host where
  nothing changed answers "not modified" for almost nothing (an agent that
  does not know the parameter is asked without it from then on). A periodic
  resync of a followed host reads on the events loop's kept-alive connection
  (``baton``): the long-poll is timed to end when the resync is due;
* the **steps loop** runs the host's pending job steps (``jobs.StepRunner``)
  when kicked (a new job, the host came back) and after a retry delay while
  any is left.

Every failed call (no answer, refused, timeout) is a failed attempt; after
``unresponsive_after`` in a row the host is non-responsive, and the first
call that succeeds makes it up again (and refreshes its state). A loop whose
call failed waits before trying again: capped exponential backoff with full
jitter (``common.backoff``, the connection monitors' policy) from
``retry_interval`` up to ``retry_max``, so that hosts that lost the engine
together are not retried in lock-step. Each loop runs under
``common.supervision``: a bug in one round is logged and the loop restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from typing import Any

import orjson

from vdsm_agent.common.backoff import Backoff
from vdsm_agent.common.clock import now
from vdsm_agent.common.supervision import Background
from vdsm_agent.engine.agentclient import (
    AgentClient,
    AgentError,
    AgentUnreachable,
    tls_context_of,
)
from vdsm_agent.engine.hostfeed import HostFeed
from vdsm_agent.engine.listings import RESYNC_SPREAD, Listings, resync_turn
from vdsm_agent.engine.ports import HostContext
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import repository
from vdsm_agent.engine.store.models import HostRow

log = logging.getLogger(__name__)

PERSIST_EVERY = 30.0  # seconds between writes of a host's lastSeen/syncedAt at resync


class HostWorker:
    """Learns one host's state and runs its steps; ``start``/``stop`` it."""

    def __init__(self, engine: HostContext, row: HostRow) -> None:
        self.engine = engine
        self.config = engine.config
        self.name: str = row.name
        self.url: str = row.url
        self.tls = (row.ca_file, row.cert_file, row.key_file)
        self.maintenance: bool = bool(row.maintenance)
        self.status = HostStatus.MAINTENANCE if self.maintenance else HostStatus.CONNECTING
        self.failures = 0
        self.last_seen: float | None = row.last_seen
        self.last_error: str | None = row.last_error
        self.agent_version: str | None = row.agent_version
        self.synced_at: float | None = row.synced_at
        self.feed = HostFeed(self)
        self.client: AgentClient | None = None
        self._loops = Background(f"host {self.name}", log)
        self._backoff = Backoff(base=self.config.retry_interval, cap=self.config.retry_max,
                                floor=min(self.config.retry_interval, self.config.retry_max))
        self._rng = random.Random()
        self._resync = asyncio.Event()
        # The events loop holds it over each long-poll and what it applies; the
        # periodic resync takes it between two, so both use one kept-alive
        # connection (each resync opened and closed its own: ~0.5 ms of CPU).
        self.baton = asyncio.Lock()
        self.resync_due: float | None = None  # loop time of the next periodic resync
        self._kick = asyncio.Event()
        self._status_lock = asyncio.Lock()
        self.need_version = True  # ask the agent's version at the next resync
        self._persisted_version: str | None = row.agent_version
        self._persisted_at: float | None = None
        self._snapshot_digest: bytes | None = None
        self._changes = 0
        self._fed = 0  # events applied (they keep the change tokens, not the digest)
        self.listings = Listings(self.name, self.call)  # their change tokens
        self.not_modified = 0  # resyncs that read nothing (tests and benchmarks)
        self._running = False
        # Set after every completed resynchronisation (tests and benchmarks wait on it).
        self.synced = asyncio.Event()
        self.sync_count = 0

    # -- life cycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self.maintenance or self._loops:
            return
        self._running = True
        self.status = HostStatus.CONNECTING
        self.failures = 0
        self.feed.epoch = None
        self.need_version = True
        self.listings.forget()
        for name, loop in (("events loop", self.feed.loop), ("sync loop", self._sync_loop),
                           ("steps loop", self._steps_loop)):
            self._loops.loop(loop, name, restart_delay=self.config.retry_interval)

    async def stop(self) -> None:
        self._running = False
        await self._loops.close()
        if self.client is not None:
            client, self.client = self.client, None
            await client.close()

    async def set_maintenance(self, maintenance: bool) -> None:
        if maintenance == self.maintenance:
            return
        self.maintenance = maintenance
        if maintenance:
            await self.stop()
            self.status = HostStatus.MAINTENANCE
        else:
            await self.start()

    @property
    def events_supported(self) -> bool | None:
        """Whether the host has an events feed (None: not known yet)."""
        return self.feed.supported

    # -- status ---------------------------------------------------------------------------

    @property
    def current(self) -> bool:
        """Whether what the engine knows of the host is current (it answers)."""
        return self.status == HostStatus.UP

    def retry_delay(self) -> float:
        """How long a loop waits after a failed call: jittered, from retry_interval
        (after the first failure in a row) doubling up to retry_max."""
        return self._backoff.delay(self.failures - 1, self._rng)

    async def succeeded(self) -> None:
        self.failures = 0
        self.last_seen = now()
        if self.current:
            return
        async with self._status_lock:
            if self.current or self.maintenance:
                return
            previous = self.status
            self.status = HostStatus.UP
            self.last_error = None
            log.info("host %s is up (was %s)", self.name, previous)
            await self.engine.store.run(
                repository.update_host, self.name, status=self.status.value, failures=0,
                last_seen=self.last_seen, last_error=None)
            self.engine.notify("host", self.name)  # issue 19: other engines' consoles
        if previous == HostStatus.NON_RESPONSIVE:
            self.request_resync()  # its state while we could not see it
        self.kick()

    async def failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = str(exc)
        log.debug("host %s: failed attempt %d: %s", self.name, self.failures, exc)
        if self.failures < self.config.unresponsive_after or self.maintenance:
            return
        async with self._status_lock:
            if self.status == HostStatus.NON_RESPONSIVE or self.maintenance:
                return
            self.status = HostStatus.NON_RESPONSIVE
            log.warning("host %s is non-responsive after %d failed attempts: %s",
                        self.name, self.failures, exc)
            await self.engine.store.run(
                repository.update_host, self.name, status=self.status.value,
                failures=self.failures, last_error=self.last_error)
            self.engine.notify("host", self.name)  # issue 19: other engines' consoles

    async def ensure_client(self) -> AgentClient:
        """The host's client, made on first use (TLS files are read off the loop)."""
        if self.client is None:
            context = await tls_context_of(self.name, self.url, self.tls)
            if self.client is None and self._running:
                self.client = AgentClient(
                    self.url, connect_timeout=self.config.connect_timeout,
                    request_timeout=self.config.request_timeout, ssl_context=context)
        if self.client is None:
            raise AgentUnreachable("the host is not polled (maintenance, or removed)")
        return self.client

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout: float | None = None) -> Any:
        """One call to the agent, counted as a success or a failed attempt."""
        if self.maintenance:
            raise AgentUnreachable("the host is in maintenance (not polled)")
        try:
            client = await self.ensure_client()
        except AgentUnreachable as exc:
            await self.failed(exc)
            raise
        try:
            result = await client.call(method, params, timeout)
        except AgentUnreachable as exc:
            await self.failed(exc)
            raise
        except AgentError:
            await self.succeeded()  # an error answer is an answer
            raise
        await self.succeeded()
        return result

    def spread(self, interval: float) -> float:
        """``interval`` drawn within ±RESYNC_SPREAD of itself (periodic work of hosts
        started together drifts apart)."""
        return interval * (1 + RESYNC_SPREAD * (2 * self._rng.random() - 1))

    def request_resync(self) -> None:
        self._resync.set()

    def kick(self) -> None:
        """Run the pending steps now."""
        self._kick.set()

    # -- full resynchronisation ------------------------------------------------------------

    def changed(self) -> None:
        """Something other than a resync or the events feed wrote what the engine knows
        of this host (a job's step, a refresh): the next resync reads everything."""
        self._changes += 1
        self._snapshot_digest = None
        self.listings.forget()

    def fed(self) -> None:
        """An event of the host's feed was applied. The change tokens stay good: the
        feed brings the changes in order, each one after the listing it follows or
        before one that has it, so what a token's listing and the events after it
        wrote is the host's state (``HostFeed``)."""
        self._fed += 1
        self._snapshot_digest = None

    async def resync(self) -> None:
        """Every task (all pages) and every connection of the host, into the store.

        Each list is asked with its last change token: a list that did not change
        is not read again (``notModified``). A listing identical to the last one
        applied, with no other change since, is already in the store: it costs no
        database work either."""
        started = now()
        changes, fed = self._changes, self._fed
        if self.need_version:
            ping = await self.call("ping")
            self.agent_version = str(ping.get("version")) if isinstance(ping, dict) else None
            self.need_version = False
        # One after the other, on one kept-alive connection: at once, they needed a
        # second one (the long-poll holds the other), opened and closed at every
        # resync — ~15% of the engine's CPU at 2,000 hosts.
        tasks_result, tasks_token = await self.listings.tasks()
        connections, connections_token = await self.listings.connections()
        synced = now()
        if tasks_result is None and connections is None:
            self.not_modified += 1
            self._synced(synced, changes, tasks_token, connections_token)
            return
        digest = None
        if tasks_result is not None and connections is not None:
            digest = hashlib.blake2b(
                orjson.dumps([tasks_result, connections], option=orjson.OPT_SORT_KEYS),
                digest_size=16).digest()
            if digest == self._snapshot_digest and (changes, fed) == (self._changes,
                                                                       self._fed):
                self._synced(synced, changes, tasks_token, connections_token)
                return
        host_fields: dict[str, Any] = {}
        # The in-memory values serve the views; the row keeps them for a restarted
        # engine, written when they change meaning (not at every resync).
        if (self._persisted_version != self.agent_version
                or synced - (self._persisted_at or 0) >= PERSIST_EVERY):
            host_fields = {"synced_at": synced, "last_seen": self.last_seen,
                           "agent_version": self.agent_version}
        try:
            outcome = await self.engine.store.run(
                repository.apply_resync, self.name, tasks_result, connections, started,
                synced, host_fields)
        except BaseException:
            self.listings.forget()  # not applied: read everything next time
            raise
        if host_fields:
            self._persisted_version = self.agent_version
            self._persisted_at = synced
        if digest is not None and (changes, fed) == (self._changes, self._fed):
            self._snapshot_digest = digest
        self.engine.jobs_changed(outcome.jobs)
        self._synced(synced, changes, tasks_token, connections_token)
        if outcome.inserted or outcome.updated or outcome.deleted or outcome.connections:
            log.debug("host %s resynchronised: %d new, %d changed, %d gone tasks; "
                      "%d connections changed", self.name, outcome.inserted, outcome.updated,
                      outcome.deleted, outcome.connections)

    def _synced(self, synced: float, changes: int, tasks_token: str | None,
                connections_token: str | None) -> None:
        """A resync is done: keep its tokens unless something other than the feed
        wrote the host's state meanwhile (then the next one reads everything)."""
        if changes == self._changes:
            self.listings.keep(tasks_token, connections_token)
        else:
            self.listings.forget()
        self.synced_at = synced
        self.sync_count += 1
        self.synced.set()

    async def _sync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        periodic = False
        while True:
            self._resync.clear()
            stats = self.engine.stats
            began = time.monotonic()
            try:
                # A periodic resync of a followed host waits for the events loop's
                # connection between two long-polls; an asked one (a gap, the host
                # came back) goes at once.
                async with resync_turn(self.engine, self.baton,
                                       periodic and self.feed.supported is True):
                    began = time.monotonic()
                    await self.resync()
                stats.resyncs.observe(time.monotonic() - began)
                interval = (self.config.resync_interval if self.feed.supported is not False
                            else min(self.config.poll_interval, self.config.resync_interval))
                delay = self.spread(interval)
            except AgentUnreachable:
                stats.resync_failures += 1
                delay = self.retry_delay()
            except AgentError as exc:
                stats.resync_failures += 1
                log.warning("host %s: resynchronisation refused: %s", self.name, exc)
                delay = self.retry_delay()
            self.resync_due = loop.time() + delay
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._resync.wait()
            periodic = not self._resync.is_set()
            self.resync_due = None

    # -- steps ---------------------------------------------------------------------------

    async def _steps_loop(self) -> None:
        runner = self.engine.steps
        while True:
            self._kick.clear()
            left = await runner.run_pending(self)
            # Spread like the resyncs: 5,000 workers started together looked for
            # pending steps in the same second every minute, and that burst of
            # queries queued the events' writes behind it for ~0.6 s.
            timeout = self.retry_delay() if left else self.spread(self.config.resync_interval)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
