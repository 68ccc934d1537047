"""Storage connection monitoring: CPU cost and probe schedule delay.

* ``cpu``: a real agent process manages N ``file://`` connections (each a
  directory holding one 4 KiB file, so every probe is a statvfs plus an
  O_DIRECT read) probed every ``interval`` seconds; after they are all
  connected, the agent's CPU time (all threads, psutil) is measured over
  ``duration`` seconds. Target: at most 3% of one core for 200 connections
  at the default 10 s interval.
* ``schedule``: in-process, a ``ConnectionManager`` with N ``file://``
  connections and one target whose probe hangs (a thread stuck until the end,
  like a statfs on a frozen NFS server). The delay of every regular probe
  (actual start minus planned start) is collected from the monitors. Target:
  at most 100 ms, i.e. one hung target delays nobody.

``python -m benchmarks.bench_connections [--quick] [--check]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from benchmarks import agents
from vdsm_agent import settings
from vdsm_agent.connections import uri as uris
from vdsm_agent.connections.backends.base import Attachment, Backend
from vdsm_agent.connections.backends.file import FileBackend
from vdsm_agent.connections.manager import ConnectionManager
from vdsm_agent.connections.probes import ProbeResult

CPU_TARGET_PERCENT = 3.0
DELAY_TARGET_MS = 100.0


class BenchError(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class CpuResult:
    connections: int
    interval: float
    duration: float
    cpu_percent: float  # of one core
    probes: int  # probe verdicts seen during the window (from lastCheck changes)


@dataclasses.dataclass(frozen=True)
class ScheduleResult:
    connections: int
    interval: float
    duration: float
    samples: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    hung_probe_starts: int


def _make_dirs(root: Path, count: int) -> list[Path]:
    dirs = []
    for number in range(count):
        directory = root / f"d{number:04d}"
        directory.mkdir()
        (directory / "probe.img").write_bytes(b"\0" * 4096)
        dirs.append(directory)
    return dirs


# -- CPU of a real agent -----------------------------------------------------------------


def _call(port: int, method: str, **params: Any) -> Any:
    return agents.call(port, method, params, timeout=30, error=BenchError)


def _wait_ready(proc: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError("the agent exited during start-up")
        try:
            _call(port, "ping")
            return
        except OSError:
            time.sleep(0.1)
    raise BenchError("the agent did not answer in time")


def _wait_connected(port: int, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = _call(port, "getStorageConnectionList")
        up = sum(1 for s in listed.values() if s["managed"] and s["state"] == "connected")
        if up >= count:
            return
        time.sleep(0.5)
    raise BenchError(f"not all {count} connections connected in {timeout:g}s")


def _last_checks(port: int) -> dict[str, str]:
    listed = _call(port, "getStorageConnectionList")
    return {cid: s["lastCheck"] for cid, s in listed.items() if s["managed"]}


def run_cpu(connections: int = 200, interval: float = 10.0, duration: float = 60.0) -> CpuResult:
    with tempfile.TemporaryDirectory(prefix="vdsm-agent-bench-conn-") as tmp:
        root = Path(tmp)
        (root / "dirs").mkdir()
        directories = _make_dirs(root / "dirs", connections)
        port = agents.free_port()
        argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(root / "state"),
                "--listen", f"127.0.0.1:{port}", "--unix-socket", "none",
                "--log-level", "warning", f"--probe-interval={interval}",
                "--loopback-role", "admin"]  # loopback TCP callers are anonymous
        with open(root / "agent.log", "wb") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, port, 30)
            for number, directory in enumerate(directories):
                _call(port, "manageStorageConnection", uri=f"file://{directory}",
                      connectionID=f"bench-{number}")
            _wait_connected(port, connections, timeout=interval * 3 + 30)
            time.sleep(min(interval, 5.0))  # let start-up work settle
            agent = psutil.Process(proc.pid)
            before_checks = _last_checks(port)
            before = agent.cpu_times()
            started = time.monotonic()
            time.sleep(duration)
            after = agent.cpu_times()
            elapsed = time.monotonic() - started
            after_checks = _last_checks(port)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    used = (after.user - before.user) + (after.system - before.system)
    probes = sum(1 for cid, check in after_checks.items() if check != before_checks.get(cid))
    return CpuResult(connections, interval, elapsed, used / elapsed * 100.0, probes)


# -- schedule delay with one hung target, in-process ---------------------------------------


class HangingBackend(Backend[uris.Endpoint]):
    """``hang://name``: connects at once; every probe blocks until released."""

    scheme = "hang"
    release = threading.Event()
    starts = 0

    def parse(self, uri: str) -> uris.Endpoint:
        return uris.Endpoint(scheme="hang", uri=uri, key=uri)

    async def connect(self, endpoint: uris.Endpoint) -> Attachment:
        return Attachment(identity=endpoint.uri)

    async def disconnect(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> None:
        return None

    def probe(self, endpoint: uris.Endpoint, attachment: Attachment) -> ProbeResult:
        type(self).starts += 1
        type(self).release.wait()
        return ProbeResult.failure("EIO", "released")

    def describe(self, endpoint: uris.Endpoint, attachment: Attachment | None) -> dict[str, Any]:
        return {}


async def _schedule(connections: int, interval: float, duration: float) -> ScheduleResult:
    # The hung target's state changes are expected; keep them out of the report.
    logging.getLogger("vdsm_agent").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="vdsm-agent-bench-sched-") as tmp:
        root = Path(tmp)
        (root / "dirs").mkdir()
        directories = _make_dirs(root / "dirs", connections)
        config = settings.defaults().replace(state_dir=str(root / "state"),
                                             probe_interval=interval)
        manager = ConnectionManager(config, None,
                                    backends={"file": FileBackend, "hang": HangingBackend},
                                    rng=random.Random(1))
        HangingBackend.release.clear()
        HangingBackend.starts = 0
        await manager.start()
        try:
            await manager.manage("hung", "hang://frozen")
            for number, directory in enumerate(directories):
                await manager.manage(f"bench-{number}", f"file://{directory}")
            await asyncio.sleep(interval * 1.5)  # all connected; hung one probing
            for monitor in manager.monitors.values():
                monitor.delays.clear()
            started = time.monotonic()
            await asyncio.sleep(duration)
            elapsed = time.monotonic() - started
            delays = [delay for key, monitor in manager.monitors.items()
                      if key.startswith("file://") for delay in monitor.delays]
            hung_starts = HangingBackend.starts
        finally:
            HangingBackend.release.set()
            await manager.close()
    if not delays:
        raise BenchError("no probes were scheduled")
    delays.sort()
    p99 = delays[min(len(delays) - 1, int(len(delays) * 0.99))]
    return ScheduleResult(connections, interval, elapsed, len(delays),
                          statistics.median(delays) * 1000, p99 * 1000, delays[-1] * 1000,
                          hung_starts)


def run_schedule(connections: int = 200, interval: float = 10.0,
                 duration: float = 35.0) -> ScheduleResult:
    return asyncio.run(_schedule(connections, interval, duration))


# -- report -------------------------------------------------------------------------------------


def print_results(cpu: CpuResult | None, schedule: ScheduleResult | None) -> None:
    if cpu is not None:
        verdict = "met" if cpu.cpu_percent <= CPU_TARGET_PERCENT else "NOT met"
        print(f"\nConnection probes, CPU: {cpu.connections} file:// connections every "
              f"{cpu.interval:g}s, {cpu.duration:.0f}s window: {cpu.cpu_percent:.2f}% of one "
              f"core ({cpu.probes} connections probed in the window); "
              f"target <= {CPU_TARGET_PERCENT:g}%: {verdict}")
    if schedule is not None:
        verdict = "met" if schedule.max_ms <= DELAY_TARGET_MS else "NOT met"
        print(f"Connection probes, schedule delay with one hung target: "
              f"{schedule.connections} connections every {schedule.interval:g}s, "
              f"{schedule.samples} probes in {schedule.duration:.0f}s: p50 "
              f"{schedule.p50_ms:.2f} ms, p99 {schedule.p99_ms:.2f} ms, max "
              f"{schedule.max_ms:.2f} ms (hung probe started {schedule.hung_probe_starts}x); "
              f"target <= {DELAY_TARGET_MS:g} ms: {verdict}")


def run(quick: bool = False) -> tuple[CpuResult, ScheduleResult]:
    """Both measurements, with the --quick sizes when asked (for benchmarks/__main__)."""
    if quick:
        return (run_cpu(connections=200, interval=2.0, duration=10.0),
                run_schedule(connections=200, interval=1.0, duration=5.0))
    return run_cpu(), run_schedule()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_connections",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="short runs: 2 s interval, 10 s CPU window; 1 s interval, 5 s "
                             "schedule window")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--interval", type=float, help="probe interval (default 10)")
    parser.add_argument("--duration", type=float, help="CPU window in seconds (default 60)")
    parser.add_argument("--only", choices=("cpu", "schedule"))
    parser.add_argument("--check", action="store_true",
                        help="exit 3 when a target is not met")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interval = args.interval or (2.0 if args.quick else 10.0)
    duration = args.duration or (10.0 if args.quick else 60.0)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    cpu = schedule = None
    try:
        if args.only != "schedule":
            cpu = run_cpu(args.connections, interval, duration)
        if args.only != "cpu":
            schedule = run_schedule(args.connections, 1.0 if args.quick else interval,
                                    5.0 if args.quick else max(duration, interval * 3.5))
    except BenchError as exc:
        print(f"bench_connections: {exc}", file=sys.stderr)
        return 1
    print_results(cpu, schedule)
    missed = ((cpu is not None and cpu.cpu_percent > CPU_TARGET_PERCENT)
              or (schedule is not None and schedule.max_ms > DELAY_TARGET_MS))
    return 3 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
