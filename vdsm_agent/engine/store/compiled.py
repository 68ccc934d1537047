"""The hottest queries of the engine's store, their SQL built once.

peewee builds a query's SQL again at every call, walking its expression tree:
at 2,000 hollow hosts that was about half of the DB thread's CPU, the reads
and writes of every event and every resync (docs/benchmarks.md). A
``Compiled`` query is built by peewee itself (so it follows the models), once
per kind of database, with marks for its arguments; each call binds the real
values to the same SQL. Only queries whose shape does not depend on the
values qualify (no ``IN`` of a list of arguments).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import peewee

from vdsm_agent.engine.store.models import engine_proxy

M = TypeVar("M", bound=peewee.Model)


class _Argument:
    """Where an argument goes in the parameters (a constant stays as it is)."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index


class Compiled:
    """``build(*marks)`` -> a peewee query; its SQL is kept per database class.

    The marks are passed through unconverted (``peewee.Value(converter=False)``),
    and so are the arguments: give values the database takes as they are
    (str, float, int, bool, None), as peewee's own fields would store them."""

    def __init__(self, build: Callable[..., peewee.Query], arity: int) -> None:
        self._build = build
        self._arity = arity
        self._sql: dict[type, tuple[str, tuple[Any, ...]]] = {}

    def _compiled(self, database: peewee.Database) -> tuple[str, tuple[Any, ...]]:
        found = self._sql.get(type(database))
        if found is None:
            marks = [f"\x00mark{index}\x00" for index in range(self._arity)]
            query = self._build(*(peewee.Value(mark, converter=False) for mark in marks))
            sql, params = query.sql()
            slots = tuple(_Argument(marks.index(param)) if param in marks else param
                          for param in params)
            found = self._sql[type(database)] = (sql, slots)
        return found

    def _bind(self, args: Sequence[Any]) -> tuple[peewee.Database, str, list[Any]]:
        if len(args) != self._arity:
            raise TypeError(f"{self._arity} arguments expected, got {len(args)}")
        database = engine_proxy.obj
        sql, slots = self._compiled(database)
        return database, sql, [args[slot.index] if isinstance(slot, _Argument) else slot
                               for slot in slots]

    def execute(self, *args: Any) -> int:
        """An UPDATE, DELETE or INSERT: the rows it changed."""
        database, sql, params = self._bind(args)
        cursor = database.execute_sql(sql, params)  # type: ignore[no-untyped-call]
        return int(database.rows_affected(cursor))  # type: ignore[no-untyped-call]

    def tuples(self, *args: Any) -> list[tuple[Any, ...]]:
        """A SELECT's rows, as the database gives them."""
        database, sql, params = self._bind(args)
        cursor = database.execute_sql(sql, params)  # type: ignore[no-untyped-call]
        return list(cursor.fetchall())

    def rows(self, model: type[M], *args: Any) -> Iterator[M]:
        """A SELECT of ``model``'s columns, as model instances."""
        _, sql, params = self._bind(args)
        return iter(model.raw(sql, *params))

    def first(self, model: type[M], *args: Any) -> M | None:
        return next(self.rows(model, *args), None)
