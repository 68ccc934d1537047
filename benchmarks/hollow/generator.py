"""Background activity of the hollow hosts: events at configured rates.

Three kinds of tick, each at its own rate in events per host per minute:

* ``task``: the host's generated task (a ``test.sleep`` nobody started: an
  external task to the engine) makes its next transition, ``accepted`` ->
  ``initializing`` -> ``running`` -> ``done``, and a new one is accepted
  after that (one event per tick; a new task and an ended one also make the
  engine fetch it with ``getTask``);
* ``progress``: the generated task's progress moves (a host whose generated
  task is not running makes its next transition instead: an event either way);
* ``connection``: one managed connection of the host flips ``connected`` <->
  ``degraded`` (with a probe error on the way down).

Ticks are spread evenly: each host's ticks of one kind come every 60/rate
seconds, at a random phase, so the load is flat (no thundering herd). One
timer heap for all hosts and kinds wakes the loop only when something is due.
Dead and frozen hosts tick nothing (their processes are gone or stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from benchmarks.hollow.state import (
    GENERATED_KIND,
    NEXT_STATE,
    PROGRESS_TOTAL,
    HollowHost,
    Target,
)
from benchmarks.hollow.verbs import probe_error

KINDS = ("task", "progress", "connection")


def tick(host: HollowHost, kind: str) -> dict[str, Any] | None:
    """One event of ``kind`` on ``host`` now; the event published, or None (a
    connection tick on a host without connections)."""
    before = host.feed.last_seq
    if kind == "task":
        _advance_task(host)
    elif kind == "progress":
        _move_progress(host)
    elif kind == "connection":
        if not _flip_connection(host):
            return None
    else:
        raise ValueError(f"unknown tick kind {kind!r} (one of {', '.join(KINDS)})")
    if host.feed.last_seq == before:
        return None
    return host.feed.read(before, max_events=1).events[0]


def _advance_task(host: HollowHost) -> None:
    task = host.tasks.get(host.generated_task or "")
    if task is None or task.final:
        task = host.add_task(GENERATED_KIND, {"seconds": 60, "hollow": True})
        host.generated_task = task.id
        return
    host.transition(task, NEXT_STATE[task.state],
                    result={"slept": 60} if NEXT_STATE[task.state] == "done" else None)


def _move_progress(host: HollowHost) -> None:
    task = host.tasks.get(host.generated_task or "")
    if task is None or task.state != "running":
        _advance_task(host)
        return
    done = int(task.progress.get("done") or 0)
    host.set_progress(task, min(done + PROGRESS_TOTAL // 10, PROGRESS_TOTAL - 1))


def _flip_connection(host: HollowHost) -> bool:
    targets = [target for target in host.targets.values()
               if target.state in ("connected", "degraded")]
    if not targets:
        return False
    target: Target = host.rng.choice(targets)
    if target.state == "connected":
        host.set_connection_state(target, "degraded", probe_error(
            "ETIMEDOUT", f"statvfs of {target.uri}: timed out (hollow)"))
    else:
        host.set_connection_state(target, "connected")
    return True


class EventGenerator:
    """Ticks every host at ``rates`` (events per host per minute, per kind)."""

    def __init__(self, hosts: Sequence[HollowHost], rates: Mapping[str, float],
                 seed: int = 0) -> None:
        self.hosts = hosts
        self.rates = {kind: 0.0 for kind in KINDS}
        self.rng = random.Random(seed)
        self.ticks = 0
        self._heap: list[tuple[float, int, str]] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.set_rates(rates)

    def set_rates(self, rates: Mapping[str, float]) -> dict[str, float]:
        for kind, rate in rates.items():
            if kind not in KINDS:
                raise ValueError(f"unknown rate {kind!r} (one of {', '.join(KINDS)})")
            if rate < 0:
                raise ValueError(f"rate {kind} must be >= 0")
            self.rates[kind] = float(rate)
        self._schedule(time.monotonic())
        self._changed.set()
        return dict(self.rates)

    def _schedule(self, now: float) -> None:
        """Every host's next tick of every kind, at a random phase of its period."""
        heap = []
        for kind, rate in self.rates.items():
            if rate > 0:
                period = 60.0 / rate
                heap += [(now + self.rng.uniform(0, period), index, kind)
                         for index in range(len(self.hosts))]
        heapq.heapify(heap)
        self._heap = heap

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="hollow ticks")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self._changed.clear()
            now = time.monotonic()
            due = self._pop_due(now)
            for index, kind in due:
                host = self.hosts[index]
                if host.alive and not host.frozen:
                    tick(host, kind)
                    self.ticks += 1
            wait = self._heap[0][0] - time.monotonic() if self._heap else 3600.0
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._changed.wait()

    def _pop_due(self, now: float) -> Iterable[tuple[int, str]]:
        due = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            at, index, kind = heapq.heappop(heap)
            due.append((index, kind))
            rate = self.rates[kind]
            if rate > 0:
                # From the planned time, not now: a late wake-up does not slow the rate.
                heapq.heappush(heap, (at + 60.0 / rate, index, kind))
        return due
