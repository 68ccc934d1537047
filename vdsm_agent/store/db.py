"""The store: one database connection owned by one thread.

Every database access is a plain function submitted with ``await
store.run(fn, ...)``; it runs on the DB thread and holds its whole
transaction, so the event loop never waits on sqlite (measurements in
shared/reference/libs-and-baseline.md §3: a multi-thread pool gave 84 ms p99
under FULL sync through write-lock contention; one thread gave < 1 ms loop lag).

``DatabaseThread`` is that machinery, shared with the engine's store
(``vdsm_agent.engine.store.db``): a subclass gives its database factory, its
models' proxy and its migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import peewee

from vdsm_agent import errors
from vdsm_agent.store import migrations
from vdsm_agent.store.models import database_proxy
from vdsm_agent.system.space import LOW_WATER, StateSpace, is_no_space

log = logging.getLogger(__name__)
T = TypeVar("T")

PRAGMAS = {
    "journal_mode": "wal",
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 5000,
}
# sqlite's I/O errors that a lack of space may cause (it calls only a failed
# write with ENOSPC SQLITE_FULL; EDQUOT, and growing its -shm file, show up as
# these): taken for StorageFull when the filesystem is indeed (nearly) full.
_SPACE_IOERRS = frozenset({sqlite3.SQLITE_IOERR_WRITE, sqlite3.SQLITE_IOERR_FSYNC,
                           sqlite3.SQLITE_IOERR_SHMSIZE, sqlite3.SQLITE_IOERR_TRUNCATE})


class StoreClosed(RuntimeError):
    """The store was used after ``close``."""


@dataclasses.dataclass(frozen=True)
class _Call:
    """One function for the DB thread, and where its result goes."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    fn: Callable[[], Any]

    def settle(self, result: Any, error: BaseException | None) -> None:
        """From the DB thread: hand the outcome to the caller's loop."""
        try:
            self.loop.call_soon_threadsafe(_settle, self.future, result, error)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class DatabaseThread:
    """One peewee database on one DB thread: ``run``, ``atomic``, ``close``.

    Subclasses set ``proxy`` (their models' ``DatabaseProxy``),
    ``thread_name_prefix`` and ``logger``, and give ``_make_database``,
    ``_migrate`` and ``_describe``.
    """

    proxy: peewee.DatabaseProxy
    thread_name_prefix = "vdsm-db"
    logger = log

    def __init__(self) -> None:
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=f"{self.thread_name_prefix}_0",
                                        daemon=True)
        self._thread.start()
        self._closed = False
        self._db: peewee.Database | None = None
        self._thread_id: int | None = None

    def _make_database(self) -> peewee.Database:
        """A new, unconnected database (called on the DB thread)."""
        raise NotImplementedError

    def _migrate(self, db: peewee.Database) -> list[int]:
        """Apply the pending migrations; the versions applied."""
        raise NotImplementedError

    def _describe(self) -> str:
        """What to call this store in the log."""
        raise NotImplementedError

    async def _open(self) -> None:
        try:
            await self.run(self._open_on_thread)
        except BaseException:
            self._stop_thread()
            raise

    def _open_on_thread(self) -> None:
        self._thread_id = threading.get_ident()
        self._db = self._make_database()
        self.proxy.initialize(self._db)
        self._db.connect()
        applied = self._migrate(self._db)
        if applied:
            self.logger.info("%s migrated to schema version %s", self._describe(), applied[-1])

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on the DB thread; subclasses may wrap it (reconnects)."""
        return fn(*args, **kwargs)

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the DB thread and return its result.

        Like ``run_in_executor`` on a one-thread pool, including that a call
        whose caller was cancelled before it started is skipped, at a quarter
        of the cost per call (a C queue and one ``call_soon_threadsafe``, not
        concurrent.futures' conditions and chained futures): ~30 against ~110 µs
        of CPU per call, paid by every startTask (docs/benchmarks.md)."""
        if self._closed:
            raise StoreClosed("the store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put(_Call(loop, future, functools.partial(self._call, fn, *args, **kwargs)))
        return await future

    def _serve(self) -> None:
        """The DB thread: run the calls in order until the None that ``close`` sends."""
        while (call := self._calls.get()) is not None:
            if call.future.cancelled():
                continue  # its caller went away before it started
            try:
                result = call.fn()
            except BaseException as exc:  # handed to the caller, as an executor does
                call.settle(None, exc)
            else:
                call.settle(result, None)

    def _stop_thread(self) -> None:
        self._closed = True
        self._calls.put(None)
        self._thread.join()

    def atomic(self) -> Any:
        """A transaction context for use inside a function given to ``run``."""
        assert self._db is not None
        assert threading.get_ident() == self._thread_id, "atomic() outside the DB thread"
        return self._db.atomic()

    async def close(self) -> None:
        if self._closed:
            return
        if self._db is not None:
            db = self._db
            await self.run(db.close)
            self._db = None
        self._stop_thread()  # idle by now: the join is immediate


class StoreDatabase(peewee.SqliteDatabase):
    """The agent's sqlite database, plus a second connection for the writes that
    must survive a power loss (``durable``, synchronous=FULL; the store's own
    connection commits with NORMAL: safe against a crash of the agent, not of
    the host).

    Why a second connection: a durable write on the first had to switch it to
    FULL and back around its transaction, five statements where one does (a
    lone startTask's insert), and each sqlite call gives up the GIL and must
    take it back from a busy event loop (docs/benchmarks.md, "Tasks")."""

    durable: sqlite3.Connection | None = None

    def open_durable(self) -> None:
        """Open ``durable`` (on the DB thread, after the migrations)."""
        connection = sqlite3.connect(self.database, isolation_level=None,
                                     check_same_thread=True)
        for pragma in ("synchronous=FULL", "foreign_keys=1",
                       f"busy_timeout={PRAGMAS['busy_timeout']}"):
            connection.execute(f"PRAGMA {pragma}")
        self.durable = connection

    def close(self) -> bool:
        if self.durable is not None:
            self.durable.close()
            self.durable = None
        return bool(super().close())


class Store(DatabaseThread):
    """The agent's store: sqlite (WAL) at ``path``.

    A call that fails for lack of space in the store's directory raises
    ``errors.StorageFull`` (nothing was written) and tells ``space`` (which
    gives its reserve back, so that task ends can still be recorded:
    ``vdsm_agent.system.space``)."""

    proxy = database_proxy

    def __init__(self, path: Path, space_reserve: int = 0) -> None:
        self.path = path
        self.space = StateSpace(path.parent, space_reserve)
        super().__init__()

    @classmethod
    async def open(cls, path: Path, space_reserve: int = 0) -> Store:
        """Open (and migrate) the store; keep ``space_reserve`` bytes in reserve in
        its directory while it has room."""
        store = cls(path, space_reserve)
        await store._open()
        return store

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return fn(*args, **kwargs)
        except (sqlite3.Error, peewee.PeeweeException, OSError) as exc:
            if not self._lacks_space(exc):
                raise
            self.space.note_full(f"the store: {exc}")
            raise errors.StorageFull(f"cannot write the store {self.path}: {exc}",
                                     stateDir=str(self.path.parent)) from exc

    def _lacks_space(self, exc: BaseException) -> bool:
        """Whether a store error comes from a full filesystem (peewee wraps
        sqlite's errors: the original is its first argument)."""
        for candidate in (exc, exc.__cause__, exc.__context__, *exc.args[:1]):
            if isinstance(candidate, sqlite3.Error):
                code = getattr(candidate, "sqlite_errorcode", None)
                if code is None:
                    return "database or disk is full" in str(candidate)
                if code & 0xFF == sqlite3.SQLITE_FULL:
                    return True
                if code in _SPACE_IOERRS:
                    with contextlib.suppress(OSError):
                        return self.space.available() < LOW_WATER
                return False
            if isinstance(candidate, OSError):
                return is_no_space(candidate)
        return False

    def _make_database(self) -> peewee.Database:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return StoreDatabase(str(self.path), pragmas=PRAGMAS, check_same_thread=True)

    def _open_on_thread(self) -> None:
        # First: on a full filesystem this gives the reserve back, which is the
        # room sqlite needs to open (its -wal and -shm files) and record ends.
        self.space.check()
        super()._open_on_thread()
        assert isinstance(self._db, StoreDatabase)
        self._db.open_durable()

    def _migrate(self, db: peewee.Database) -> list[int]:
        return migrations.migrate(db)

    def _describe(self) -> str:
        return f"store {self.path}"
