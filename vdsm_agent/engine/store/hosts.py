"""Hosts: registration, maintenance, what the engine keeps of each (DB thread)."""

from __future__ import annotations

from typing import Any

import peewee

from vdsm_agent import errors
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store.models import EngineMeta, HostConnectionRow, HostRow, HostTaskRow
from vdsm_agent.engine.store.rows import atomic


def instance_id() -> str:
    return str(EngineMeta.get_by_id("instance_id").value)


def add_host(name: str, url: str, ca_file: str | None, cert_file: str | None,
             key_file: str | None, maintenance: bool, now: float) -> HostRow:
    with atomic():
        if HostRow.get_or_none(HostRow.name == name) is not None:
            raise errors.HostExists(f"host {name} is already registered", host=name)
        return HostRow.create(
            name=name, url=url, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            maintenance=maintenance, status=HostStatus.CONNECTING.value, failures=0,
            created_at=now)


def get_host(name: str) -> HostRow:
    row = HostRow.get_or_none(HostRow.name == name)
    if row is None:
        raise errors.HostNotFound(f"no host named {name}", host=name)
    return row


def list_hosts() -> list[HostRow]:
    return list(HostRow.select().order_by(HostRow.name))


def set_maintenance(name: str, maintenance: bool) -> HostRow:
    with atomic():
        row = get_host(name)
        row.maintenance = maintenance
        row.save()
        return row


def update_host(name: str, **fields: Any) -> None:
    if fields:
        HostRow.update(**fields).where(HostRow.name == name).execute()


def host_counts() -> dict[str, dict[str, dict[str, int]]]:
    """Per host: tasks by state and managed connections by state."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for model in (HostTaskRow, HostConnectionRow):
        key = "tasks" if model is HostTaskRow else "connections"
        query: Any = (model.select(model.host, model.state, peewee.fn.COUNT(model.host))
                      .group_by(model.host, model.state).tuples())
        for host, state, number in query:
            per_host = counts.setdefault(host, {"tasks": {}, "connections": {}})
            per_host[key][state] = int(number)
    return counts
