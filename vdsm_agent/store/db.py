"""The store: one sqlite connection owned by one thread.

Every database access is a plain function submitted with ``await
store.run(fn, ...)``; it runs on the DB thread and holds its whole
transaction, so the event loop never waits on sqlite (measurements in
shared/reference/libs-and-baseline.md §3: a multi-thread pool gave 84 ms p99
under FULL sync through write-lock contention; one thread gave < 1 ms loop lag).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import peewee

from vdsm_agent.store import migrations
from vdsm_agent.store.models import database_proxy

log = logging.getLogger(__name__)
T = TypeVar("T")

PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
}


class StoreClosed(RuntimeError):
    """The store was used after ``close``."""


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="vdsm-db")
        self._db: peewee.SqliteDatabase | None = None
        self._thread_id: int | None = None

    @classmethod
    async def open(cls, path: Path) -> Store:
        store = cls(path)
        await store.run(store._open_on_thread)
        return store

    def _open_on_thread(self) -> None:
        self._thread_id = threading.get_ident()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = peewee.SqliteDatabase(str(self.path), pragmas=PRAGMAS,
                                         check_same_thread=True)
        database_proxy.initialize(self._db)
        self._db.connect()
        applied = migrations.migrate(self._db)
        if applied:
            log.info("store %s migrated to schema version %s", self.path, applied[-1])

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the DB thread and return its result."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, functools.partial(fn, *args, **kwargs))
        except RuntimeError as exc:
            if "shutdown" in str(exc):
                raise StoreClosed("the store is closed") from None
            raise

    def atomic(self) -> Any:
        """A transaction context for use inside a function given to ``run``."""
        assert self._db is not None
        assert threading.get_ident() == self._thread_id, "atomic() outside the DB thread"
        return self._db.atomic()

    async def close(self) -> None:
        if self._db is not None:
            db = self._db
            await self.run(db.close)
            self._db = None
        self._executor.shutdown(wait=True)
