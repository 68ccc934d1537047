"""The engine's store: one database connection owned by one thread.

The agent's ``vdsm_agent.store.db.DatabaseThread``: every database
access is a plain function submitted with ``await store.run(fn, ...)``; it
runs on the DB thread and holds its whole transaction, so the event loop never
waits on the database. The database comes from a URL: sqlite (WAL) by
default, PostgreSQL (psycopg2) when configured.
"""

from __future__ import annotations

import contextvars
import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import peewee
from playhouse import db_url

from vdsm_agent.engine.settings import redact_url
from vdsm_agent.engine.store import leases, migrations
from vdsm_agent.engine.store.models import engine_proxy
from vdsm_agent.store.db import DatabaseThread, StoreClosed

__all__ = ["FENCE", "EngineStore", "StoreClosed", "make_database"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
}
# A PostgreSQL server that does not answer must not hang the DB thread forever.
PG_CONNECT_TIMEOUT = 10

# The fence of the host worker whose task calls ``run`` (set when its loops are
# started: ``engine.leases.LeasedWorker``): every call it makes, write or read,
# runs in one transaction with the lease's check (``store.leases.fenced``).
FENCE: contextvars.ContextVar[leases.Fence | None] = contextvars.ContextVar(
    "engine_fence", default=None)


def make_database(url: str) -> peewee.Database:
    """An unconnected peewee database for a ``sqlite:`` or ``postgresql:`` URL."""
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "sqlite":
        database = db_url.connect(url, pragmas=SQLITE_PRAGMAS, check_same_thread=True)
        Path(database.database).parent.mkdir(parents=True, exist_ok=True)
        return database  # type: ignore[no-any-return]
    if scheme in ("postgresql", "postgres"):
        # unquote: a password may hold URL-escaped characters (%40 for @).
        return db_url.connect(  # type: ignore[no-any-return]
            url, unquote_password=True, unquote_user=True,
            connect_timeout=PG_CONNECT_TIMEOUT)
    raise ValueError(f"unsupported database URL scheme {scheme!r}")


class EngineStore(DatabaseThread):
    proxy = engine_proxy
    thread_name_prefix = "engine-db"
    logger = log

    def __init__(self, url: str) -> None:
        self.url = url
        self.kind = "sqlite" if url.startswith("sqlite:") else "postgresql"
        self._lost: set[leases.Fence] = set()  # fences refused (logged once each)
        super().__init__()

    @classmethod
    async def open(cls, url: str) -> EngineStore:
        store = cls(url)
        await store._open()
        return store

    def _make_database(self) -> peewee.Database:
        return make_database(self.url)

    # Told (on the event loop) of a fenced call refused: the engine stops that worker.
    lease_lost: Callable[[leases.Fence], None] | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``DatabaseThread.run``, fenced for a leased host's worker (``FENCE``)."""
        fence = FENCE.get()
        if fence is None:
            return await super().run(fn, *args, **kwargs)
        try:
            return await super().run(leases.fenced, fence, fn, *args, **kwargs)
        except leases.LeaseLost:
            # Once per lease: each of the worker's loops may hit the fence before it stops.
            if fence not in self._lost:
                self._lost.add(fence)
                log.warning("lease lost for host %s (generation %d): worker stopped",
                            fence.host, fence.generation)
                if self.lease_lost is not None:
                    self.lease_lost(fence)
            raise

    def _migrate(self, db: peewee.Database) -> list[int]:
        return migrations.migrate(db)

    def _describe(self) -> str:
        return f"engine store {redact_url(self.url)}"

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn``; on PostgreSQL, once more on a new connection when the connection
        was lost under it (a server restart, a dropped connection). The lost
        transaction was rolled back by the server unless the connection dropped
        during its COMMIT; the store's writes are safe to run again either way:
        their IDs are chosen before (a job's, its steps': a second insert is a
        conflict, never a duplicate) and their moves check the state first."""
        db = self._db
        if db is not None and db.is_closed() and fn != db.close:
            db.connect()  # PostgreSQL: the connection was dropped; a new one
        try:
            return fn(*args, **kwargs)
        except (peewee.InterfaceError, peewee.OperationalError):
            if db is None or self.kind != "postgresql" or _usable(db) or fn == db.close:
                raise
            log.warning("database connection lost; reconnecting and trying again once")
            try:
                db.close()
            except peewee.PeeweeException:
                pass
        db.connect()  # raises if the server is not back: the next call tries again
        return fn(*args, **kwargs)


def _usable(db: peewee.Database) -> bool:
    try:
        return bool(db.is_connection_usable())
    except Exception:
        return False
