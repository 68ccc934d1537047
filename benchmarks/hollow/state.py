"""What one hollow host knows: its tasks, its storage connections and its events feed.

Everything is in memory and cheap to answer: a task keeps its answer encoded
(orjson bytes, made on first read and dropped at its next change), so a
``listTasks`` page is a join of ready bytes, and the connection list is
encoded once per change (and per probe interval, as ``lastCheck`` moves on a
real agent). The feed is the agent's own ``EventFeed`` (same epochs,
sequence numbers, gaps, long-poll and progress throttle), fed with the same
listener calls a real agent makes (``on_task_transition``,
``on_task_progress``, ``on_connection``).

``HollowHost.version`` grows at every change of what the lists show (tasks,
connections; a deleted task too, which has no event), and ``task_version`` and
``connection_version`` at every change of each list: the change tokens of
the list verbs (``changedSince``, as ``vdsm_agent/common/changes.py`` on a
real agent) are ``EPOCH.VERSION`` with the feed's epoch (a restart: another
epoch, so an old token gets the full answer). Each task and target
remembers the version of its last change.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import hashlib
import itertools
import math
import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from vdsm_agent import errors
from vdsm_agent.common import paging
from vdsm_agent.common.clock import parse_rfc3339, rfc3339
from vdsm_agent.connections.manager import ConnectionEvent
from vdsm_agent.connections.monitor import ErrorInfo
from vdsm_agent.events.feed import EventFeed

TASK_STATES = ("accepted", "initializing", "running", "stale", "done", "failed", "canceled",
               "interrupted")
FINAL = frozenset({"done", "failed", "canceled", "interrupted"})
# The life of a task that the generator moves on, one transition per tick.
NEXT_STATE = {"accepted": "initializing", "initializing": "running", "running": "done"}
SCHEMES = ("file", "glusterfs", "iscsi", "loop", "nfs", "sshfs")
DEFAULT_KINDS = ("checksum", "copy", "format", "fsck", "test.sleep", "wipe")
GENERATED_KIND = "test.sleep"
PROGRESS_TOTAL = 1_000_000


def kept(encoded: bytes) -> bytes:
    """An orjson result to keep: copied to its own size (orjson's bytes reserve
    about 4 KiB whatever they hold; 50,000 kept task answers held 390 MiB)."""
    return bytes(memoryview(encoded))


def empty_progress() -> dict[str, Any]:
    return {"percent": None, "done": 0, "total": None, "rate": None, "eta": None}


def progress_at(done: int, total: int = PROGRESS_TOTAL, rate: float = 1000.0) -> dict[str, Any]:
    done = min(done, total)
    return {"percent": round(done * 100 / total, 2), "done": done, "total": total,
            "rate": rate, "eta": round((total - done) / rate, 2) if rate else None}


_SEED_PARAMS: dict[str, Any] = {"seconds": 0}
_SEED_PROGRESS = progress_at(PROGRESS_TOTAL)
_SEED_RESULT: dict[str, Any] = {"slept": 0}


@dataclasses.dataclass(frozen=True)
class HostOptions:
    """What every hollow host of a process shares (the agent settings it imitates)."""

    events_max: int = 1000  # the real default is 10000; see docs/benchmarks.md
    events_max_wait: float = 60.0
    events_progress_interval: float = 1.0
    probe_interval: float = 10.0  # lastCheck moves this often (0: never)
    task_seconds: float = 5.0  # how long a started task of a kind other than test.sleep runs
    retention: int = 100  # finished tasks kept per host (the oldest go first, no event)
    kinds: tuple[str, ...] = DEFAULT_KINDS


class HollowTask:
    """One task: the fields of the API's ``Task`` and its encoded answer."""

    __slots__ = ("blob", "created", "deadline", "digest", "ended", "error", "id", "kind",
                 "params", "pid", "progress", "resources", "result", "started", "state",
                 "stop", "updated", "version")

    def __init__(self, task_id: str, kind: str, params: dict[str, Any], created: float,
                 resources: tuple[str, ...] = (), deadline: float | None = None,
                 digest: str = "") -> None:
        self.id = task_id
        self.kind = kind
        self.params = params
        self.state = "accepted"
        self.progress: dict[str, Any] = empty_progress()
        self.result: Any = None
        self.error: dict[str, Any] | None = None
        self.resources = resources
        self.created = created
        self.started: float | None = None
        self.ended: float | None = None
        self.updated = created  # heartbeatAt: the last change seen
        self.deadline = deadline
        self.stop: dict[str, Any] | None = None
        self.pid: int | None = None
        self.digest = digest  # the request's identity, for idempotent startTask
        self.version = 0
        self.blob: bytes | None = None

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def doc(self) -> dict[str, Any]:
        """The ``Task`` object of rpc_schema/agent.json."""
        return {
            "id": self.id, "kind": self.kind, "params": self.params, "state": self.state,
            "progress": self.progress, "result": self.result, "error": self.error,
            "warnings": [], "resources": list(self.resources),
            "createdAt": rfc3339(self.created), "startedAt": rfc3339(self.started),
            "endedAt": rfc3339(self.ended),
            "heartbeatAt": rfc3339(self.updated) if self.started is not None else None,
            "deadline": rfc3339(self.deadline), "outputSize": 0, "outputTruncatedBefore": 0,
            "pid": self.pid,
            "stopRequested": (None if self.stop is None
                              else {"reason": self.stop["reason"],
                                    "at": rfc3339(self.stop["at"])}),
            "resets": [],
        }

    def encoded(self) -> bytes:
        if self.blob is None:
            self.blob = kept(orjson.dumps(self.doc()))
        return self.blob


@dataclasses.dataclass(eq=False)
class Target:
    """A storage target (one URI) and the managed IDs naming it."""

    uri: str
    ids: set[str]
    state: str = "connecting"
    last_error: ErrorInfo | None = None
    changed_at: float = dataclasses.field(default_factory=time.time)
    probe_phase: float = 0.0
    version: int = 0

    def last_check(self, now: float, interval: float) -> float | None:
        """When its last probe ran: moves every ``interval`` like a real monitor's."""
        if self.state == "connecting":
            return None
        if interval <= 0:
            return self.changed_at
        slot = math.floor((now - self.probe_phase) / interval) * interval + self.probe_phase
        return max(slot, self.changed_at)

    def status(self, connection_id: str, now: float, interval: float) -> dict[str, Any]:
        """The ``StorageConnection`` object of rpc_schema/agent.json."""
        connected = self.state in ("connected", "degraded")
        info: dict[str, Any] = {"hollow": True, "capacity": {"totalBytes": 1 << 40,
                                                             "freeBytes": 1 << 39},
                                "probeRead": "statvfs", "adopted": False,
                                "sharedWith": sorted(self.ids - {connection_id}),
                                "probeInFlight": False}
        return {"uri": self.uri, "managed": True, "connected": connected, "state": self.state,
                "lastError": self.last_error.to_json() if self.last_error else None,
                "lastCheck": rfc3339(self.last_check(now, interval), 3),
                "latencyMs": 0.42 if connected else None, "attempts": 0,
                "nextRetryAt": (rfc3339(now + interval, 3)
                                if self.state == "disconnected" else None),
                "connectionInfo": info}


def request_digest(kind: str, params: Mapping[str, Any], deadline: float | None) -> str:
    canonical = orjson.dumps({"kind": kind, "params": params, "deadline": deadline},
                             option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(canonical).hexdigest()


def _time_filter(where: Mapping[str, Any], name: str) -> float | None:
    text = where.get(name)
    if text is None:
        return None
    try:
        return parse_rfc3339(str(text))
    except ValueError as exc:
        raise errors.InvalidParams(f"{name}: {exc}", field=f"params.filter.{name}",
                                   rule="format") from None


def _state_filter(where: Mapping[str, Any]) -> frozenset[str]:
    raw = where.get("state", ())
    return frozenset([raw] if isinstance(raw, str) else raw)


class HollowHost:
    """One simulated agent: ``alive`` (serving), ``frozen`` (answers held), restarts."""

    def __init__(self, index: int, name: str, options: HostOptions,
                 rng: random.Random | None = None) -> None:
        self.index = index
        self.name = name
        self.options = options
        self.rng = rng or random.Random(index)  # the fleet shares one (2.5 KB each)
        self.url = ""
        self.alive = True
        self.frozen = False
        self._thawed: asyncio.Event | None = None  # made when frozen (an Event per host adds up)
        self.started_at = time.monotonic()
        self.restarts = 0
        self.feed = self._new_feed()
        self.tasks: dict[str, HollowTask] = {}
        self._order: list[tuple[float, str]] = []  # (created, id): the listing order
        self._finished: list[str] = []  # finished task IDs, oldest first (retention)
        self.connection_ids: dict[str, Target] = {}
        self.targets: dict[str, Target] = {}
        self.version = 0
        self.task_version = 0  # listTasks' change token
        self.connection_version = 0  # getStorageConnectionList's
        self.generated_task: str | None = None  # the task the generator moves on
        self._drivers: dict[str, asyncio.Task[None]] = {}  # started tasks that run
        self._connections_blob: tuple[tuple[int, float], bytes] | None = None
        self._last_created = 0.0

    def _new_feed(self) -> EventFeed:
        return EventFeed(self.options.events_max, self.options.events_progress_interval)

    # -- life cycle (the server handles the sockets) --------------------------------------

    @property
    def status(self) -> str:
        return "dead" if not self.alive else "frozen" if self.frozen else "up"

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    def freeze(self) -> None:
        self.frozen = True
        if self._thawed is None or self._thawed.is_set():
            self._thawed = asyncio.Event()

    def thaw(self) -> None:
        self.frozen = False
        if self._thawed is not None:
            self._thawed.set()

    async def while_frozen(self) -> None:
        """Return when the host is not (or no longer) frozen."""
        while self.frozen and self._thawed is not None:
            await self._thawed.wait()

    def die(self) -> None:
        """The process is gone: its feed with it (waiting calls end at once)."""
        self.alive = False
        self.feed.close()

    def restart(self, reset: bool = False) -> None:
        """A new process: a new epoch and an empty feed. Tasks and connections are
        kept (a real agent keeps them in its database; unfinished tasks survive it),
        unless ``reset`` (a new state directory: nothing is left)."""
        self.feed.close()
        self.feed = self._new_feed()
        self.started_at = time.monotonic()
        self.restarts += 1
        self.alive = True
        self.thaw()
        if reset:
            for driver in self._drivers.values():
                driver.cancel()
            self.tasks.clear()
            self._order.clear()
            self._finished.clear()
            self.connection_ids.clear()
            self.targets.clear()
            self.generated_task = None
            self.changed()
            self.task_version += 1
            self.connection_version += 1

    def changed(self) -> None:
        self.version += 1

    def tasks_token(self) -> str:
        return f"{self.feed.epoch}.{self.task_version}"

    def connections_token(self) -> str:
        return f"{self.feed.epoch}.{self.connection_version}"

    def close(self) -> None:
        for driver in self._drivers.values():
            driver.cancel()
        self.feed.close()

    # -- tasks -----------------------------------------------------------------------------

    def _created_now(self) -> float:
        # Strictly increasing per host: appending keeps the (created, id) order.
        created = max(round(time.time(), 6), self._last_created + 1e-6)
        self._last_created = created
        return created

    def add_task(self, kind: str, params: dict[str, Any], task_id: str | None = None,
                 resources: tuple[str, ...] = (), deadline: float | None = None,
                 digest: str = "", publish: bool = True) -> HollowTask:
        task = HollowTask(task_id or str(uuid.uuid4()), kind, params, self._created_now(),
                          resources, deadline, digest)
        self.tasks[task.id] = task
        self._order.append((task.created, task.id))
        self._touch(task)
        if publish:
            self.feed.on_task_transition({"taskID": task.id, "kind": kind, "from": None,
                                          "to": "accepted", "at": task.created,
                                          "progress": task.progress})
        return task

    def seed_finished(self, count: int) -> None:
        """``count`` finished tasks, as an agent that has worked a while has (no events).
        They share their params, progress and result (never changed in place)."""
        for _ in range(count):
            task = self.add_task(GENERATED_KIND, _SEED_PARAMS, publish=False)
            task.state = "done"
            task.started = task.ended = task.created
            task.progress = _SEED_PROGRESS
            task.result = _SEED_RESULT
            task.pid = 100000 + self.rng.randrange(1 << 20)
            self._finished.append(task.id)

    def _touch(self, task: HollowTask) -> None:
        self.changed()
        self.task_version += 1
        task.version = self.version
        task.updated = time.time()
        task.blob = None

    def transition(self, task: HollowTask, state: str, *, error: dict[str, Any] | None = None,
                   result: Any = None) -> None:
        """A persisted state change: the task, then its event (as the agent's listener)."""
        previous = task.state
        task.state = state
        now = time.time()
        if state == "running" and task.started is None:
            task.started = now
            task.pid = 100000 + self.rng.randrange(1 << 20)
        if state in FINAL:
            task.ended = now
            task.error = error
            task.result = result
            if state == "done":
                task.progress = progress_at(PROGRESS_TOTAL)
            self._finished.append(task.id)
        self._touch(task)
        self.feed.on_task_transition({"taskID": task.id, "kind": task.kind, "from": previous,
                                      "to": state, "at": now, "progress": task.progress})
        if state in FINAL:
            self._apply_retention()

    def set_progress(self, task: HollowTask, done: int) -> None:
        task.progress = progress_at(max(done, int(task.progress.get("done") or 0)))
        self._touch(task)
        self.feed.on_task_progress({"taskID": task.id, "kind": task.kind, "state": task.state,
                                    "progress": task.progress, "at": task.updated})

    def delete_task(self, task: HollowTask) -> None:
        del self.tasks[task.id]
        index = bisect.bisect_left(self._order, (task.created, task.id))
        if index < len(self._order) and self._order[index][1] == task.id:
            del self._order[index]
        with contextlib.suppress(ValueError):
            self._finished.remove(task.id)
        self.changed()
        self.task_version += 1

    def _apply_retention(self) -> None:
        while len(self._finished) > self.options.retention:
            task = self.tasks.get(self._finished[0])
            if task is None:
                self._finished.pop(0)
                continue
            self.delete_task(task)

    def task(self, task_id: str) -> HollowTask:
        found = self.tasks.get(task_id.lower())
        if found is None:
            raise errors.TaskNotFound(f"no task {task_id}", taskID=task_id)
        return found

    def list_tasks(self, where: Mapping[str, Any], page_size: int,
                   page_token: str | None) -> tuple[list[HollowTask], str | None]:
        """One page in (createdAt, ID) order, and the token of the next one."""
        fingerprint = paging.fingerprint(where)
        start = 0
        if page_token:
            position = paging.decode_token(page_token, fingerprint, "listTasks", (float, str))
            start = bisect.bisect_right(self._order, position)
        if not where:  # the engine's resync: a slice of the order
            keys = self._order[start:start + page_size + 1]
            page = [self.tasks[task_id] for _, task_id in keys[:page_size]]
            more = len(keys) > page_size
        else:
            page, more = self._filtered(where, start, page_size)
        token = (paging.encode_token([page[-1].created, page[-1].id], fingerprint)
                 if more else None)
        return page, token

    def _filtered(self, where: Mapping[str, Any], start: int,
                  page_size: int) -> tuple[list[HollowTask], bool]:
        states = _state_filter(where)
        kind = where.get("kind")
        after = _time_filter(where, "createdAfter")
        before = _time_filter(where, "createdBefore")
        page: list[HollowTask] = []
        for created, task_id in itertools.islice(self._order, start, None):
            task = self.tasks[task_id]
            if ((states and task.state not in states) or (kind is not None and task.kind != kind)
                    or (after is not None and created <= after)
                    or (before is not None and created >= before)):
                continue
            if len(page) == page_size:
                return page, True
            page.append(task)
        return page, False

    def unfinished_holder(self, resources: tuple[str, ...]) -> tuple[str, str] | None:
        """(resource, task ID) of an unfinished task holding one of ``resources``."""
        if not resources:
            return None
        wanted = set(resources)
        for task in self.tasks.values():
            if not task.final:
                for resource in task.resources:
                    if resource in wanted:
                        return resource, task.id
        return None

    def drive(self, task: HollowTask, seconds: float) -> None:
        """Run a started task on its own: initializing, running with progress, then done
        (failed when test.sleep's ``fail`` is given, or at its deadline), or canceled."""
        driver = asyncio.get_running_loop().create_task(self._drive(task, seconds))
        self._drivers[task.id] = driver
        driver.add_done_callback(lambda _: self._drivers.pop(task.id, None))

    async def _drive(self, task: HollowTask, seconds: float) -> None:
        for state in ("initializing", "running"):
            await asyncio.sleep(0.01)
            if task.stop is not None:
                return self._stopped(task)
            self.transition(task, state)
        run_for = seconds
        late = task.deadline is not None and task.deadline - time.time() < seconds
        if task.deadline is not None and late:
            run_for = max(task.deadline - time.time(), 0.0)
        began = time.monotonic()
        tick = max(min(1.0, seconds / 5), 0.05)
        while (left := began + run_for - time.monotonic()) > 0:
            await asyncio.sleep(min(tick, left))
            if task.stop is not None:
                return self._stopped(task)
            elapsed = min(time.monotonic() - began, seconds)
            self.set_progress(task, int(PROGRESS_TOTAL * elapsed / seconds))
        if late:
            self.transition(task, "failed", error={"name": "DeadlineExceeded",
                                                   "detail": "the deadline passed"})
        elif task.kind == GENERATED_KIND and "fail" in task.params:
            self.transition(task, "failed", error={"name": "TestFailure",
                                                   "detail": str(task.params["fail"])})
        else:
            self.transition(task, "done", result=({"slept": seconds}
                                                  if task.kind == GENERATED_KIND else {}))
        return None

    def _stopped(self, task: HollowTask) -> None:
        if not task.final and self.tasks.get(task.id) is task:
            self.transition(task, "canceled", error={"name": "Canceled",
                                                     "detail": "canceled by request"})

    def request_stop(self, task: HollowTask) -> None:
        """cancelTask: an accepted task is canceled at once; a running one is asked to
        stop, and its ``canceled`` transition follows when it has (its driver sees the
        request; a task nothing drives ends 50 ms later, as a process honouring SIGTERM)."""
        if task.final:
            return
        if task.state == "accepted" and task.id not in self._drivers:
            self._stopped(task)
            return
        if task.stop is None:
            task.stop = {"reason": "cancel", "at": time.time()}
            self._touch(task)
            if task.id not in self._drivers:
                asyncio.get_running_loop().call_later(0.05, self._stopped, task)

    # -- connections -------------------------------------------------------------------

    def add_connection(self, connection_id: str, uri: str, state: str = "connected") -> Target:
        target = self.targets.get(uri)
        if target is None:
            target = Target(uri, set(), state=state,
                            probe_phase=self.rng.uniform(0, self.options.probe_interval or 1))
            self.targets[uri] = target
        target.ids.add(connection_id)
        self.connection_ids[connection_id] = target
        self._connection_changed(target)
        return target

    def remove_connection(self, connection_id: str) -> tuple[Target, bool]:
        """(its target, whether this was the last ID naming it: then it is gone)."""
        target = self.connection_ids.pop(connection_id)
        target.ids.discard(connection_id)
        last = not target.ids
        if last:
            del self.targets[target.uri]
        self._connection_changed(target)
        return target, last

    def set_connection_state(self, target: Target, state: str,
                             error: ErrorInfo | None = None) -> None:
        previous = target.state
        now = time.time()
        target.state = state
        target.changed_at = now
        if error is not None:
            target.last_error = error  # kept after recovery, as the agent does
        self._connection_changed(target)
        self.feed.on_connection(ConnectionEvent(
            connection_ids=tuple(sorted(target.ids)), uri=target.uri, old_state=previous,
            new_state=state, error=error, at=now))

    def _connection_changed(self, target: Target) -> None:
        self.changed()
        self.connection_version += 1
        target.version = self.version
        self._connections_blob = None

    def connection_list(self) -> bytes:
        """getStorageConnectionList's answer, encoded once per change and probe slot."""
        interval = self.options.probe_interval
        now = time.time()
        slot = math.floor(now / interval) if interval > 0 else 0.0
        key = (self.version, slot)
        cached = self._connections_blob
        if cached is not None and cached[0] == key:
            return cached[1]
        blob = kept(orjson.dumps({connection_id: target.status(connection_id, now, interval)
                                  for connection_id, target in self.connection_ids.items()}))
        self._connections_blob = (key, blob)
        return blob

    def connection(self, connection_id: str) -> Target:
        target = self.connection_ids.get(connection_id)
        if target is None:
            raise errors.ConnectionNotFound(f"no connection {connection_id!r}",
                                            connectionID=connection_id)
        return target
