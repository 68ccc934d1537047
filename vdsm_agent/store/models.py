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
