"""Hosts: registration, maintenance, what the engine keeps of each (DB thread)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import peewee

from vdsm_agent import errors
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.engine.store.models import EngineMeta, HostConnectionRow, HostRow, HostTaskRow
from vdsm_agent.engine.store.rows import BATCH, atomic

# Per host: {"tasks": {state: n}, "connections": {state: n}}.
Counts = dict[str, dict[str, dict[str, int]]]


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
    """Every host (the engine's start); the views read them a page at a time."""
    return list(HostRow.select().order_by(HostRow.name))


@dataclasses.dataclass(frozen=True)
class HostsPage:
    rows: list[HostRow]
    more: bool  # hosts after the last row
    counts: Counts


def list_hosts_page(after: str | None, size: int) -> HostsPage:
    """Up to ``size`` hosts by name after ``after``, with their counts only: a page
    costs its own hosts' rows, never the fleet's (500,000 tasks at 5,000 hosts)."""
    select = HostRow.select()
    if after is not None:
        select = select.where(HostRow.name > after)
    rows = list(select.order_by(HostRow.name).limit(size + 1))
    page = rows[:size]
    return HostsPage(page, len(rows) > size, host_counts([row.name for row in page]))


def get_host_with_counts(name: str) -> tuple[HostRow, Counts]:
    return get_host(name), host_counts([name])


def set_maintenance(name: str, maintenance: bool) -> HostRow:
    with atomic():
        row = get_host(name)
        row.maintenance = maintenance
        row.save()
        return row


def update_host(name: str, **fields: Any) -> None:
    if fields:
        HostRow.update(**fields).where(HostRow.name == name).execute()


def host_counts(hosts: Sequence[str]) -> Counts:
    """These hosts' tasks by state and managed connections by state (every host
    named is in the answer). Grouped on the primary keys' leading column (host):
    the rows read are these hosts' only, and the tasks' counts come from the
    (host, state) index alone (migration 4)."""
    counts: Counts = {host: {"tasks": {}, "connections": {}} for host in hosts}
    for model in (HostTaskRow, HostConnectionRow):
        key = "tasks" if model is HostTaskRow else "connections"
        for names in peewee.chunked(sorted(counts), BATCH):
            query: Any = (model.select(model.host, model.state, peewee.fn.COUNT(model.host))
                          .where(model.host.in_(names))
                          .group_by(model.host, model.state).tuples())
            for host, state, number in query:
                counts[host][key][state] = int(number)
    return counts
