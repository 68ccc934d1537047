"""The storage connections the engine learns from its hosts (DB thread)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import peewee

from vdsm_agent.engine.states import UNKNOWN
from vdsm_agent.engine.store.models import HostConnectionRow, StepRow
from vdsm_agent.engine.store.rows import BATCH, atomic, dumps
from vdsm_agent.engine.store.steps import ACTIVE_STEP_STATES


def _connected(state: str) -> bool:
    return state in ("connected", "degraded")


def apply_connection_snapshot(host: str, mapping: Mapping[str, Mapping[str, Any]],
                              now: float) -> int:
    """getStorageConnectionList: the managed IDs replace what was known of the host.

    Only differences are written; returns how many rows changed."""
    wanted = {
        connection_id: {"uri": str(doc.get("uri", "")), "connected": bool(doc.get("connected")),
                        "state": str(doc.get("state", UNKNOWN)),
                        "last_error": dumps(doc.get("lastError"))}
        for connection_id, doc in mapping.items() if doc.get("managed")
    }
    changed = 0
    with atomic():
        existing = {row.connection_id: row for row in HostConnectionRow.select().where(
            HostConnectionRow.host == host)}
        gone = sorted(set(existing) - set(wanted))
        if gone:
            changed += HostConnectionRow.delete().where(
                (HostConnectionRow.host == host)
                & HostConnectionRow.connection_id.in_(gone)).execute()
        fresh = []
        for connection_id, fields in wanted.items():
            row = existing.get(connection_id)
            if row is None:
                fresh.append({"host": host, "connection_id": connection_id, "managed": True,
                              "updated_at": now, **fields})
            elif any(getattr(row, key) != value for key, value in fields.items()):
                HostConnectionRow.update(updated_at=now, **fields).where(
                    (HostConnectionRow.host == host)
                    & (HostConnectionRow.connection_id == connection_id)).execute()
                changed += 1
        for rows in peewee.chunked(fresh, BATCH):
            HostConnectionRow.insert_many(rows).execute()
        changed += len(fresh)
    return changed


def apply_connection_doc(host: str, connection_id: str, doc: Mapping[str, Any],
                         now: float) -> None:
    """One managed connection as the host described it (manageStorageConnection's answer)."""
    with atomic():
        HostConnectionRow.delete().where((HostConnectionRow.host == host)
                                         & (HostConnectionRow.connection_id == connection_id)
                                         ).execute()
        HostConnectionRow.insert(
            host=host, connection_id=connection_id, uri=str(doc.get("uri", "")), managed=True,
            connected=bool(doc.get("connected")), state=str(doc.get("state", UNKNOWN)),
            last_error=dumps(doc.get("lastError")), updated_at=now).execute()


def forget_connection(host: str, connection_id: str) -> None:
    HostConnectionRow.delete().where((HostConnectionRow.host == host)
                                     & (HostConnectionRow.connection_id == connection_id)
                                     ).execute()


def apply_connection_event(host: str, event: Mapping[str, Any], now: float) -> bool:
    """A connection event; True when it names an ID the engine does not know yet."""
    state = str(event.get("state", UNKNOWN))
    unknown = False
    with atomic():
        for connection_id in event.get("connectionIDs") or ():
            changed = HostConnectionRow.update(
                state=state, connected=_connected(state),
                last_error=dumps(event.get("error")), updated_at=now,
            ).where((HostConnectionRow.host == host)
                    & (HostConnectionRow.connection_id == connection_id)).execute()
            if not changed:
                unknown = True
    return unknown


def list_connections(connection_id: str | None) -> list[HostConnectionRow]:
    select = HostConnectionRow.select()
    if connection_id is not None:
        select = select.where(HostConnectionRow.connection_id == connection_id)
    return list(select.order_by(HostConnectionRow.connection_id, HostConnectionRow.host))


def pending_connection_steps(connection_id: str | None) -> list[StepRow]:
    """Unfinished manage steps: their hosts should have the connection."""
    select = StepRow.select().where((StepRow.action == "manageStorageConnection")
                                    & StepRow.state.in_(ACTIVE_STEP_STATES))
    if connection_id is not None:
        select = select.where(StepRow.connection_id == connection_id)
    return list(select)
