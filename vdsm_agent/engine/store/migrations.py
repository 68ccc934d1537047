"""The engine's forward-only migrations, applied in order at open.

The DDL is explicit and portable: the same statements run on sqlite and on
PostgreSQL (TEXT, INTEGER, BOOLEAN, DOUBLE PRECISION, composite primary keys;
no auto-increment). Never edit a released migration; add a new one.
"""

from __future__ import annotations

import uuid

import peewee

from vdsm_agent.engine.store.models import EngineMeta, SchemaVersion
from vdsm_agent.store import migrations as agent_migrations
from vdsm_agent.store.migrations import Migration

_INITIAL_DDL = (
    "CREATE TABLE engine_meta (key TEXT NOT NULL PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE host (
        name TEXT NOT NULL PRIMARY KEY,
        url TEXT NOT NULL,
        ca_file TEXT,
        cert_file TEXT,
        key_file TEXT,
        maintenance BOOLEAN NOT NULL DEFAULT FALSE,
        status TEXT NOT NULL,
        failures INTEGER NOT NULL DEFAULT 0,
        last_seen DOUBLE PRECISION,
        last_error TEXT,
        agent_version TEXT,
        events_epoch TEXT,
        synced_at DOUBLE PRECISION,
        created_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE host_task (
        host TEXT NOT NULL,
        task_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        state TEXT NOT NULL,
        external BOOLEAN NOT NULL DEFAULT FALSE,
        progress TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        started_at DOUBLE PRECISION,
        ended_at DOUBLE PRECISION,
        updated_at DOUBLE PRECISION NOT NULL,
        job_id TEXT,
        step_id TEXT,
        detail TEXT,
        PRIMARY KEY (host, task_id))""",
    "CREATE INDEX host_task_created ON host_task (created_at, host, task_id)",
    "CREATE INDEX host_task_state ON host_task (state, created_at)",
    """CREATE TABLE host_connection (
        host TEXT NOT NULL,
        connection_id TEXT NOT NULL,
        uri TEXT NOT NULL,
        managed BOOLEAN NOT NULL DEFAULT TRUE,
        connected BOOLEAN NOT NULL DEFAULT FALSE,
        state TEXT NOT NULL,
        last_error TEXT,
        updated_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host, connection_id))""",
    "CREATE INDEX host_connection_id ON host_connection (connection_id)",
    """CREATE TABLE job (
        id TEXT NOT NULL PRIMARY KEY,
        action TEXT NOT NULL,
        state TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION)""",
    "CREATE INDEX job_created ON job (created_at, id)",
    "CREATE INDEX job_state_ended ON job (state, ended_at)",
    """CREATE TABLE job_step (
        id TEXT NOT NULL PRIMARY KEY,
        job_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        host TEXT NOT NULL,
        action TEXT NOT NULL,
        state TEXT NOT NULL,
        task_id TEXT,
        connection_id TEXT,
        request TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        result TEXT,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        ended_at DOUBLE PRECISION)""",
    "CREATE INDEX job_step_job ON job_step (job_id, position)",
    "CREATE INDEX job_step_host_state ON job_step (host, state)",
    "CREATE INDEX job_step_host_task ON job_step (host, task_id)",
    """CREATE TABLE resource_lock (
        host TEXT NOT NULL,
        resource TEXT NOT NULL,
        task_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (host, resource))""",
    "CREATE INDEX resource_lock_task ON resource_lock (host, task_id)",
)


def _initial(db: peewee.Database) -> None:
    for statement in _INITIAL_DDL:
        db.execute_sql(statement)  # type: ignore[no-untyped-call]
    EngineMeta.create(key="instance_id", value=uuid.uuid4().hex)


# Shared locks: several tasks may hold one resource (all shared), so the task is
# part of the key. Portable: a new table, the rows copied (all exclusive), renamed.
_SHARED_LOCKS_DDL = (
    """CREATE TABLE resource_lock_shared (
        host TEXT NOT NULL,
        resource TEXT NOT NULL,
        task_id TEXT NOT NULL,
        job_id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        shared BOOLEAN NOT NULL DEFAULT FALSE,
        PRIMARY KEY (host, resource, task_id))""",
    """INSERT INTO resource_lock_shared (host, resource, task_id, job_id, created_at, shared)
        SELECT host, resource, task_id, job_id, created_at, FALSE FROM resource_lock""",
    "DROP TABLE resource_lock",
    "ALTER TABLE resource_lock_shared RENAME TO resource_lock",
    "CREATE INDEX resource_lock_task ON resource_lock (host, task_id)",
)


def _shared_locks(db: peewee.Database) -> None:
    for statement in _SHARED_LOCKS_DDL:
        db.execute_sql(statement)  # type: ignore[no-untyped-call]


# Several engines on one PostgreSQL (docs/engine.md, "Several engines"): each
# engine's row, renewed with its heartbeat, and one lease per host. Times are
# the database's clock (epoch seconds), never an engine's. Made on sqlite too
# (portable DDL), where the one engine takes no lease.
_LEASES_DDL = (
    """CREATE TABLE engines (
        id TEXT NOT NULL PRIMARY KEY,
        name TEXT NOT NULL,
        pid INTEGER NOT NULL,
        version TEXT NOT NULL,
        schema_version INTEGER NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat_at DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE host_leases (
        host TEXT NOT NULL PRIMARY KEY REFERENCES host (name) ON DELETE CASCADE,
        owner TEXT,
        generation BIGINT NOT NULL DEFAULT 0,
        expires_at DOUBLE PRECISION NOT NULL DEFAULT 0)""",
    "CREATE INDEX host_leases_owner ON host_leases (owner)",
)


def _leases(db: peewee.Database) -> None:
    for statement in _LEASES_DDL:
        db.execute_sql(statement)  # type: ignore[no-untyped-call]


def _host_task_counts(db: peewee.Database) -> None:
    # listHosts and getHost count their hosts' tasks by state (store/hosts.py
    # host_counts): from this index alone, without reading the rows (~700-byte
    # documents): 9-12 -> 3 ms for a page of 100 hosts with 100 tasks each (sqlite).
    db.execute_sql(  # type: ignore[no-untyped-call]
        "CREATE INDEX host_task_host_state ON host_task (host, state)")


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "initial: meta, hosts, host tasks and connections, jobs, steps, locks", _initial),
    (2, "resource locks: shared holders (a checksum's), the task in the key", _shared_locks),
    (3, "several engines: the engines' rows and the hosts' leases", _leases),
    (4, "host tasks: an index for the counts by host and state", _host_task_counts),
]

_VERSION_DDL = """CREATE TABLE IF NOT EXISTS engine_schema_version (
    version INTEGER NOT NULL PRIMARY KEY,
    description TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL)"""


def _create_version_table(db: peewee.Database) -> None:
    db.execute_sql(_VERSION_DDL)  # type: ignore[no-untyped-call]


def current_version(db: peewee.Database) -> int:
    return agent_migrations.current_version(db, SchemaVersion, _create_version_table)


def migrate(db: peewee.Database) -> list[int]:
    """Apply pending migrations, each in its own transaction; return their versions."""
    return agent_migrations.apply(db, MIGRATIONS, SchemaVersion, _create_version_table)


def latest_version() -> int:
    return MIGRATIONS[-1][0]
