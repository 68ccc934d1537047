"""Several engines on one PostgreSQL: the hosts other engines poll, seen from here.

* ``Peers.hosts``: every host this engine holds no live lease on, as the
  engine that polls it last wrote its row (status, last error, agent version),
  and whether anyone holds a live lease on it (without one, nobody polls it:
  nothing of it is current). Read whole every ``lease_time / 3`` and, for the
  hosts named, at each relayed change: the partial-result lists
  (``unreachableHosts``, the unknown state of a task) and the console cover
  every host, not only this engine's.
* The console's changes relayed between engines: a change of a host leased
  here (its status, a task, a connection; ``Engine.notify``) is gathered for
  ``RELAY_INTERVAL`` and sent on the engines' NOTIFY channel as
  ``changes ENGINE-ID [[kind, host, key], ...]`` (a set: a key that changed ten times is
  sent once; each payload under PostgreSQL's 8000 bytes; past
  ``MAX_PAYLOADS`` payloads in one round, ``changes *``: every page reloads).
  So 5,000 hosts' events are a few NOTIFYs a second, not 5,000. The other
  engines read those hosts' rows again, then tell their console's pages.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable

import orjson

from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store import EngineStore
from vdsm_agent.engine.store import leases as store_leases

log = logging.getLogger(__name__)

RELAY_INTERVAL = 0.1  # seconds a burst of changes is gathered before it is sent
MAX_PAYLOADS = 10  # NOTIFYs of one round; more: ``changes *``
RELAYED = frozenset({"host", "task", "connection", "resync"})
PREFIX = "changes "
RELOAD = ("reload", "", None)  # the console's "reload the page" (console/bus.py)

Publish = Callable[[str, str, str | None], None]


@dataclasses.dataclass(frozen=True)
class PeerView:
    """A host another engine polls (``ports.HostView``): what that engine wrote."""

    name: str
    url: str
    status: HostStatus
    current: bool
    maintenance: bool
    last_seen: float | None
    last_error: str | None
    failures: int
    agent_version: str | None
    synced_at: float | None
    events_supported: bool | None
    live: bool  # a live lease is held on it (someone polls it)

    @classmethod
    def of(cls, row: store_leases.PeerHost) -> PeerView:
        status = HostStatus.MAINTENANCE if row.maintenance else HostStatus(row.status)
        return cls(row.name, row.url, status, row.live and status == HostStatus.UP,
                   row.maintenance, row.last_seen, row.last_error, row.failures,
                   row.agent_version, row.synced_at, None, row.live)

    @property
    def unreachable(self) -> bool:
        """Should answer and does not (or nobody polls it)."""
        return not self.maintenance and (not self.live or self.status in (
            HostStatus.CONNECTING, HostStatus.NON_RESPONSIVE))


def payloads(sender: str, keys: list[tuple[str, str, str | None]]) -> list[str]:
    """``changes SENDER [...]`` payloads of these keys, each under PostgreSQL's limit."""
    prefix = f"{PREFIX}{sender} "
    chunks: list[str] = []
    items: list[bytes] = []
    size = len(prefix) + 2
    for key in keys:
        item = orjson.dumps(list(key))
        if items and size + len(item) + 1 > store_leases.MAX_PAYLOAD:
            chunks.append(prefix + "[" + b",".join(items).decode() + "]")
            items, size = [], len(prefix) + 2
        items.append(item)
        size += len(item) + 1
    if items:
        chunks.append(prefix + "[" + b",".join(items).decode() + "]")
    return chunks


class Peers:
    """What this engine knows of the other engines' hosts, and the relay of changes."""

    def __init__(self, store: EngineStore, engine_id: Callable[[], str],
                 publish: Publish) -> None:
        self.store = store
        self.engine_id = engine_id
        self.publish = publish
        self.hosts: dict[str, PeerView] = {}
        self._pending: dict[tuple[str, str, str | None], None] = {}  # ordered set
        self._wake = asyncio.Event()
        self.sent = 0  # NOTIFYs sent (tests, docs)

    async def refresh(self, names: list[str] | None = None) -> None:
        """Read the hosts' rows again (all of them, or these)."""
        rows = await self.store.run(store_leases.peer_hosts, self.engine_id(), names)
        found = {row.name: PeerView.of(row) for row in rows}
        if names is None:
            self.hosts = found
            return
        for name in names:  # not found: leased here now, or removed
            if name in found:
                self.hosts[name] = found[name]
            else:
                self.hosts.pop(name, None)

    async def refresh_loop(self, interval: float) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(interval)

    # -- out: changes of the hosts leased here ---------------------------------------------

    def offer(self, kind: str, host: str, key: str | None) -> None:
        if kind in RELAYED:
            self._pending[(kind, host, key)] = None
            self._wake.set()

    async def relay_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(RELAY_INTERVAL)  # gather the burst
            keys, self._pending = list(self._pending), {}
            self._wake.clear()
            sent = payloads(self.engine_id(), keys)
            if len(sent) > MAX_PAYLOADS:
                sent = [f"{PREFIX}{self.engine_id()} *"]
            await self.store.run(store_leases.notify_changes, sent)
            self.sent += len(sent)

    # -- in: another engine's changes ------------------------------------------------------

    async def reread(self) -> None:
        """Anything may have changed (too many changes to name, or the listener
        reconnected and missed some): every row read again, every page reloads."""
        await self.refresh()
        self.publish(*RELOAD)

    async def received(self, body: str) -> None:
        """``SENDER [...]`` (or ``SENDER *``) from another engine: its hosts' rows read
        again, then the console's pages told (this engine's own: already told)."""
        sender, _, body = body.partition(" ")
        if sender == self.engine_id():
            return
        if body == "*":
            await self.reread()
            return
        try:
            keys = [(str(kind), str(host), None if key is None else str(key))
                    for kind, host, key in orjson.loads(body)]
        except (orjson.JSONDecodeError, TypeError, ValueError):
            log.warning("ignored a malformed change notification: %.200s", body)
            return
        await self.refresh(sorted({host for _, host, _ in keys}))
        for key in keys:
            self.publish(*key)
