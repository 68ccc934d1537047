"""Forward-only schema migrations, applied in order at open.

Each migration is a function of the open database, registered in
``MIGRATIONS`` with the next version number. Never edit a released
migration; add a new one.

A store at a version newer than the code knows (a newer agent used it, and
an older one was installed again) is refused: ``SchemaTooNew``, before
anything reads or writes it (docs/packaging.md, "Upgrades and downgrades").
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import peewee

from vdsm_agent.store.models import Meta, SchemaVersion

Migration = Callable[[peewee.Database], None]


def _initial(db: peewee.Database) -> None:
    db.create_tables([Meta])
    Meta.create(key="instance_id", value=uuid.uuid4().hex)


# Explicit DDL (not TaskRow.create_table) so that later model edits cannot
# change what this released migration does.
_TASK_DDL = (
    """CREATE TABLE task (
        id TEXT NOT NULL PRIMARY KEY,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        request_hash TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        started_at REAL,
        ended_at REAL,
        deadline REAL,
        heartbeat_at REAL,
        progress TEXT,
        result TEXT,
        error TEXT,
        warnings TEXT NOT NULL DEFAULT '[]',
        resources TEXT NOT NULL DEFAULT '[]',
        output_size INTEGER NOT NULL DEFAULT 0,
        output_start INTEGER NOT NULL DEFAULT 0,
        pid INTEGER,
        pid_create_time REAL,
        stop TEXT,
        resets TEXT NOT NULL DEFAULT '[]')""",
    "CREATE INDEX task_created ON task (created_at, id)",
    "CREATE INDEX task_state_created ON task (state, created_at, id)",
    "CREATE INDEX task_kind_created ON task (kind, created_at, id)",
    "CREATE INDEX task_state_ended ON task (state, ended_at)",
)


def _tasks(db: peewee.Database) -> None:
    for statement in _TASK_DDL:
        db.execute_sql(statement)  # type: ignore[no-untyped-call]


_STORAGE_CONNECTION_DDL = (
    """CREATE TABLE storage_connection (
        connection_id TEXT NOT NULL PRIMARY KEY,
        uri TEXT NOT NULL,
        options TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL)""",
)


def _storage_connections(db: peewee.Database) -> None:
    for statement in _STORAGE_CONNECTION_DDL:
        db.execute_sql(statement)  # type: ignore[no-untyped-call]


def _task_launched_by(db: peewee.Database) -> None:
    # NULL for the tasks of earlier agents: they predate the column.
    db.execute_sql("ALTER TABLE task ADD COLUMN launched_by TEXT")  # type: ignore[no-untyped-call]


def _task_external(db: peewee.Database) -> None:
    # NULL: no external reference (every task before the column had none recorded).
    db.execute_sql("ALTER TABLE task ADD COLUMN external TEXT")  # type: ignore[no-untyped-call]


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "initial: meta", _initial),
    (2, "tasks", _tasks),
    (3, "storage connections", _storage_connections),
    (4, "task: the agent version that launched its process", _task_launched_by),
    (5, "task: what it works through outside the agent (a Gluster task ID)", _task_external),
]


class SchemaTooNew(Exception):
    """The store was migrated by newer code than this: refused, untouched."""


def current_version(db: peewee.Database, version_model: Any = SchemaVersion,
                    create_table: Callable[[peewee.Database], None] | None = None) -> int:
    """The highest applied version (0: none), creating the version table if needed."""
    if create_table is None:
        db.create_tables([version_model])
    else:
        create_table(db)
    row = version_model.select(peewee.fn.MAX(version_model.version)).scalar()
    return int(row or 0)


def apply(db: peewee.Database, migrations: list[tuple[int, str, Migration]],
          version_model: Any,
          create_table: Callable[[peewee.Database], None] | None = None) -> list[int]:
    """Apply pending ``migrations``, each in its own transaction with its row in
    ``version_model`` (a SchemaVersion-like model: version, description,
    applied_at; its table made by ``create_table``, else from the model);
    return their versions. Shared with the engine's store."""
    found, known = current_version(db, version_model, create_table), migrations[-1][0]
    if found > known:
        newest = version_model.get(version_model.version == found)
        raise SchemaTooNew(
            f"its schema version is {found} ({newest.description!r}), newer than this "
            f"program knows ({known}): a newer version used it. Install that version "
            "again (downgrading is not supported), or move the state directory aside to "
            "start with an empty one")
    applied = []
    for version, description, migration in migrations:
        if version <= current_version(db, version_model, create_table):
            continue
        with db.atomic():
            migration(db)
            version_model.create(version=version, description=description,
                                 applied_at=time.time())
        applied.append(version)
    return applied


def migrate(db: peewee.Database) -> list[int]:
    """Apply pending migrations, each in its own transaction; return their versions."""
    return apply(db, MIGRATIONS, SchemaVersion)


def latest_version() -> int:
    return MIGRATIONS[-1][0]
