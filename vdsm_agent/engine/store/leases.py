"""Host leases of several engines on one PostgreSQL, and the fence of their writes.

Each engine registers its row (``engines``) at start. Every ``lease_time / 3``
it calls ``tick``: one transaction that renews its heartbeat and ALL its
leases (one UPDATE), gives back what exceeds its fair share
(``hosts // live engines``, one more for the first ``hosts % live engines``
engines by ID: ``fair_share``) and takes expired or unowned leases up to
that share, each taken lease's ``generation`` bumped. Every time is the
database's clock (``now()``), never the engine's: a skewed engine clock cannot
extend a lease.

A worker's write is *fenced* (``fenced``): in the same transaction, the lease
row is read ``FOR SHARE`` and must still be this engine's, with the worker's
generation, unexpired; else ``LeaseLost`` and nothing is written. A takeover
(an UPDATE of that row) waits for the fenced transaction, so a write either
commits while the lease was held or is refused.

sqlite: one engine, no leases (the engine polls every host; these functions
are not called).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

import peewee

from vdsm_agent.common.supervision import LoopEnded
from vdsm_agent.engine.store.models import HostRow, engine_proxy
from vdsm_agent.engine.store.rows import BATCH, atomic

T = TypeVar("T")

DB_NOW = "extract(epoch from now())"
CHANNEL = "vdsm_engine"  # LISTEN/NOTIFY channel of job changes and new steps


class LeaseLost(LoopEnded):
    """A fenced write of a host whose lease this engine no longer holds (with the
    worker's generation): refused, nothing written. The worker's loops end quietly
    (``LoopEnded``): the store logs one line per lost lease."""

    def __init__(self, fence: Fence) -> None:
        super().__init__(f"lease of host {fence.host} lost (generation {fence.generation})")
        self.fence = fence


@dataclasses.dataclass(frozen=True)
class Fence:
    """What a worker's writes carry: its host, its engine and its lease's generation."""

    host: str
    owner: str
    generation: int


@dataclasses.dataclass
class Tick:
    """What one tick left this engine: host -> (generation, maintenance), and what changed."""

    held: dict[str, tuple[int, bool]]
    taken: list[str]
    released: list[str]
    engines: int
    hosts: int


def _sql(sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    cursor = engine_proxy.execute_sql(sql, params)
    return list(cursor.fetchall()) if cursor.description is not None else []


def is_postgresql() -> bool:
    return engine_proxy.obj is not None and "postgres" in type(engine_proxy.obj).__name__.lower()


def register_engine(engine_id: str, name: str, pid: int, version: str, schema: int) -> None:
    with atomic():
        _sql(f"INSERT INTO engines (id, name, pid, version, schema_version, started_at, "
             f"heartbeat_at) VALUES (%s, %s, %s, %s, %s, {DB_NOW}, {DB_NOW})",
             (engine_id, name, pid, version, schema))


def unregister_engine(engine_id: str) -> list[str]:
    """A clean stop: every lease given back (others take them at once), the row gone."""
    with atomic():
        rows = _sql("UPDATE host_leases SET owner = NULL, expires_at = 0 WHERE owner = %s "
                    "RETURNING host", (engine_id,))
        _sql("DELETE FROM engines WHERE id = %s", (engine_id,))
        return sorted(str(host) for (host,) in rows)


def tick(engine_id: str, lease_time: float) -> Tick:
    """Heartbeat, renew, rebalance, take: one transaction (see the module's doc)."""
    with atomic():
        beat = _sql(f"UPDATE engines SET heartbeat_at = {DB_NOW} WHERE id = %s RETURNING id",
                    (engine_id,))
        if not beat:
            raise LookupError(f"engine {engine_id} is not registered")
        renewed = _sql(
            f"UPDATE host_leases AS l SET expires_at = {DB_NOW} + %s FROM host AS h "
            f"WHERE h.name = l.host AND l.owner = %s AND l.expires_at > {DB_NOW} "
            "RETURNING l.host, l.generation, h.maintenance", (lease_time, engine_id))
        held = {str(host): (int(gen), bool(maint)) for host, gen, maint in renewed}
        live = [str(row[0]) for row in _sql(
            f"SELECT id FROM engines WHERE heartbeat_at > {DB_NOW} - %s ORDER BY id",
            (lease_time,))]
        ((hosts,),) = _sql("SELECT count(*) FROM host")
        share = fair_share(int(hosts), live, engine_id)
        engines = len(live)
        released: list[str] = []
        taken: list[str] = []
        if len(held) > share:
            # Give back the surplus (the last by name): engines that joined take it.
            released = sorted(held)[share:]
            _sql("UPDATE host_leases SET owner = NULL, expires_at = 0 "
                 "WHERE owner = %s AND host = ANY(%s)", (engine_id, released))
            for host in released:
                del held[host]
        elif len(held) < share:
            _sql("INSERT INTO host_leases (host, owner, generation, expires_at) "
                 "SELECT name, NULL, 0, 0 FROM host ON CONFLICT (host) DO NOTHING")
            rows = _sql(
                f"UPDATE host_leases AS l SET owner = %s, generation = l.generation + 1, "
                f"expires_at = {DB_NOW} + %s FROM host AS h WHERE h.name = l.host AND l.host IN "
                f"(SELECT host FROM host_leases WHERE owner IS NULL OR expires_at <= {DB_NOW} "
                "ORDER BY random() LIMIT %s FOR UPDATE SKIP LOCKED) "
                "RETURNING l.host, l.generation, h.maintenance",
                (engine_id, lease_time, share - len(held)))
            for host, gen, maint in rows:
                held[str(host)] = (int(gen), bool(maint))
                taken.append(str(host))
        return Tick(held, sorted(taken), released, int(engines), int(hosts))


def fair_share(hosts: int, live: list[str], engine_id: str) -> int:
    """This engine's share: ``hosts // engines``, one more for the first
    ``hosts % engines`` engines by ID, so that the shares add up to the hosts
    (4 hosts on 3 engines: 2, 1, 1) and every engine computes the same split."""
    if engine_id not in live:
        live = sorted([*live, engine_id])
    base, extra = divmod(hosts, len(live))
    return base + (1 if live.index(engine_id) < extra else 0)


def hosts_named(names: list[str]) -> list[HostRow]:
    """These hosts' rows (the hosts an engine just leased; another engine's hosts
    in a view), by name."""
    rows: list[HostRow] = []
    for chunk in peewee.chunked(sorted(names), BATCH):
        rows.extend(HostRow.select().where(HostRow.name.in_(chunk)).order_by(HostRow.name))
    return rows


def check_fence(fence: Fence) -> None:
    """Inside a transaction: the lease is still held with the fence's generation
    (the row locked FOR SHARE until the transaction ends), else ``LeaseLost``."""
    rows = _sql(f"SELECT 1 FROM host_leases WHERE host = %s AND owner = %s AND generation = %s "
                f"AND expires_at > {DB_NOW} FOR SHARE", (fence.host, fence.owner,
                                                         fence.generation))
    if not rows:
        raise LeaseLost(fence)


def fenced(fence: Fence, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn`` in one transaction with the fence's check (``LeaseLost``: nothing written)."""
    with atomic():
        check_fence(fence)
        return fn(*args, **kwargs)


@dataclasses.dataclass(frozen=True)
class EngineInfo:
    id: str
    name: str
    pid: int
    version: str
    schema_version: int
    started_at: float
    heartbeat_at: float
    alive: bool
    hosts: list[str]


def list_engines(lease_time: float) -> list[EngineInfo]:
    """Every registered engine (alive: a heartbeat within lease_time) and its leases."""
    engines = _sql(f"SELECT id, name, pid, version, schema_version, started_at, heartbeat_at, "
                   f"heartbeat_at > {DB_NOW} - %s FROM engines ORDER BY started_at, id",
                   (lease_time,))
    leases = _sql(f"SELECT owner, host FROM host_leases WHERE owner IS NOT NULL "
                  f"AND expires_at > {DB_NOW} ORDER BY host")
    by_owner: dict[str, list[str]] = {}
    for owner, host in leases:
        by_owner.setdefault(str(owner), []).append(str(host))
    return [EngineInfo(str(row[0]), str(row[1]), int(row[2]), str(row[3]), int(row[4]),
                       float(row[5]), float(row[6]), bool(row[7]), by_owner.get(str(row[0]), []))
            for row in engines]


def lease_of(hosts: list[str]) -> dict[str, tuple[str, str | None, int]]:
    """host -> (owner id, owner name, generation) of the hosts' live leases."""
    if not hosts:
        return {}
    rows = _sql(f"SELECT l.host, l.owner, e.name, l.generation FROM host_leases AS l "
                f"LEFT JOIN engines AS e ON e.id = l.owner WHERE l.host = ANY(%s) "
                f"AND l.owner IS NOT NULL AND l.expires_at > {DB_NOW}", (list(hosts),))
    return {str(host): (str(owner), None if name is None else str(name), int(gen))
            for host, owner, name, gen in rows}


# PostgreSQL's limit on a NOTIFY payload is 8000 bytes.
MAX_PAYLOAD = 7900


def notify(payload: str) -> None:
    """NOTIFY the engines' channel in the current transaction (sent at its commit;
    nothing on sqlite, where one engine is all)."""
    if is_postgresql():
        _sql("SELECT pg_notify(%s, %s)", (CHANNEL, payload))


def notify_steps(hosts: list[str]) -> None:
    """New steps for these hosts (``steps *``: too many to name, every host)."""
    payload = "steps " + " ".join(hosts)
    notify(payload if len(payload.encode()) <= MAX_PAYLOAD else "steps *")


@dataclasses.dataclass(frozen=True)
class PeerHost:
    """A host this engine does not lease, as its engine last wrote it (``live``: a
    live lease is held on it; without one nobody polls it and nothing is current)."""

    name: str
    url: str
    status: str
    maintenance: bool
    failures: int
    last_seen: float | None
    last_error: str | None
    agent_version: str | None
    synced_at: float | None
    live: bool


def peer_hosts(engine_id: str, names: list[str] | None = None) -> list[PeerHost]:
    """The hosts (all, or these) that this engine holds no live lease on."""
    where = "" if names is None else "AND h.name = ANY(%s) "
    rows = _sql(
        "SELECT h.name, h.url, h.status, h.maintenance, h.failures, h.last_seen, "
        f"h.last_error, h.agent_version, h.synced_at, l.owner IS NOT NULL AND "
        f"l.expires_at > {DB_NOW} AS live FROM host AS h LEFT JOIN host_leases AS l "
        f"ON l.host = h.name WHERE (l.owner IS DISTINCT FROM %s OR l.expires_at <= {DB_NOW}) "
        + where + "ORDER BY h.name", (engine_id,) if names is None else (engine_id, names))
    return [PeerHost(str(name), str(url), str(status), bool(maint), int(failures or 0),
                     seen, error, version, synced, bool(live))
            for name, url, status, maint, failures, seen, error, version, synced, live in rows]


def notify_changes(payloads: list[str]) -> None:
    """The console's changes of hosts leased here, for the other engines (one
    transaction; each payload under PostgreSQL's limit)."""
    with atomic():
        for payload in payloads:
            notify(payload)
