"""The engine's metrics: calls, hosts, resynchronisations, steps, resource locks.

The worker counts resynchronisations and step retries in ``Engine.stats``;
the store counts resource lock changes on its DB thread in
``counters.RESOURCE_LOCK_CHANGES`` (the engine's "leases": what a host's
resources are held by, for engine-started tasks). docs/metrics.md.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.states import HostStatus
from vdsm_agent.metrics.counters import RESOURCE_LOCK_CHANGES
from vdsm_agent.metrics.families import build_info, histogram_family, rpc_families
from vdsm_agent.server.jsonrpc import Dispatcher

PREFIX = "vdsm_engine"


def setup(engine: Engine, dispatcher: Dispatcher) -> Callable[[], Iterator[Metric]]:
    """The function that yields the engine's families."""
    return functools.partial(engine_families, engine, dispatcher)


def engine_families(engine: Engine, dispatcher: Dispatcher) -> Iterator[Metric]:
    yield build_info(PREFIX)
    yield from rpc_families(PREFIX, dispatcher.stats)
    statuses = collections.Counter(str(host.status) for host in engine.hosts())
    hosts = GaugeMetricFamily(f"{PREFIX}_hosts", "Registered hosts, by status.",
                              labels=["status"])
    for status in HostStatus:
        hosts.add_metric([str(status)], statuses[str(status)])
    yield hosts
    stats = engine.stats
    yield histogram_family(f"{PREFIX}_resync_duration_seconds",
                           "Full resynchronisations of a host (every listTasks page and "
                           "the connection list, into the store) that succeeded.", [],
                           [([], stats.resyncs)])
    yield CounterMetricFamily(f"{PREFIX}_resync_failures_total",
                              "Resynchronisations that failed (the host did not answer, "
                              "or refused).", value=stats.resync_failures)
    yield CounterMetricFamily(f"{PREFIX}_step_retries_total",
                              "Job step attempts that got no answer from their host "
                              "(the step stays pending and is tried again).",
                              value=stats.step_retries)
    locks = CounterMetricFamily(f"{PREFIX}_resource_lock_changes_total",
                                "Resource locks (leases on a host's resources for "
                                "engine-started tasks) taken and released.",
                                labels=["change"])
    for change in ("taken", "released"):
        locks.add_metric([change], RESOURCE_LOCK_CHANGES[change])
    yield locks
    leases = CounterMetricFamily(f"{PREFIX}_host_lease_changes_total",
                                 "Host leases this engine took (reason: expired, a host "
                                 "nobody held or whose lease ran out) or gave back "
                                 "(rebalance, stop, lost, fenced); several engines on "
                                 "PostgreSQL only.", labels=["change", "reason"])
    for (change, reason), count in sorted(stats.lease_changes.items()):
        leases.add_metric([change, reason], count)
    yield leases
