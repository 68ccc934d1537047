"""peewee models. The database is bound at open time (``Store.open``)."""

from __future__ import annotations

import peewee

database_proxy = peewee.DatabaseProxy()


class BaseModel(peewee.Model):
    class Meta:
        database = database_proxy


class SchemaVersion(BaseModel):
    """One row per applied migration."""

    version = peewee.IntegerField(primary_key=True)
    description = peewee.TextField()
    applied_at = peewee.FloatField()

    class Meta:
        table_name = "schema_version"


class Meta(BaseModel):
    """Small facts about this agent's store (e.g. its instance ID)."""

    key = peewee.TextField(primary_key=True)
    value = peewee.TextField()

    class Meta:
        table_name = "meta"


class TaskRow(BaseModel):
    """One task (vdsm_agent.tasks). JSON columns hold small documents as text;
    times are epoch seconds. Created by migration 2 (explicit DDL there)."""

    id = peewee.TextField(primary_key=True)
    kind = peewee.TextField()
    params = peewee.TextField()  # JSON, defaults filled in
    request_hash = peewee.TextField()  # identity of the submit, for idempotent retries
    state = peewee.TextField()
    created_at = peewee.FloatField()
    started_at = peewee.FloatField(null=True)
    ended_at = peewee.FloatField(null=True)
    deadline = peewee.FloatField(null=True)
    heartbeat_at = peewee.FloatField(null=True)
    progress = peewee.TextField(null=True)  # JSON
    result = peewee.TextField(null=True)  # JSON
    error = peewee.TextField(null=True)  # JSON
    warnings = peewee.TextField(default="[]")  # JSON list
    resources = peewee.TextField(default="[]")  # JSON list
    output_size = peewee.IntegerField(default=0)
    output_start = peewee.IntegerField(default=0)
    pid = peewee.IntegerField(null=True)
    pid_create_time = peewee.FloatField(null=True)
    stop = peewee.TextField(null=True)  # JSON: a pending cancel/deadline/reset request
    resets = peewee.TextField(default="[]")  # JSON list of resetTaskState records
    launched_by = peewee.TextField(null=True)  # agent version that launched it (migration 4)
    external = peewee.TextField(null=True)  # JSON: e.g. the Gluster task ID (migration 5)

    class Meta:
        table_name = "task"


class StorageConnectionRow(BaseModel):
    """One managed storage connection ID (vdsm_agent.connections); only what
    is needed to manage it again after a restart. Created by migration 3."""

    connection_id = peewee.TextField(primary_key=True)
    uri = peewee.TextField()  # canonical form
    options = peewee.TextField(default="{}")  # JSON, the manage call's options
    created_at = peewee.FloatField()

    class Meta:
        table_name = "storage_connection"
