"""What the agent and the engine count while they work: plain ints and dicts.

Nothing here takes a lock or calls into ``prometheus_client``: a call's count
and duration are a few dictionary and list operations on the hot path (the
collectors in ``metrics.agent`` and ``metrics.engine`` turn them into metric
families when ``/metrics`` is read). Counts are only ever added to from one
thread (the event loop; the engine's DB thread for resource locks), and a
scrape that reads them meanwhile sees each count either before or after an
addition, which is all a Prometheus counter promises.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

# Seconds. A ping answers in ~70 µs; verbs that touch the store or the devices
# take milliseconds; long-polls up to a minute (task_max_wait can be 10).
RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
               0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0)
# A probe is a statfs or a read of a few bytes: sub-millisecond when healthy,
# up to the probe interval (10 s by default) when it times out.
PROBE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 30.0, 60.0)
# Tasks run from a second (a checksum of a small image) to a day (a wipe of a
# large disk at a rate limit).
TASK_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                43200.0, 86400.0)
# An engine's resynchronisation of one host: a few listTasks pages and the
# connection list.
RESYNC_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                  60.0)

# The method label of calls whose method is not a verb of the API (a typo, a
# request that is not one): keeps the label's values to the schema's verbs.
OTHER_METHOD = "other"
OK = "ok"
# Outcome names of the protocol errors, whose answers carry no data.name.
PROTOCOL_ERRORS = {-32700: "ParseError", -32600: "InvalidRequest", -32601: "MethodNotFound",
                   -32602: "InvalidParams", -32603: "InternalError"}


class Histogram:
    """Observations in buckets: ``counts[i]`` holds those <= ``bounds[i]`` and above
    the bound before (not cumulative; the last slot is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs, cumulative, ending with ``+Inf``: what
        ``HistogramMetricFamily.add_metric`` takes."""
        total = 0
        buckets = []
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            buckets.append((bound, total))
        return buckets


def _le(bound: float) -> str:
    return repr(float(bound))


class LabelledHistograms:
    """One ``Histogram`` per label value (or tuple of values), made on first use."""

    __slots__ = ("bounds", "by_label")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.by_label: dict[Any, Histogram] = {}

    def observe(self, label: Any, value: float) -> None:
        histogram = self.by_label.get(label)
        if histogram is None:
            histogram = self.by_label[label] = Histogram(self.bounds)
        histogram.observe(value)


def error_name(error: Mapping[str, Any]) -> str:
    """An error answer's outcome label: its ``data.name`` (the error catalogue's
    names, docs/api.md), else the protocol error's name, else its code."""
    data = error.get("data")
    if type(data) is dict:
        name = data.get("name")
        if type(name) is str:
            return name
    code = error.get("code")
    return PROTOCOL_ERRORS.get(code, str(code)) if type(code) is int else "Unknown"


class MethodStats:
    """One verb's calls: successes, errors by outcome name, durations (``RPC_BUCKETS``)."""

    __slots__ = ("counts", "errors", "ok", "sum")

    def __init__(self) -> None:
        self.ok = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.counts = [0] * (len(RPC_BUCKETS) + 1)  # as Histogram.counts
        self.sum = 0.0

    def histogram(self) -> Histogram:
        histogram = Histogram(RPC_BUCKETS)
        histogram.counts, histogram.sum = list(self.counts), self.sum
        return histogram


class RpcStats:
    """JSON-RPC calls by method and outcome, and their durations by method.

    ``known``: the API's verbs; any other method is counted as ``other``. One
    entry per verb, made up front, so that a call costs one dictionary look-up
    and three additions (``record`` is on the hot path: about 0.5 µs)."""

    def __init__(self, known: frozenset[str]) -> None:
        self.by_method = {name: MethodStats() for name in sorted(known)}
        self.other = MethodStats()

    def entry(self, member: Any) -> MethodStats:
        try:
            return self.by_method[member["method"]]
        except (KeyError, TypeError, IndexError):  # no such verb, not a request object
            return self.other

    def record(self, member: Any, answer: Mapping[str, Any] | None, seconds: float) -> None:
        """One call answered (``answer`` None: a notification, counted ``ok``)."""
        try:
            entry = self.by_method[member["method"]]
        except (KeyError, TypeError, IndexError):
            entry = self.other
        if answer is None or "result" in answer:
            entry.ok += 1
        else:
            entry.errors[error_name(answer["error"])] += 1
        entry.counts[bisect.bisect_left(RPC_BUCKETS, seconds)] += 1
        entry.sum += seconds

    def refused(self, member: Any, outcome: str) -> None:
        """A call answered without being run (no in-flight slot, a bad body): counted,
        not timed."""
        self.entry(member).errors[outcome] += 1

    def items(self) -> list[tuple[str, MethodStats]]:
        return [*self.by_method.items(), (OTHER_METHOD, self.other)]


class ConnectionStats:
    """Probe durations and reconnect attempts, by URI scheme (connection monitors)."""

    def __init__(self) -> None:
        self.probes = LabelledHistograms(PROBE_BUCKETS)
        self.reconnects: collections.Counter[tuple[str, str]] = collections.Counter()


class FeedStats:
    """The events feed: events published by type, its readers, the gaps they met."""

    def __init__(self) -> None:
        self.published: collections.Counter[str] = collections.Counter()
        self.long_polls = 0  # getEvents calls waiting now
        # One cell per GET /events stream: the last sequence number sent to it.
        self.streams: dict[int, list[int]] = {}
        self.gaps = 0  # readers that asked for events no longer kept


@dataclasses.dataclass
class EngineStats:
    """The engine's host workers: resynchronisations and step retries."""

    resyncs: Histogram = dataclasses.field(default_factory=lambda: Histogram(RESYNC_BUCKETS))
    resync_failures: int = 0
    step_retries: int = 0
    # (change, reason) -> host leases this engine took or gave back (several engines).
    lease_changes: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter)


# "taken" / "released" -> resource locks of the engine's store. Counted by the
# store's functions on its one DB thread, which know nothing of the engine
# around them: one count per process (one engine per process, but in tests).
RESOURCE_LOCK_CHANGES: collections.Counter[str] = collections.Counter()
