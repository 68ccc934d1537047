"""Run every benchmark and print a short table with ratios.

``python -m benchmarks`` (or ``benchmarks/run``); ``--quick`` for a smoke run.
Exit status: 0 done, 1 a benchmark failed, 2 a tool is missing (wrk,
taskset, two CPUs), 3 with ``--check`` when rpc/bare is below the target.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from importlib import metadata

from benchmarks import TARGET_RATIO, bench_dispatch, bench_http


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs for smoke use (2 rounds of 2 s, fewer calls)")
    parser.add_argument("--rounds", type=int, help="alternating HTTP rounds (default 4)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per server (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--only", choices=("http", "dispatch"), help="run one benchmark only")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 3 when rpc/bare is below {TARGET_RATIO}")
    return parser


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    """Date, CPUs, CPU model, kernel, Python and library versions, for the record."""
    versions = ", ".join(f"{name} {metadata.version(name)}"
                         for name in ("aiohttp", "jsonrpcserver", "orjson"))
    return (f"{datetime.date.today().isoformat()}; {os.cpu_count()} CPUs, {_cpu_model()}; "
            f"Linux {platform.release()}; Python {platform.python_version()}; {versions}")


def _fmt_range(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_http(result: bench_http.HttpResult) -> None:
    print(f"\nHTTP ping, wrk -t1 -c{result.connections} -d{result.duration_s:g}s, "
          f"{len(result.rpc.runs)} alternating rounds (server on CPU 0, wrk on CPU 1)")
    header = (f"{'server':<6} {'req/s median':>13} {'range':>15} {'p50 ms':>7} {'p99 ms':>7}"
              f" {'CPU µs/req':>10} {'ratio':>6}")
    print(header)
    print("-" * len(header))
    bare_median = result.bare.median_rps
    for summary in (result.rpc, result.bare):
        print(f"{summary.name:<6} {summary.median_rps:>13,.0f} {_fmt_range(summary.rps):>15}"
              f" {_opt(summary.median_of(lambda r: r.p50_ms), '.2f'):>7}"
              f" {_opt(summary.median_of(lambda r: r.p99_ms), '.2f'):>7}"
              f" {_opt(summary.median_of(lambda r: r.cpu_us_per_request), '.0f'):>10}"
              f" {summary.median_rps / bare_median:>6.2f}")
    paired = result.paired_ratios
    verdict = "met" if result.ratio >= TARGET_RATIO else "NOT met"
    print(f"rpc/bare: {result.ratio:.2f} (ratio of the medians; per round: median "
          f"{statistics.median(paired):.2f}, range {min(paired):.2f}-{max(paired):.2f}); "
          f"target >= {TARGET_RATIO}: {verdict}")


def print_dispatch(results: list[bench_dispatch.DispatchResult]) -> None:
    print("\nIn-process Dispatcher.dispatch (one event loop, this process)")
    for result in results:
        print(f"{result.body}: {result.best_us:.1f} µs/call best, "
              f"{result.median_us:.1f} median ({result.calls:,} calls x 5 repeats)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = args.warmup or (1.0 if args.quick else 3.0)
    calls = 2_000 if args.quick else 20_000
    if args.only != "dispatch":
        try:
            bench_http.check_tools()
        except bench_http.BenchError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2
    print(machine_line())
    http_result = None
    try:
        if args.only != "http":
            print_dispatch(bench_dispatch.run(calls=calls))
        if args.only != "dispatch":
            http_result = bench_http.run(
                rounds=rounds, duration_s=duration, warmup_s=warmup,
                connections=args.connections,
                progress=lambda line: print(f"  {line}", file=sys.stderr, flush=True))
            print_http(http_result)
    except bench_http.BenchError as exc:
        print(f"benchmarks: {exc}", file=sys.stderr)
        return 1
    if args.check and http_result is not None and http_result.ratio < TARGET_RATIO:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
