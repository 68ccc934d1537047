"""Run every benchmark and print a short table with ratios.

``python -m benchmarks`` (or ``benchmarks/run``); ``--quick`` for a smoke run.
Runs, in order: ``dispatch`` and ``http`` (ping), ``tasks``
(``bench_tasks``), ``connections`` (``bench_connections``), and, when their
modules exist, ``device_ops``, ``engine``, ``confine``, ``hollow`` and
``metrics`` (``bench_device_ops``, ``bench_engine``, ``bench_confine``,
``hollow.bench``, ``bench_metrics``: imported only then, each a
``main(argv) -> int``). One
benchmark failing does not stop the others. Exit status: 0 done, 1 a
benchmark failed, 2 a tool is missing (wrk, taskset, two CPUs; or a
benchmark said so), 3 with ``--check`` when a target is missed (rpc/bare,
the connection probe targets).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from importlib import metadata

from benchmarks import TARGET_RATIO, bench_dispatch, bench_http

# Benchmarks written as separate modules with a ``main(argv) -> int``; run only
# when the module exists (others are adding them).
OPTIONAL_MAINS = {"device_ops": "benchmarks.bench_device_ops",
                  "engine": "benchmarks.bench_engine",
                  "confine": "benchmarks.bench_confine",
                  "hollow": "benchmarks.hollow.bench",
                  "metrics": "benchmarks.bench_metrics",
                  "resync": "benchmarks.bench_resync"}
BENCHMARKS = ("dispatch", "http", "tasks", "connections", *OPTIONAL_MAINS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs for smoke use (2 rounds of 2 s, fewer calls)")
    parser.add_argument("--rounds", type=int, help="alternating HTTP rounds (default 4)")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (default 10)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per server (default 3)")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c (default 32)")
    parser.add_argument("--only", choices=BENCHMARKS, help="run one benchmark only")
    parser.add_argument("--check", action="store_true",
                        help=f"exit 3 when rpc/bare is below {TARGET_RATIO} or a connection "
                             "probe target is missed")
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


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def run_connections(quick: bool, check: bool) -> int:
    # Imported here: it pulls in the connection backends, which ping does not need.
    from benchmarks import bench_connections

    try:
        cpu, schedule = bench_connections.run(quick)
    except bench_connections.BenchError as exc:
        print(f"benchmarks: connections: {exc}", file=sys.stderr)
        return 1
    bench_connections.print_results(cpu, schedule)
    missed = (cpu.cpu_percent > bench_connections.CPU_TARGET_PERCENT
              or schedule.max_ms > bench_connections.DELAY_TARGET_MS)
    return 3 if check and missed else 0


def run_module_main(module_name: str, argv: list[str]) -> int:
    """``module.main(argv)``; an argparse exit counts as its status."""
    module = importlib.import_module(module_name)
    try:
        status = module.main(argv)
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else 1
    return int(status or 0)


def _combine(statuses: Sequence[int]) -> int:
    """One exit status for the run: a failure beats a missing tool beats a missed target."""
    for status in (1, 2, 3):
        if status in statuses:
            return status
    return 1 if any(statuses) else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 4)
    duration = args.duration or (2.0 if args.quick else 10.0)
    warmup = args.warmup or (1.0 if args.quick else 3.0)
    calls = 2_000 if args.quick else 20_000
    wanted = [args.only] if args.only else list(BENCHMARKS)
    if {"http", "tasks"} & set(wanted):  # both drive the agent with wrk
        try:
            bench_http.check_tools()
        except bench_http.BenchError as exc:
            print(f"benchmarks: {exc}", file=sys.stderr)
            return 2
    print(machine_line())
    sub_argv = ["--quick"] if args.quick else []

    def dispatch() -> int:
        print_dispatch(bench_dispatch.run(calls=calls))
        return 0

    def http() -> int:
        result = bench_http.run(rounds=rounds, duration_s=duration, warmup_s=warmup,
                                connections=args.connections, progress=_progress)
        print_http(result)
        return 3 if args.check and result.ratio < TARGET_RATIO else 0

    def tasks() -> int:
        return run_module_main("benchmarks.bench_tasks", sub_argv)

    def connections() -> int:
        return run_connections(args.quick, args.check)

    runners: dict[str, Callable[[], int]] = {
        "dispatch": dispatch, "http": http, "tasks": tasks, "connections": connections}
    for name, module_name in OPTIONAL_MAINS.items():
        runners[name] = functools.partial(run_module_main, module_name, sub_argv)

    outcomes: list[tuple[str, int | None, float]] = []  # name, status (None: absent), seconds
    for name in wanted:
        optional = OPTIONAL_MAINS.get(name)
        if optional is not None and importlib.util.find_spec(optional) is None:
            print(f"\n{name}: skipped ({optional} does not exist yet)")
            outcomes.append((name, None, 0.0))
            continue
        began = time.monotonic()
        print(f"\n== {name} ==", flush=True)
        _progress(f"running {name} ...")
        try:
            status = runners[name]()
        except bench_http.BenchError as exc:
            print(f"benchmarks: {name}: {exc}", file=sys.stderr)
            status = 1
        except Exception:
            traceback.print_exc()
            print(f"benchmarks: {name} failed", file=sys.stderr)
            status = 1
        sys.stdout.flush()
        outcomes.append((name, status, time.monotonic() - began))
    print("\nsummary: " + "; ".join(
        f"{name} {'absent' if status is None else 'ok' if status == 0 else f'exit {status}'}"
        + (f" ({seconds:.0f} s)" if status is not None else "")
        for name, status, seconds in outcomes))
    return _combine([status for _, status, _ in outcomes if status is not None])


if __name__ == "__main__":
    sys.exit(main())
