"""The agent's metrics: calls, tasks, connections, the events feed (docs/metrics.md).

``TaskStats`` follows the task manager (the listeners the events feed uses
too): tasks accepted and finished by kind, how long they ran, and the bytes
the data-moving kinds processed. ``agent_families`` reads everything else
when ``/metrics`` is read: the dispatcher's counts, the unfinished tasks in
memory, the connection monitors, the feed's counts and the in-flight limits.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vdsm_agent.agent import Agent
from vdsm_agent.connections.monitor import State as ConnectionState
from vdsm_agent.metrics.counters import TASK_BUCKETS, LabelledHistograms
from vdsm_agent.metrics.families import (
    build_info,
    histogram_family,
    labelled,
    rpc_families,
)
from vdsm_agent.security.limits import Limiter
from vdsm_agent.server.jsonrpc import Dispatcher
from vdsm_agent.tasks.kinds import TaskKind
from vdsm_agent.tasks.manager import TaskManager
from vdsm_agent.tasks.states import FINAL, UNFINISHED

PREFIX = "vdsm_agent"
_FINAL = frozenset(str(state) for state in FINAL)


class TaskStats:
    """Listener of the task manager's transitions and progress (on the loop)."""

    def __init__(self, kinds: Mapping[str, type[TaskKind]]) -> None:
        self.byte_kinds = frozenset(name for name, kind in kinds.items()
                                    if kind.progress_unit == "bytes")
        self.accepted: collections.Counter[str] = collections.Counter()
        self.finished: collections.Counter[tuple[str, str]] = collections.Counter()
        self.durations = LabelledHistograms(TASK_BUCKETS)  # by (kind, final state)
        self.processed: collections.Counter[str] = collections.Counter()
        self._counted: dict[str, int] = {}  # unfinished task -> its bytes counted so far

    @classmethod
    def follow(cls, manager: TaskManager) -> TaskStats:
        """Start counting ``manager``'s tasks. The bytes of tasks re-attached at
        start-up count from where they are (a previous agent counted the rest)."""
        stats = cls(manager.kinds)
        for active in manager.table.active.values():
            record = active.record
            if record.kind in stats.byte_kinds:
                stats._counted[record.id] = _done(record.progress) or 0
        manager.add_listener(stats.on_transition)
        manager.add_progress_listener(stats.on_progress)
        return stats

    def on_transition(self, change: Mapping[str, Any]) -> None:
        kind, state, task_id = str(change["kind"]), str(change["to"]), str(change["taskID"])
        if change.get("from") is None:
            self.accepted[kind] += 1
        self._count_bytes(task_id, kind, change.get("progress"))
        if state in _FINAL:
            self._counted.pop(task_id, None)
            self.finished[kind, state] += 1
            started, ended = change.get("startedAt"), change.get("endedAt")
            if started is not None and ended is not None:
                self.durations.observe((kind, state), max(0.0, ended - started))

    def on_progress(self, change: Mapping[str, Any]) -> None:
        self._count_bytes(str(change["taskID"]), str(change["kind"]), change.get("progress"))

    def _count_bytes(self, task_id: str, kind: str, progress: Any) -> None:
        if kind not in self.byte_kinds:
            return
        done = _done(progress)
        if done is None:
            return
        counted = self._counted.get(task_id, 0)
        if done > counted:
            self.processed[kind] += done - counted
            self._counted[task_id] = done


def _done(progress: Any) -> int | None:
    done = progress.get("done") if isinstance(progress, Mapping) else None
    return done if type(done) is int else None


def setup(agent: Agent, dispatcher: Dispatcher, limiter: Limiter
          ) -> Callable[[], Iterator[Metric]]:
    """Start counting the agent's tasks; the function that yields its families."""
    tasks = TaskStats.follow(agent.tasks) if agent.tasks is not None else None
    return functools.partial(agent_families, agent, dispatcher, limiter, tasks)


def agent_families(agent: Agent, dispatcher: Dispatcher, limiter: Limiter,
                   tasks: TaskStats | None) -> Iterator[Metric]:
    yield build_info(PREFIX)
    yield from rpc_families(PREFIX, dispatcher.stats)
    in_flight = GaugeMetricFamily(f"{PREFIX}_requests_in_flight",
                                  "JSON-RPC calls and streams being served, by pool (all; "
                                  "long-polls and streams).", labels=["pool"])
    in_flight.add_metric(["all"], limiter.in_flight)
    in_flight.add_metric(["long_poll"], limiter.long_polls)
    yield in_flight
    if agent.tasks is not None and tasks is not None:
        yield from _task_families(agent.tasks, tasks)
    yield from _connection_families(agent)
    yield from _feed_families(agent)


def _task_families(manager: TaskManager, stats: TaskStats) -> Iterator[Metric]:
    now: collections.Counter[tuple[str, str]] = collections.Counter(
        (active.record.kind, str(active.record.state)) for active in manager.table.active.values())
    unfinished = GaugeMetricFamily(f"{PREFIX}_tasks", "Unfinished tasks, by kind and state.",
                                   labels=["kind", "state"])
    for kind in sorted(manager.kinds):
        for state in sorted(str(state) for state in UNFINISHED):
            unfinished.add_metric([kind, state], now[kind, state])
    yield unfinished
    accepted = CounterMetricFamily(f"{PREFIX}_tasks_accepted_total",
                                   "Tasks accepted by startTask, by kind.", labels=["kind"])
    for kind in sorted(manager.kinds):
        accepted.add_metric([kind], stats.accepted[kind])
    yield accepted
    finished = CounterMetricFamily(f"{PREFIX}_tasks_finished_total",
                                   "Tasks that reached a final state, by kind and state.",
                                   labels=["kind", "state"])
    for kind in sorted(manager.kinds):
        for state in sorted(_FINAL):
            finished.add_metric([kind, state], stats.finished[kind, state])
    yield finished
    yield histogram_family(f"{PREFIX}_task_duration_seconds",
                           "How long finished tasks ran (start of their process to their "
                           "end), by kind and final state.", ["kind", "state"],
                           labelled(stats.durations))
    processed = CounterMetricFamily(f"{PREFIX}_task_processed_bytes_total",
                                    "Bytes read or written by the tasks of the kinds whose "
                                    "progress counts bytes, by kind.", labels=["kind"])
    for kind in sorted(stats.byte_kinds):
        processed.add_metric([kind], stats.processed[kind])
    yield processed


def _connection_families(agent: Agent) -> Iterator[Metric]:
    manager = agent.connections
    if manager is None:
        return
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for monitor in manager.monitors.values():
        counts[monitor.endpoint.scheme, str(monitor.health.state)] += len(monitor.ids)
    connections = GaugeMetricFamily(f"{PREFIX}_connections",
                                    "Managed storage connection IDs, by URI scheme and state.",
                                    labels=["scheme", "state"])
    for scheme in sorted(manager.backends):
        for state in ConnectionState:
            connections.add_metric([scheme, str(state)], counts[scheme, str(state)])
    yield connections
    stats = manager.pool.stats
    yield histogram_family(f"{PREFIX}_connection_probe_duration_seconds",
                           "Health probes of storage targets (timeouts included), by URI "
                           "scheme.", ["scheme"], labelled(stats.probes))
    reconnects = CounterMetricFamily(f"{PREFIX}_connection_reconnect_attempts_total",
                                     "Attempts to reconnect a disconnected target, by URI "
                                     "scheme and outcome (ok, failed).",
                                     labels=["scheme", "outcome"])
    for (scheme, outcome), count in sorted(stats.reconnects.items()):
        reconnects.add_metric([scheme, outcome], count)
    yield reconnects
    yield GaugeMetricFamily(f"{PREFIX}_connection_probe_threads_busy",
                            "Probe threads inside a probe now (hung ones included).",
                            value=manager.pool.busy)


def _feed_families(agent: Agent) -> Iterator[Metric]:
    feed = agent.events
    stats = feed.stats
    published = CounterMetricFamily(f"{PREFIX}_events_published_total",
                                    "Events published on the events feed, by type.",
                                    labels=["type"])
    for event_type in ("task", "connection", *sorted(set(stats.published) - {"task",
                                                                              "connection"})):
        published.add_metric([event_type], stats.published[event_type])
    yield published
    subscribers = GaugeMetricFamily(f"{PREFIX}_events_subscribers",
                                    "Readers following the events feed now: getEvents "
                                    "long-polls waiting and GET /events streams.",
                                    labels=["mode"])
    subscribers.add_metric(["long_poll"], stats.long_polls)
    subscribers.add_metric(["stream"], len(stats.streams))
    yield subscribers
    last = feed.last_seq
    # Unlabelled families take their one sample as ``value=``.
    yield GaugeMetricFamily(f"{PREFIX}_events_lag_events",
                            "Events published that the furthest-behind GET /events stream "
                            "has not taken yet (0 without streams).",
                            value=max((last - position[0] for position in stats.streams.values()),
                                      default=0))
    yield CounterMetricFamily(f"{PREFIX}_events_gaps_total",
                              "Reads of the feed that got gap=true (the reader missed "
                              "events: behind the kept ones, or another epoch).", value=stats.gaps)
    yield GaugeMetricFamily(f"{PREFIX}_events_retained",
                            "Events kept in memory (at most events_max).",
                            value=last - feed.oldest_seq + 1)
