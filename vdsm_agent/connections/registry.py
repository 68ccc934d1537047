"""The registry of connection IDs: each ID's URI and options, persisted in the store.

The store functions run on the DB thread (``await store.run(fn)``).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from vdsm_agent.connections import uri as uris
from vdsm_agent.store.models import StorageConnectionRow


@dataclasses.dataclass(frozen=True)
class Registration:
    connection_id: str
    endpoint: uris.Endpoint
    options: dict[str, Any]
    created_at: float


def load_rows() -> list[tuple[str, str, dict[str, Any], float]]:
    query = StorageConnectionRow.select().order_by(StorageConnectionRow.created_at)
    return [(row.connection_id, row.uri, json.loads(row.options), row.created_at)
            for row in query]


def insert_row(registration: Registration) -> None:
    StorageConnectionRow.insert(
        connection_id=registration.connection_id, uri=registration.endpoint.uri,
        options=json.dumps(registration.options, sort_keys=True),
        created_at=registration.created_at).execute()


def delete_row(connection_id: str) -> None:
    StorageConnectionRow.delete().where(
        StorageConnectionRow.connection_id == connection_id).execute()
