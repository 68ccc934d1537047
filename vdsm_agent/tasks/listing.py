"""listTasks: the filter and its pages.

Tasks are listed in (createdAt, ID) order, straight from the store (a page
shows an unfinished task's in-memory record: its progress is fresher), a
page at a time with keyset page tokens (``common.paging``).

Every answer carries the task list's ``changeToken`` (``common.changes``),
taken before the store is read; with ``changedSince`` equal to the current
token the answer is ``notModified`` with no tasks, at once: no store read.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from vdsm_agent.common import changes, clock, paging
from vdsm_agent.store import Store
from vdsm_agent.tasks import repository
from vdsm_agent.tasks.runtime import Active
from vdsm_agent.tasks.states import State


def _time(where: dict[str, Any], name: str) -> float | None:
    text = where.get(name)
    return None if text is None else clock.parse_param(text, f"params.filter.{name}")


def parse_filter(where: dict[str, Any]) -> repository.ListFilter:
    raw_states = where.get("state", [])
    names = [raw_states] if isinstance(raw_states, str) else list(raw_states)
    return repository.ListFilter(
        states=tuple(State(name) for name in names),
        kind=where.get("kind"),
        created_after=_time(where, "createdAfter"),
        created_before=_time(where, "createdBefore"),
    )


def fingerprint(query: repository.ListFilter) -> str:
    return paging.fingerprint(dataclasses.asdict(query))


async def list_page(store: Store, active: dict[str, Active], where: dict[str, Any] | None,
                    page_size: int, page_token: str | None, counter: changes.ChangeCounter,
                    changed_since: str | None = None) -> dict[str, Any]:
    """One page of ``listTasks``."""
    current = counter.token()
    if changes.not_modified(changed_since, current):
        return {"tasks": [], "nextPageToken": None, "changeToken": current,
                "notModified": True}
    query = parse_filter(where or {})
    digest = fingerprint(query)
    after = None
    if page_token:
        after = paging.decode_token(page_token, digest, "listTasks", (float, str))
    rows = await store.run(repository.list_page, query, after, page_size + 1)
    page = rows[:page_size]
    tasks = [active[row.id].record if row.id in active else row for row in page]
    token = None
    if len(rows) > page_size:
        last = page[-1]
        token = paging.encode_token([last.created_at, last.id], digest)
    return {"tasks": [task.to_api() for task in tasks], "nextPageToken": token,
            "changeToken": current, "notModified": False}
