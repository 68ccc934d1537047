"""Forward-only schema migrations, applied in order at open.

Each migration is a function of the open database, registered in
``MIGRATIONS`` with the next version number. Never edit a released
migration; add a new one.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import peewee

from vdsm_agent.store.models import Meta, SchemaVersion

Migration = Callable[[peewee.Database], None]


def _initial(db: peewee.Database) -> None:
    db.create_tables([Meta])
    Meta.create(key="instance_id", value=uuid.uuid4().hex)


MIGRATIONS: list[tuple[int, str, Migration]] = [
    (1, "initial: meta", _initial),
]


def current_version(db: peewee.Database) -> int:
    db.create_tables([SchemaVersion])
    row = SchemaVersion.select(peewee.fn.MAX(SchemaVersion.version)).scalar()
    return int(row or 0)


def migrate(db: peewee.Database) -> list[int]:
    """Apply pending migrations, each in its own transaction; return their versions."""
    applied = []
    for version, description, migration in MIGRATIONS:
        if version <= current_version(db):
            continue
        with db.atomic():
            migration(db)
            SchemaVersion.create(version=version, description=description,
                                 applied_at=time.time())
        applied.append(version)
    return applied


def latest_version() -> int:
    return MIGRATIONS[-1][0]
