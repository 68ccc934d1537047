"""What ``GET /metrics`` costs the hot path: ``ping`` throughput with a Prometheus-like
scraper reading ``/metrics`` every second, against the same agent without one.

One agent process, pinned to core 0 (``taskset -c 0``) as in ``bench_http``;
wrk on core 1 POSTs ``ping`` (``post.lua``, 32 connections). Rounds alternate
"plain" (wrk alone) and "scraped" (wrk, and a thread of this process on core
1 reading ``/metrics`` over loopback TCP once a second, as a Prometheus with
``scrape_interval: 1s`` would), in alternating order, so that drift hits both
alike; the baseline is measured in the same run. The target (docs/metrics.md,
issue 20): scraped within 2% of plain, i.e. a ratio of at least 0.98.

    python -m benchmarks.bench_metrics [--rounds 6] [--duration 10] [--quick]

Prints each round, the median ratio (and the paired ones), the scrapes' time
and size, and exits 3 with ``--check`` when the ratio is below the target.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.agents import free_port
from benchmarks.bench_http import BenchError, WrkRun, check_tools, run_wrk, server

TARGET_RATIO = 0.98
SCRAPE_INTERVAL = 1.0
SCRAPER_CPU = 1  # with wrk: the agent's core is not shared with the load


@dataclasses.dataclass(frozen=True)
class MetricsResult:
    plain: tuple[WrkRun, ...]
    scraped: tuple[WrkRun, ...]
    scrape_ms: tuple[float, ...]
    scrape_bytes: int

    @property
    def ratio(self) -> float:
        """Median scraped req/s over median plain req/s."""
        return (statistics.median(run.requests_per_s for run in self.scraped)
                / statistics.median(run.requests_per_s for run in self.plain))

    @property
    def paired_ratios(self) -> list[float]:
        return [scraped.requests_per_s / plain.requests_per_s
                for plain, scraped in zip(self.plain, self.scraped, strict=True)]


class Scraper(threading.Thread):
    """GET /metrics every ``interval`` seconds until stopped; times each scrape."""

    def __init__(self, port: int, interval: float = SCRAPE_INTERVAL) -> None:
        super().__init__(name="scraper", daemon=True)
        self.port = port
        self.interval = interval
        self.stopped = threading.Event()
        self.timings: list[float] = []
        self.size = 0
        self.error: str | None = None

    def scrape(self) -> None:
        started = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise BenchError(f"GET /metrics answered {response.status}: {body[:200]!r}")
        self.timings.append((time.perf_counter() - started) * 1000)
        self.size = len(body)

    def run(self) -> None:
        os.sched_setaffinity(0, {SCRAPER_CPU})  # this thread only (Linux: per thread)
        try:
            while not self.stopped.is_set():
                self.scrape()
                self.stopped.wait(self.interval)
        except (OSError, BenchError) as exc:
            self.error = str(exc)


def run(rounds: int = 6, duration_s: float = 10.0, warmup_s: float = 3.0,
        connections: int = 32, progress: Callable[[str], None] | None = None) -> MetricsResult:
    check_tools()
    say = progress or (lambda _: None)
    with tempfile.TemporaryDirectory(prefix="vdsm-agent-bench-") as tmp:
        workdir = Path(tmp)
        port = free_port()
        argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(workdir / "state"),
                "--listen", f"127.0.0.1:{port}", "--unix-socket", "none"]
        with server("agent", argv, port, workdir) as pid:
            say(f"warm-up ({warmup_s:g}s)")
            run_wrk(port, warmup_s, connections)
            Scraper(port).scrape()  # the first scrape builds what later ones reuse
            results: dict[str, list[WrkRun]] = {"plain": [], "scraped": []}
            timings: list[float] = []
            size = 0
            for index in range(rounds):
                order = ("plain", "scraped") if index % 2 == 0 else ("scraped", "plain")
                for mode in order:
                    scraper = Scraper(port) if mode == "scraped" else None
                    if scraper is not None:
                        scraper.start()
                    try:
                        result = run_wrk(port, duration_s, connections, pid)
                    finally:
                        if scraper is not None:
                            scraper.stopped.set()
                            scraper.join()
                    if scraper is not None:
                        if scraper.error:
                            raise BenchError(f"scraper: {scraper.error}")
                        timings += scraper.timings
                        size = scraper.size
                    if result.errors:
                        raise BenchError(f"{mode}: {result.errors} errors in round {index + 1}")
                    results[mode].append(result)
                    say(f"round {index + 1}/{rounds} {mode}: {result.requests_per_s:,.0f} req/s,"
                        f" p99 {result.p99_ms:.2f} ms")
    return MetricsResult(plain=tuple(results["plain"]), scraped=tuple(results["scraped"]),
                         scrape_ms=tuple(timings), scrape_bytes=size)


def report(result: MetricsResult) -> str:
    timings = sorted(result.scrape_ms)
    plain = statistics.median(run.requests_per_s for run in result.plain)
    scraped = statistics.median(run.requests_per_s for run in result.scraped)
    verdict = "meets" if result.ratio >= TARGET_RATIO else "MISSES"
    return "\n".join([
        f"ping, plain:   {plain:,.0f} req/s (median of {len(result.plain)})",
        f"ping, scraped: {scraped:,.0f} req/s, GET /metrics every {SCRAPE_INTERVAL:g} s",
        f"ratio scraped/plain: {result.ratio:.3f} ({verdict} the target {TARGET_RATIO}); "
        f"paired: {', '.join(f'{ratio:.3f}' for ratio in result.paired_ratios)}",
        f"scrapes: {len(timings)}, {result.scrape_bytes:,} bytes, median "
        f"{statistics.median(timings):.1f} ms, max {timings[-1]:.1f} ms (client side)",
    ])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_metrics",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3 s")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 3 when the ratio is below {TARGET_RATIO}")
    args = parser.parse_args(argv)
    rounds, duration = (2, 3.0) if args.quick else (args.rounds, args.duration)
    try:
        result = run(rounds=rounds, duration_s=duration, progress=print)
    except BenchError as exc:
        print(f"bench_metrics: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 3 if args.check and result.ratio < TARGET_RATIO else 0


if __name__ == "__main__":
    sys.exit(main())
