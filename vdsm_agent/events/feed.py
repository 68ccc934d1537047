"""The events feed: what changed on this agent, in order, for callers that follow it.

Every event gets the next sequence number of the agent process's *epoch* (a
random UUID picked at start-up; numbers start at 1 in each epoch and grow by
one). The feed keeps the newest ``events_max`` events in memory (a deque: the
oldest falls off when a new one comes). Nothing is persisted: after a restart
the epoch differs and callers resynchronise from the full lists
(``listTasks``, ``getStorageConnectionList``).

Sources (wired in ``server/app.py``):

* ``TaskManager.add_listener`` -> ``on_task_transition``: every persisted
  state change of a task, with its progress at that moment;
* ``TaskManager.add_progress_listener`` -> ``on_task_progress``: progress
  changes seen by the task monitor, throttled here to one event per task per
  ``events_progress_interval`` (first change at once, the latest pending one
  when the interval has passed; a pending one is dropped when a transition
  comes first, since the transition event carries the current progress);
* ``ConnectionManager.listeners`` -> ``on_connection``: every state change of
  a storage target, for all connection IDs that name it.

Readers: ``read`` answers at once; ``wait`` is the long-poll (one shared
``asyncio.Event`` per publish, replaced each time: any number of waiters cost
one future each and no polling); ``stream`` feeds ``GET /events``, in batches
of at most ``STREAM_BATCH`` events (a follower held back by a slow client keeps
one batch; ``ndjson_pieces`` encodes it a piece at a time). ``close`` (agent
shutdown) wakes every waiter and ends every stream.

Everything runs on the agent's event loop; nothing here blocks.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import math
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from vdsm_agent.common.clock import rfc3339
from vdsm_agent.metrics.counters import FeedStats
from vdsm_agent.tasks.runtime import Pulse, wait_event
from vdsm_agent.tasks.states import FINAL, State

if TYPE_CHECKING:
    from vdsm_agent.connections.manager import ConnectionEvent
    from vdsm_agent.settings import Config

log = logging.getLogger(__name__)

Event = dict[str, Any]

DEFAULT_MAX_EVENTS = 10000
DEFAULT_PROGRESS_INTERVAL = 1.0
# Events per batch of the HTTP stream: what a follower held back by its client
# keeps (it was 1000, and a batch went to the connection whole).
STREAM_BATCH = 100
STREAM_IDLE_CHECK = 10.0  # seconds between checks that an idle stream's client is still there

_FINAL_STATES = frozenset(str(state) for state in FINAL)
# No throttle is kept for these: a final task sends no more progress, and a
# queued one none yet (a throttle per queued task was one more object for the
# garbage collector to walk while the queue lasts).
_NO_PROGRESS_STATES = _FINAL_STATES | {str(State.ACCEPTED)}


def ndjson_pieces(items: Iterable[Mapping[str, Any]], size: int) -> Iterator[bytes]:
    """``items`` as JSON lines, in pieces of about ``size`` bytes (whole lines).
    Lines are appended to the piece at once: an orjson result has room for
    8 KiB, so a list of them would hold ten times what it says."""
    piece = bytearray()
    for item in items:
        piece += orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE)
        if len(piece) >= size:
            done, piece = bytes(piece), bytearray()
            yield done
    if piece:
        yield bytes(piece)


@dataclasses.dataclass(eq=False)
class _Throttle:
    """Progress bookkeeping of one unfinished task."""

    kind: str
    state: str
    last: float = -math.inf  # monotonic time of the last event that carried progress
    sent: Any = None  # the progress of that event
    pending: Any = None  # a newer progress waiting for the interval to pass
    timer: asyncio.TimerHandle | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.pending = None


@dataclasses.dataclass(frozen=True)
class Page:
    """One answer of the feed (the ``getEvents`` result)."""

    epoch: str
    events: list[Event]
    next_since: int
    oldest_seq: int
    last_seq: int
    gap: bool

    def to_api(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "events": self.events, "nextSince": self.next_since,
                "oldestSeq": self.oldest_seq, "lastSeq": self.last_seq, "gap": self.gap}


class EventFeed:
    def __init__(self, max_events: int = DEFAULT_MAX_EVENTS,
                 progress_interval: float = DEFAULT_PROGRESS_INTERVAL, *,
                 epoch: str | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_events < 1:
            raise ValueError("max_events must be at least 1")
        self.epoch = epoch or uuid.uuid4().hex
        self.max_events = max_events
        self.progress_interval = progress_interval
        self._wall_clock = wall_clock
        self._events: collections.deque[Event] = collections.deque(maxlen=max_events)
        self._last_seq = 0
        self._pulse = Pulse()
        self._closed = False
        self._throttles: dict[str, _Throttle] = {}
        self.stats = FeedStats()  # events by type, readers, gaps (docs/metrics.md)

    @classmethod
    def from_config(cls, config: Config) -> EventFeed:
        return cls(config.events_max, config.events_progress_interval)

    # -- state -----------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """The newest sequence number (0 before the first event)."""
        return self._last_seq

    @property
    def oldest_seq(self) -> int:
        """The oldest retained sequence number (``last_seq + 1`` when none is)."""
        return int(self._events[0]["seq"]) if self._events else self._last_seq + 1

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Agent shutdown: wake every waiter and end every stream, now."""
        self._closed = True
        for throttle in self._throttles.values():
            throttle.cancel()
        self._pulse.fire()

    # -- publishing --------------------------------------------------------------------

    def publish(self, event_type: str, fields: Mapping[str, Any],
                at: str | float | None = None) -> Event:
        """Append an event: ``{seq, at, type, **fields}``; wakes the waiters."""
        if at is None:
            at = self._wall_clock()
        self._last_seq += 1
        event: Event = {"seq": self._last_seq,
                        "at": at if isinstance(at, str) else rfc3339(at),
                        "type": event_type, **fields}
        self._events.append(event)
        self._pulse.fire()
        self.stats.published[event_type] += 1
        return event

    def on_task_transition(self, change: Mapping[str, Any]) -> None:
        """TaskManager listener: ``{taskID, kind, from, to, at, progress}``."""
        task_id = str(change["taskID"])
        state = str(change["to"])
        progress = change.get("progress")
        throttle = self._throttles.pop(task_id, None)
        if throttle is not None:
            throttle.cancel()  # this event carries the current progress
        if state not in _NO_PROGRESS_STATES:
            throttle = throttle or _Throttle(kind=str(change["kind"]), state=state)
            throttle.state = state
            throttle.last = time.monotonic()
            throttle.sent = progress
            self._throttles[task_id] = throttle
        self.publish("task", {
            "taskID": task_id, "kind": change["kind"], "state": state,
            "previousState": change.get("from"),
            "progress": dict(progress) if progress is not None else None,
            "change": "state"}, change.get("at"))

    def on_task_progress(self, change: Mapping[str, Any]) -> None:
        """TaskManager progress listener: ``{taskID, kind, state, progress, at}``."""
        task_id = str(change["taskID"])
        state = str(change["state"])
        if state in _FINAL_STATES:
            return
        throttle = self._throttles.get(task_id)
        if throttle is None:
            throttle = self._throttles[task_id] = _Throttle(kind=str(change["kind"]),
                                                            state=state)
        throttle.state = state
        progress = dict(change["progress"])
        if throttle.timer is not None:
            throttle.pending = progress  # sent when the interval has passed
            return
        if progress == throttle.sent:
            return
        delay = throttle.last + self.progress_interval - time.monotonic()
        if delay <= 0 or self._closed:
            self._send_progress(task_id, throttle, progress)
            return
        throttle.pending = progress
        throttle.timer = asyncio.get_running_loop().call_later(
            delay, self._flush_progress, task_id)

    def _flush_progress(self, task_id: str) -> None:
        throttle = self._throttles.get(task_id)
        if throttle is None:
            return
        throttle.timer = None
        progress, throttle.pending = throttle.pending, None
        if progress is not None and progress != throttle.sent:
            self._send_progress(task_id, throttle, progress)

    def _send_progress(self, task_id: str, throttle: _Throttle, progress: Any) -> None:
        throttle.last = time.monotonic()
        throttle.sent = progress
        self.publish("task", {
            "taskID": task_id, "kind": throttle.kind, "state": throttle.state,
            "previousState": throttle.state, "progress": progress, "change": "progress"})

    def on_connection(self, change: ConnectionEvent) -> None:
        """ConnectionManager listener: a target's state change."""
        error = change.error
        self.publish("connection", {
            "connectionIDs": list(change.connection_ids), "uri": change.uri,
            "state": change.new_state, "previousState": change.old_state,
            # "time" too: then it is also the ConnectionError of getStorageConnectionList.
            "error": None if error is None else {
                "code": error.code, "message": error.message, "at": rfc3339(error.at),
                "time": rfc3339(error.at, 3)},
        }, change.at)

    # -- reading -----------------------------------------------------------------------

    def read(self, since: int, epoch: str | None = None,
             max_events: int = 1000) -> Page:
        """Events after ``since`` (at most ``max_events``), at once.

        ``gap`` when the caller may have missed events: another epoch, events
        after ``since`` no longer retained, or ``since`` beyond the newest
        sequence number (a position from an earlier epoch). The answer then
        starts at the oldest retained event.
        """
        last = self._last_seq
        oldest = self.oldest_seq
        gap = ((epoch is not None and epoch != self.epoch)
               or since + 1 < oldest or since > last)
        if gap:
            self.stats.gaps += 1
        start = oldest - 1 if gap else since
        events = self._slice(start + 1 - oldest, max(max_events, 0))
        next_since = int(events[-1]["seq"]) if events else start
        return Page(self.epoch, events, next_since, oldest, last, gap)

    def _slice(self, index: int, count: int) -> list[Event]:
        """``events[index:index + count]``, walking the deque from its nearer end."""
        size = len(self._events)
        end = min(size, index + count)
        if index >= end:
            return []
        if end <= size - index:
            return list(itertools.islice(self._events, index, end))
        tail = list(itertools.islice(reversed(self._events), size - end, size - index))
        tail.reverse()
        return tail

    async def wait(self, since: int, timeout: float, epoch: str | None = None,
                   max_events: int = 1000) -> Page:
        """Long-poll: ``read`` at once if it has events or a gap; else wait for the
        next event up to ``timeout`` seconds (or until the feed is closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self.stats.long_polls += 1
        try:
            while True:
                pulse = self._pulse.current()
                page = self.read(since, epoch, max_events)
                remaining = deadline - loop.time()
                if page.events or page.gap or self._closed or remaining <= 0:
                    return page
                await wait_event(pulse, remaining)
        finally:
            self.stats.long_polls -= 1

    def keepalive(self) -> Event:
        """The line a followed stream sends while nothing happens (not an event: no
        ``seq``; ``lastSeq`` is the newest event, which the follower has seen)."""
        return {"type": "keepalive", "at": rfc3339(self._wall_clock()),
                "lastSeq": self._last_seq}

    async def stream(self, since: int, epoch: str | None = None, follow: bool = False,
                     alive: Callable[[], bool] = lambda: True) -> AsyncGenerator[list[Event], None]:
        """Batches for ``GET /events``: a hello line, then the events after ``since``;
        with ``follow``, new ones as they come until the feed closes or ``alive()``
        turns false. A reader that falls behind the bound gets a ``gap`` line and
        goes on from the oldest retained event. A batch is the reader's: it may
        clear it once written (then a reader held back keeps no event alive)."""
        page = self.read(since, epoch, STREAM_BATCH)
        yield [{"type": "hello", "epoch": self.epoch, "since": since,
                "nextSince": page.next_since, "oldestSeq": page.oldest_seq,
                "lastSeq": page.last_seq, "gap": page.gap, "follow": follow}]
        # The reader's position (its lag: last_seq minus it), for GET /metrics.
        position = [page.oldest_seq - 1 if page.gap else since]
        self.stats.streams[id(position)] = position
        try:
            while True:
                if page.events:
                    yield page.events
                since = position[0] = page.next_since
                pulse = self._pulse.current()
                page = self.read(since, self.epoch, STREAM_BATCH)
                if page.gap:
                    yield [{"type": "gap", "epoch": self.epoch, "since": since,
                            "oldestSeq": page.oldest_seq, "lastSeq": page.last_seq,
                            "at": rfc3339(self._wall_clock())}]
                    continue
                if page.events:
                    continue
                if not follow or self._closed or not alive():
                    return
                await wait_event(pulse, STREAM_IDLE_CHECK)
        finally:
            del self.stats.streams[id(position)]
