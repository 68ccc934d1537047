"""Metric families both programs expose: build info, JSON-RPC calls, the registry.

Families are built by ``prometheus_client`` (``*MetricFamily``); its text
exposition (``generate_latest``) writes them. Names follow Prometheus'
conventions: a ``vdsm_agent_`` or ``vdsm_engine_`` prefix, base units in the
name (``_seconds``, ``_bytes``), ``_total`` on counters (docs/metrics.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vdsm_agent import API_VERSION, __version__
from vdsm_agent.metrics.counters import OK, Histogram, LabelledHistograms, RpcStats


class FunctionCollector(Collector):
    """A collector whose families come from a function, called at each scrape."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()

    def describe(self) -> Iterable[Metric]:
        return ()  # nothing to check at registration (a registry of our own)


def registry(collect: Callable[[], Iterable[Metric]]) -> CollectorRegistry:
    """A registry of ``collect``'s families and the process' own (CPU, memory,
    descriptors, start time, garbage collector; python_info): one per program,
    not prometheus_client's global one, so that two programs in one process
    (tests) each expose their own."""
    metrics = CollectorRegistry()
    metrics.register(FunctionCollector(collect))
    ProcessCollector(registry=metrics)
    PlatformCollector(registry=metrics)
    GCCollector(registry=metrics)
    return metrics


def build_info(prefix: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{prefix}_build_info",
                               "Always 1; the version and API version as labels.",
                               labels=["version", "api_version"])
    family.add_metric([__version__, API_VERSION], 1)
    return family


def histogram_family(name: str, documentation: str, labels: list[str],
                     histograms: Iterable[tuple[list[str], Histogram]]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=labels)
    for values, histogram in histograms:
        family.add_metric(values, histogram.cumulative(), histogram.sum)
    return family


def labelled(histograms: LabelledHistograms) -> Iterator[tuple[list[str], Histogram]]:
    """A ``LabelledHistograms``'s entries as label values (a label or a tuple of them)."""
    for label, histogram in sorted(histograms.by_label.items()):
        yield (list(label) if isinstance(label, tuple) else [label]), histogram


def rpc_families(prefix: str, stats: RpcStats) -> Iterator[Metric]:
    """Calls by method and outcome (every verb's ``ok``, zero too, so that the
    series exist from the start) and durations of the verbs called at least once."""
    calls = CounterMetricFamily(f"{prefix}_rpc_calls_total",
                                "JSON-RPC calls answered, by method and outcome (ok, or the "
                                "error's name).", labels=["method", "outcome"])
    durations = []
    for method, entry in stats.items():
        calls.add_metric([method, OK], entry.ok)
        for outcome, count in sorted(entry.errors.items()):
            calls.add_metric([method, outcome], count)
        if entry.sum or any(entry.counts):
            durations.append(([method], entry.histogram()))
    yield calls
    yield histogram_family(f"{prefix}_rpc_duration_seconds",
                           "Time from a call's parsed request to its answer, by method.",
                           ["method"], durations)
