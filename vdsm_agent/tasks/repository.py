"""Task rows in the store. Every function here runs on the store's DB thread
(``await store.run(fn, ...)``), never on the event loop.

Writes that must survive a power loss (a new task, a final state, a delete)
go through the store's durable connection (``StoreDatabase.durable``,
synchronous=FULL); heartbeat-level updates use its main connection (WAL +
NORMAL: safe against a crash of the agent, not of the host).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import peewee

from vdsm_agent.store.models import TaskRow
from vdsm_agent.tasks.record import TaskRecord, from_row, to_row
from vdsm_agent.tasks.states import FINAL, UNFINISHED, State

# The hot statements (one task by ID, insert, update) as plain SQL built once:
# peewee spends ~0.5 ms generating SQL for a 21-column query, sqlite ~20 µs
# running it.
_COLUMNS = [field.name for field in dataclasses.fields(TaskRecord)]
_SELECT_ONE = f"SELECT {', '.join(_COLUMNS)} FROM task WHERE id = ?"
_SELECT_ALL = f"SELECT {', '.join(_COLUMNS)} FROM task"
_SELECT_MANY = f"{_SELECT_ALL} WHERE id IN"
_MAX_VARIABLES = 500  # sqlite's limit on bound values is 999 on older builds
_INSERT = (f"INSERT INTO task ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' for _ in _COLUMNS)})")
# A new task: an ID stored already is left alone (the caller is told what is stored).
_INSERT_NEW = f"{_INSERT} ON CONFLICT (id) DO NOTHING"
_UPDATE = (f"UPDATE task SET {', '.join(f'{c} = ?' for c in _COLUMNS if c != 'id')} "
           "WHERE id = ? AND state = ?")


def _db() -> Any:
    # peewee's Database is only partly typed; treat it as Any here.
    return cast(Any, TaskRow._meta.database)


def _records(query: peewee.Query) -> list[TaskRecord]:
    return [from_row(row) for row in query.dicts()]


def _values(record: TaskRecord) -> list[Any]:
    row = to_row(record)
    return [row[column] for column in _COLUMNS]


def insert_new(records: Sequence[TaskRecord]) -> dict[str, TaskRecord]:
    """Insert the records whose ID is not stored yet, in one durable transaction;
    return the stored records of the IDs that were (they are not written).

    This is every startTask's write, so it is lean: sqlite3 directly, on the
    store's durable connection (``StoreDatabase.durable``), a lone record in
    one statement (its own transaction), a batch in one explicit transaction.
    The store is asked what it held under the IDs only when fewer rows than
    records were written: a retried submit, or an ID taken by another request."""
    rows = [_values(record) for record in records]
    if len(rows) == 1:
        written = _durable_connection().execute(_INSERT_NEW, rows[0]).rowcount
    else:
        with _durable_transaction() as connection:
            written = connection.executemany(_INSERT_NEW, rows).rowcount
    if written == len(rows):
        return {}
    return _stored_before(_durable_connection(), records)


def _stored_before(connection: sqlite3.Connection,
                   records: Sequence[TaskRecord]) -> dict[str, TaskRecord]:
    """The stored rows under the IDs of ``records`` that are not theirs (they
    were there before ``insert_new`` wrote the others). A row is a record's own
    when it has its creation time and request: to the microsecond, only that
    submit could have written it, as another submit of the same ID is held
    back in memory until this one is committed (``Admission._twin``)."""
    offered = {record.id: record for record in records}
    ids = list(offered)
    known: dict[str, TaskRecord] = {}
    for chunk in peewee.chunked(ids, _MAX_VARIABLES):
        rows = connection.execute(
            f"{_SELECT_MANY} ({', '.join('?' for _ in chunk)})", chunk).fetchall()
        for row in rows:
            stored = from_row(dict(zip(_COLUMNS, row, strict=True)))
            mine = offered[stored.id]
            if (stored.created_at, stored.request_hash) != (mine.created_at, mine.request_hash):
                known[stored.id] = stored
    return known


def _durable_connection() -> sqlite3.Connection:
    connection = _db().durable
    if connection is None:
        raise RuntimeError("the store has no durable connection (not a Store, or closed)")
    return cast(sqlite3.Connection, connection)


@contextlib.contextmanager
def _durable_transaction() -> Iterator[sqlite3.Connection]:
    """One transaction on the store's durable connection (synchronous=FULL: once
    committed, it survives a power loss). A lone statement needs none: on that
    connection it is its own durable transaction."""
    connection = _durable_connection()
    connection.execute("BEGIN")
    try:
        yield connection
    except BaseException:
        # sqlite may have rolled back already (it does on SQLITE_FULL): a second
        # ROLLBACK would fail and hide the error that matters.
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise
    try:
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            connection.execute("ROLLBACK")
        raise


def update(task_id: str, expected: State, record: TaskRecord, durable: bool) -> bool:
    """Write ``record`` if the stored state is still ``expected``; False otherwise."""
    values = [*_values(record)[1:], task_id, str(expected)]
    assert _COLUMNS[0] == "id"

    if durable:
        return bool(_durable_connection().execute(_UPDATE, values).rowcount)
    return bool(_db().execute_sql(_UPDATE, values).rowcount)


def get(task_id: str) -> TaskRecord | None:
    row = _db().execute_sql(_SELECT_ONE, (task_id,)).fetchone()
    return from_row(dict(zip(_COLUMNS, row, strict=True))) if row else None


def load_unfinished() -> list[TaskRecord]:
    query = (TaskRow.select()
             .where(TaskRow.state.in_([str(state) for state in UNFINISHED]))
             .order_by(TaskRow.created_at, TaskRow.id))
    return _records(query)


@dataclasses.dataclass(frozen=True)
class ListFilter:
    states: tuple[State, ...] = ()
    kind: str | None = None
    created_after: float | None = None
    created_before: float | None = None


def list_page(where: ListFilter, after: tuple[float, str] | None, limit: int) -> list[TaskRecord]:
    """Tasks in (created_at, id) order, after the keyset position ``after``.

    Plain SQL like the other hot statements: every engine resync lists each
    host's tasks, and peewee's query builder cost more than sqlite's answer."""
    conditions: list[str] = []
    values: list[Any] = []
    if where.states:
        conditions.append(f"state IN ({', '.join('?' for _ in where.states)})")
        values += [str(state) for state in where.states]
    if where.kind is not None:
        conditions.append("kind = ?")
        values.append(where.kind)
    if where.created_after is not None:
        conditions.append("created_at > ?")
        values.append(where.created_after)
    if where.created_before is not None:
        conditions.append("created_at < ?")
        values.append(where.created_before)
    if after is not None:
        conditions.append("(created_at > ? OR (created_at = ? AND id > ?))")
        values += [after[0], after[0], after[1]]
    where_sql = f" WHERE {' AND '.join(conditions)}" if conditions else ""
    rows = _db().connection().execute(
        f"{_SELECT_ALL}{where_sql} ORDER BY created_at, id LIMIT ?", [*values, limit])
    return [from_row(dict(zip(_COLUMNS, row, strict=True))) for row in rows.fetchall()]


def delete(task_id: str) -> bool:
    """Delete a final task; False if it is missing or not final."""
    return delete_many([task_id]) == 1


def delete_many(task_ids: Sequence[str]) -> int:
    """Delete the final tasks among ``task_ids``, durably; how many were."""
    finals = [str(state) for state in FINAL]
    count = 0
    with _durable_transaction() as connection:
        for chunk in peewee.chunked(task_ids, _MAX_VARIABLES):
            count += connection.execute(
                f"DELETE FROM task WHERE id IN ({', '.join('?' for _ in chunk)}) "
                f"AND state IN ({', '.join('?' for _ in finals)})", [*chunk, *finals]).rowcount
    return count


def _ids(query: peewee.Query) -> list[str]:
    return [row[0] for row in query.tuples()]


def expired(now: float, retention: dict[State, float], max_finished: int) -> list[str]:
    """Final tasks due for removal: past their state's retention, then over the count cap.

    The cap removes the oldest done/canceled tasks first, then failed/interrupted
    ones (they are kept longer for debugging); unfinished tasks are never counted
    or removed.
    """
    doomed: list[str] = []
    for state, keep in retention.items():
        doomed += _ids(TaskRow.select(TaskRow.id)
                       .where((TaskRow.state == str(state)) & (TaskRow.ended_at < now - keep)))
    finals = [str(state) for state in FINAL]
    remaining = (TaskRow.select(peewee.fn.COUNT(TaskRow.id))
                 .where(TaskRow.state.in_(finals)).scalar() or 0) - len(doomed)
    excess = remaining - max_finished
    if excess > 0:
        gone = set(doomed)
        for group in _cap_order(retention):
            if excess <= 0:
                break
            candidates = _ids(TaskRow.select(TaskRow.id)
                              .where(TaskRow.state.in_(group))
                              .order_by(TaskRow.ended_at, TaskRow.id)
                              .limit(excess + len(gone)))
            for task_id in candidates:
                if excess <= 0:
                    break
                if task_id not in gone:
                    gone.add(task_id)
                    doomed.append(task_id)
                    excess -= 1
    return doomed


def _cap_order(retention: dict[State, float]) -> Iterable[list[str]]:
    """State groups in the order the count cap removes them: shortest retention first."""
    by_keep: dict[float, list[str]] = {}
    for state, keep in retention.items():
        by_keep.setdefault(keep, []).append(str(state))
    return [by_keep[keep] for keep in sorted(by_keep)]


def insert_many(records: Sequence[TaskRecord]) -> None:
    """Bulk insert (benchmarks and tests)."""
    with _durable_transaction() as connection:
        connection.executemany(_INSERT, [_values(record) for record in records])

