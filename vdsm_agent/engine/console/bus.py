"""The console's in-process change broadcast: what changed, by ID, to each live page.

Sources: ``Engine.notify`` (a task or connection event applied from a host's
feed, a job that moved, a host resynchronised in bulk; with several engines,
the changes of another engine's hosts it relays, ``engine/peers.py``) and a scan of the host
workers' status every ``SCAN_INTERVAL`` while any page listens (a host that
stops answering is non-responsive in the worker first; the scan sees it
within a fifth of a second, without a hook in the poller).

Each subscriber (one SSE stream) keeps a *set* of changed keys, not a queue:
a key that changes ten times before the page is written to is sent once, and
a slow page never makes the engine hold more than one entry per changed ID.
Past ``MAX_PENDING`` keys the page is told to reload instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from vdsm_agent.engine.engine import Engine

log = logging.getLogger(__name__)

Key = tuple[str, str, str | None]  # (kind, host, key): see Engine.notify
SCAN_INTERVAL = 0.2
MAX_PENDING = 20000
RELOAD: Key = ("reload", "", None)


class Subscriber:
    def __init__(self, wants: Callable[[Key], bool]) -> None:
        self.wants = wants
        self.pending: dict[Key, None] = {}  # ordered set
        self.wake = asyncio.Event()

    def offer(self, key: Key) -> None:
        if not self.wants(key):
            return
        if len(self.pending) >= MAX_PENDING:
            self.pending = {RELOAD: None}
        else:
            self.pending[key] = None
        self.wake.set()

    def take(self) -> list[Key]:
        keys, self.pending = list(self.pending), {}
        self.wake.clear()
        return keys


class ChangeBus:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.subscribers: set[Subscriber] = set()
        self._seen: dict[str, tuple[object, ...]] = {}
        self._scanner: asyncio.Task[None] | None = None
        self.closed = False  # set at shutdown: live pages end their streams
        engine.listeners.append(self.publish)

    def publish(self, kind: str, host: str, key: str | None = None) -> None:
        for subscriber in self.subscribers:
            subscriber.offer((kind, host, key))

    def subscribe(self, wants: Callable[[Key], bool]) -> Subscriber:
        subscriber = Subscriber(wants)
        self.subscribers.add(subscriber)
        if self._scanner is None or self._scanner.done():
            self._seen = self._snapshot()
            self._scanner = asyncio.create_task(self._scan(), name="console host scan")
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        self.subscribers.discard(subscriber)

    async def close(self) -> None:
        self.closed = True
        for subscriber in self.subscribers:
            subscriber.wake.set()
        if self.publish in self.engine.listeners:
            self.engine.listeners.remove(self.publish)
        self.subscribers.clear()
        if self._scanner is not None:
            self._scanner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scanner

    def _snapshot(self) -> dict[str, tuple[object, ...]]:
        return {host.name: (host.status, host.maintenance, host.agent_version,
                            host.last_error)
                for host in self.engine.hosts()}

    async def _scan(self) -> None:
        """Host status changes, while anyone listens (5,000 hosts: about a millisecond)."""
        while self.subscribers:
            await asyncio.sleep(SCAN_INTERVAL)
            try:
                now = self._snapshot()
                for name in now.keys() | self._seen.keys():
                    if now.get(name) != self._seen.get(name):
                        self.publish("host", name)
                self._seen = now
            except Exception:  # a bug here must not end the live pages
                log.exception("console host scan")
