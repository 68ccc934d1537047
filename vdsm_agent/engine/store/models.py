"""The engine's peewee models, bound to their own proxy (not the agent's).

Tables are created by explicit, portable DDL in ``migrations`` (the same SQL
on sqlite and PostgreSQL); times are epoch seconds (DOUBLE PRECISION);
JSON columns hold small documents as text.
"""

from __future__ import annotations

import peewee

engine_proxy = peewee.DatabaseProxy()


class EngineModel(peewee.Model):
    class Meta:
        database = engine_proxy


class SchemaVersion(EngineModel):
    """One row per applied migration."""

    version = peewee.IntegerField(primary_key=True)
    description = peewee.TextField()
    applied_at = peewee.DoubleField()

    class Meta:
        table_name = "engine_schema_version"


class EngineMeta(EngineModel):
    """Small facts about this engine's store (e.g. its instance ID)."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "engine_meta"


class HostRow(EngineModel):
    """A registered host: its agent's URL, TLS files and what the engine knows of it."""

    name = peewee.TextField(primary_key=True)
    url = peewee.TextField()
    ca_file = peewee.TextField(null=True)
    cert_file = peewee.TextField(null=True)
    key_file = peewee.TextField(null=True)
    maintenance = peewee.BooleanField(default=False)
    status = peewee.TextField()  # connecting | up | non-responsive (maintenance: the flag)
    failures = peewee.IntegerField(default=0)
    last_seen = peewee.DoubleField(null=True)
    last_error = peewee.TextField(null=True)
    agent_version = peewee.TextField(null=True)
    events_epoch = peewee.TextField(null=True)
    synced_at = peewee.DoubleField(null=True)
    created_at = peewee.DoubleField()

    class Meta:
        table_name = "host"


class HostTaskRow(EngineModel):
    """A task on a host, as last learned (events, resynchronisation, getTask)."""

    host = peewee.TextField()
    task_id = peewee.TextField()
    kind = peewee.TextField()
    state = peewee.TextField()
    external = peewee.BooleanField(default=False)
    progress = peewee.TextField(null=True)  # JSON
    created_at = peewee.DoubleField()
    started_at = peewee.DoubleField(null=True)
    ended_at = peewee.DoubleField(null=True)
    updated_at = peewee.DoubleField()
    job_id = peewee.TextField(null=True)
    step_id = peewee.TextField(null=True)
    detail = peewee.TextField(null=True)  # JSON: the agent's whole task document

    class Meta:
        table_name = "host_task"
        primary_key = peewee.CompositeKey("host", "task_id")


class HostConnectionRow(EngineModel):
    """A managed storage connection ID on a host, as last learned."""

    host = peewee.TextField()
    connection_id = peewee.TextField()
    uri = peewee.TextField()
    managed = peewee.BooleanField(default=True)
    connected = peewee.BooleanField(default=False)
    state = peewee.TextField()
    last_error = peewee.TextField(null=True)  # JSON
    updated_at = peewee.DoubleField()

    class Meta:
        table_name = "host_connection"
        primary_key = peewee.CompositeKey("host", "connection_id")


class JobRow(EngineModel):
    """A job: one action on one or more hosts, one step per host."""

    id = peewee.TextField(primary_key=True)
    action = peewee.TextField()
    state = peewee.TextField()
    params = peewee.TextField()  # JSON: the engine call's params
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()
    ended_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "job"


class StepRow(EngineModel):
    """One host's part of a job, bound to that host's task ID or connection ID."""

    id = peewee.TextField(primary_key=True)
    job_id = peewee.TextField()
    position = peewee.IntegerField()
    host = peewee.TextField()
    action = peewee.TextField()
    state = peewee.TextField()
    task_id = peewee.TextField(null=True)
    connection_id = peewee.TextField(null=True)
    request = peewee.TextField()  # JSON: the params sent to the agent, reused on retry
    attempts = peewee.IntegerField(default=0)
    last_error = peewee.TextField(null=True)  # JSON
    result = peewee.TextField(null=True)  # JSON
    created_at = peewee.DoubleField()
    updated_at = peewee.DoubleField()
    ended_at = peewee.DoubleField(null=True)

    class Meta:
        table_name = "job_step"


class ResourceLockRow(EngineModel):
    """A resource of a host held by an unfinished engine-started task: exclusively,
    or shared by tasks whose kind only reads it (checksum; migration 2)."""

    host = peewee.TextField()
    resource = peewee.TextField()
    task_id = peewee.TextField()
    job_id = peewee.TextField()
    created_at = peewee.DoubleField()
    shared = peewee.BooleanField(default=False)

    class Meta:
        table_name = "resource_lock"
        primary_key = peewee.CompositeKey("host", "resource", "task_id")


class EngineProcessRow(EngineModel):
    """A running engine (migration 3): registered at its start, its heartbeat renewed
    with its leases, deleted when it stops cleanly. Times from the database's clock."""

    id = peewee.TextField(primary_key=True)  # a uuid4, new at every start
    name = peewee.TextField()
    pid = peewee.IntegerField()
    version = peewee.TextField()
    schema_version = peewee.IntegerField()
    started_at = peewee.DoubleField()
    heartbeat_at = peewee.DoubleField()

    class Meta:
        table_name = "engines"


class HostLeaseRow(EngineModel):
    """Which engine polls a host (migration 3): its owner until ``expires_at``
    (the database's clock), and a generation bumped at every takeover that fences
    the writes of an owner that lost it."""

    host = peewee.TextField(primary_key=True)
    owner = peewee.TextField(null=True)
    generation = peewee.BigIntegerField(default=0)
    expires_at = peewee.DoubleField(default=0)

    class Meta:
        table_name = "host_leases"
