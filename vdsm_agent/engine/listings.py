"""A host's task and connection lists, read for a resynchronisation.

Each list verb is passed the ``changeToken`` of its last answer as
``changedSince``: a list that did not change since is answered "not
modified" and is not read again. An agent that refuses the parameter (an
older one) is asked without it from then on. The tokens are kept only for
what the engine applied: ``HostWorker`` forgets them when anything other than
a resync or the host's events feed writes what it knows of the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from vdsm_agent.engine.agentclient import AgentError

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 1000
INVALID_PARAMS = -32602

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]

RESYNC_SPREAD = 0.25  # each resync interval is drawn within ±25% of resync_interval
# Resyncs in flight at once, engine-wide: an engine that starts (or a network that
# comes back) with thousands of hosts does not open two connections to each of
# them at once and starve the events of the hosts already followed.
RESYNC_CONCURRENCY = 128
_RESYNC_SLOTS: weakref.WeakKeyDictionary[Any, asyncio.Semaphore] = weakref.WeakKeyDictionary()
# How long a periodic resync waits for the events loop to hand it the kept-alive
# connection between two long-polls (the long-poll is timed to end when the resync
# is due); past it, the resync opens a connection of its own.
BATON_WAIT = 1.0


def resync_slots(engine: object) -> asyncio.Semaphore:
    """The engine's resync slots (``RESYNC_CONCURRENCY``), made on first use."""
    slots = _RESYNC_SLOTS.get(engine)
    if slots is None:
        slots = _RESYNC_SLOTS[engine] = asyncio.Semaphore(RESYNC_CONCURRENCY)
    return slots


@contextlib.asynccontextmanager
async def resync_turn(engine: object, baton: asyncio.Lock, periodic: bool
                      ) -> AsyncIterator[None]:
    """A resync's turn. A ``periodic`` one of a followed host holds the host's
    ``baton`` (``HostWorker.baton``: the events loop holds it over each long-poll),
    BATON_WAIT at most, and reads its lists on the connection the long-poll just
    freed (opening and closing one of its own cost ~0.5 ms of CPU a resync): it
    opens nothing, so it takes no slot. Any other (asked for, or its long-poll did
    not end in time) takes one of the engine's slots (``resync_slots``)."""
    if periodic:
        try:
            async with asyncio.timeout(BATON_WAIT):
                await baton.acquire()
        except TimeoutError:
            pass
        else:
            try:
                yield
            finally:
                baton.release()
            return
    async with resync_slots(engine):
        yield


class Listings:
    """The change tokens of one host's last applied lists, and the reads that use them."""

    def __init__(self, host: str, call: Call) -> None:
        self.host = host
        self.call = call
        self.tasks_token: str | None = None  # None: ask for the whole list
        self.connections_token: str | None = None
        self.conditional: bool | None = None  # whether the agent takes changedSince

    def forget(self) -> None:
        self.tasks_token = self.connections_token = None

    def keep(self, tasks_token: str | None, connections_token: str | None) -> None:
        self.tasks_token, self.connections_token = tasks_token, connections_token

    async def _conditional_call(self, method: str, params: dict[str, Any],
                                since: str | None) -> dict[str, Any]:
        """``method(params)`` with ``changedSince`` when the agent takes it."""
        if self.conditional is not False and since is not None:
            try:
                answer: dict[str, Any] = await self.call(method,
                                                         {**params, "changedSince": since})
            except AgentError as exc:
                if exc.code != INVALID_PARAMS or self.conditional:
                    raise
                log.info("host %s does not take changedSince: full resyncs", self.host)
                self.conditional = False
            else:
                self.conditional = True
                return answer
        plain: dict[str, Any] = await self.call(method, params)
        return plain

    async def tasks(self) -> tuple[list[dict[str, Any]] | None, str | None]:
        """(every task, or None when the list did not change since our token; the
        list's new token: the first page's, taken before anything was read)."""
        tasks: list[dict[str, Any]] = []
        page = await self._conditional_call("listTasks", {"pageSize": LIST_PAGE_SIZE},
                                            self.tasks_token)
        change_token = page.get("changeToken")
        if page.get("notModified"):
            return None, change_token
        while True:
            tasks += page["tasks"]
            page_token = page.get("nextPageToken")
            if not page_token:
                return tasks, change_token
            page = await self.call("listTasks", {"pageSize": LIST_PAGE_SIZE,
                                                 "pageToken": page_token})

    async def connections(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the connection list, or None when it did not change; its new token)."""
        answer = await self._conditional_call("getStorageConnectionList", {},
                                              self.connections_token or "")
        if "changeToken" in answer and "notModified" in answer \
                and isinstance(answer.get("changeToken"), str):
            if answer["notModified"]:
                return None, answer["changeToken"]
            return dict(answer.get("connections") or {}), answer["changeToken"]
        return answer, None  # the plain mapping (an agent without changedSince)
