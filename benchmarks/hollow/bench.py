"""CPU and memory of the hollow process, and of an engine following its hosts.

For each fleet size: a hollow process (``--tasks 10 --connections 1``, events
at ``--rate`` per host per minute: 60% task transitions, 30% progress, 10%
connection flips) and a ``vdsm-engine serve`` process (sqlite, default
settings: 30 s long-polls, a full resync every 60 s) that finds every host in
its database when it starts (written there before, as a restarted engine
finds its fleet; ``--via-api``: added by ``addHost`` batches to the running
engine instead). Once every host is up and has been listed once, a settling
pause, then a measuring window (default 120 s: two resync rounds) over which
both processes' CPU (user + system, psutil) and the requests the hollow
process served are counted; RSS and open descriptors at the end.

``python -m benchmarks.hollow.bench [--hosts 500,2000,5000] [--window S]
[--settle S] [--rate R] [--path-per-host] [--via-api] [--no-engine] [--quick]``
(``--quick``: 100 hosts, 10 s + 20 s). The processes are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import http.client
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]

from benchmarks.agents import free_port
from benchmarks.hollow import control, pages
from benchmarks.hollow.server import raise_open_files
from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.store import EngineStore, repository

ROOT = Path(__file__).resolve().parents[2]
MIX = {"task": 0.6, "progress": 0.3, "connection": 0.1}
UP_TIMEOUT = 600.0  # seconds for every host to be up once the engine started
PROBE_TIMEOUT = 30.0
FINAL = frozenset({"done", "failed", "canceled", "interrupted"})


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Sample:
    hosts: int
    mode: str
    up_s: float | None  # engine started (or hosts added) -> all up and listed once
    up: int
    added_s: float | None  # --via-api: the addHost calls
    window_s: float
    hollow_cpu: float  # percent of one core
    hollow_rss: int
    hollow_fds: int
    engine_cpu: float | None
    engine_rss: int | None
    engine_fds: int | None
    requests: dict[str, int]
    events: int  # events the hollow hosts published in the window
    latencies: list[float]  # a transition on a host -> shown by the engine's getTask
    accepted: int = 0  # connections the hollow process accepted in the window
    beside_poll: int = 0  # lists read while the host's long-poll was in flight
    # --targets: the same with FROZEN hosts frozen (probes on the others only), and
    # an engine restart: seconds to all up and listed again (None: timed out).
    frozen_latencies: list[float] = dataclasses.field(default_factory=list)
    frozen: int = 0
    restart_s: float | None = None
    restart_up: int = 0
    restarted: bool = False

    @property
    def requests_per_s(self) -> float:
        return sum(self.requests.values()) / self.window_s


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


@contextlib.contextmanager
def hollow_process(root: Path, hosts: int, rate: float,
                   path_per_host: bool) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, Any]]]:
    hosts_file = root / "hosts.json"
    argv = [sys.executable, "-m", "benchmarks.hollow", "--hosts", str(hosts), "--hosts-file",
            str(hosts_file), "--tasks", "10", "--connections", "1",
            *(f"--{kind}-rate={rate * share:g}" for kind, share in MIX.items())]
    if path_per_host:
        argv.append("--path-per-host")
    with open(root / "hollow.log", "wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not hosts_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the hollow process did not start: "
                                 f"{(root / 'hollow.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc, control.read_hosts_file(hosts_file)
    finally:
        _stop(proc)


async def preload(state: Path, hosts: Sequence[dict[str, Any]]) -> None:
    """The hosts in the engine's database (sqlite in ``state``, which exists), before it
    starts."""
    config = EngineConfig.defaults().replace(state_dir=str(state))
    await preload_url(config.database_url, hosts)


async def preload_url(url: str, hosts: Sequence[dict[str, Any]]) -> None:
    """The hosts in the engine database at ``url``, before an engine starts on it."""
    store = await EngineStore.open(url)
    try:
        now = time.time()
        for host in hosts:
            await store.run(repository.add_host, host["name"], host["url"], None, None, None,
                            False, now)
    finally:
        await store.close()


@contextlib.contextmanager
def engine_process(root: Path, database: str = "") -> Iterator[tuple[subprocess.Popen[bytes],
                                                                       str]]:
    port = free_port()
    state = root / "engine"
    argv = [sys.executable, "-m", "vdsm_agent.engine.main", "serve", "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}", "--log-level", "warning"]
    if database:
        argv += ["--database", database]
    if _engine_has_roles():
        # The benchmark reads the engine's views over loopback HTTP, where a caller
        # is anonymous: it gets what an operator's certificate would.
        argv += ["--loopback-role", "operate"]
    with open(root / "engine.log", "ab") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/jsonrpc"
        deadline = time.monotonic() + 60
        while _health(port) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the engine did not start: "
                                 f"{(root / 'engine.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield proc, url
    finally:
        _stop(proc)


@functools.cache
def _engine_has_roles() -> bool:
    """Whether ``vdsm-engine serve`` takes --loopback-role (an engine with roles)."""
    helped = subprocess.run([sys.executable, "-m", "vdsm_agent.engine.main", "serve", "--help"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    return "--loopback-role" in helped.stdout


def _health(port: int) -> dict[str, Any] | None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        return dict(orjson.loads(response.read())) if response.status == 200 else None
    except OSError:
        return None
    finally:
        connection.close()


def _wait_all_listed(engine_port: int, control_url: str, hosts: int, began: float,
                     timeout: float) -> tuple[float | None, int]:
    """Until every host is up in the engine and the hollow hosts were each listed once:
    (seconds since ``began``, or None after ``timeout`` more seconds; hosts up)."""
    up = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = _health(engine_port) or {}
        up = int((health.get("hosts") or {}).get("up", 0))
        requests = control.call(control_url, "status")["requests"]
        if up >= hosts and requests.get("listTasks", 0) >= hosts \
                and requests.get("getStorageConnectionList", 0) >= hosts:
            return time.monotonic() - began, up
        time.sleep(1.0)
    return None, up


def measure(root: Path, hosts: int, rate: float, settle: float, window: float,
            path_per_host: bool, with_engine: bool, via_api: bool = False,
            probes: int = 20, targets: bool = False) -> Sample:
    with hollow_process(root, hosts, rate, path_per_host) as (hollow, document):
        control_url = document["control"]
        hollow_ps = psutil.Process(hollow.pid)
        engine_ps = None
        up_s = added_s = None
        up = 0
        url = ""
        with contextlib.ExitStack() as stack:
            engine_stack = stack.enter_context(contextlib.ExitStack())
            if with_engine:
                if not via_api:
                    (root / "engine").mkdir()
                    asyncio.run(preload(root / "engine", document["hosts"]))
                began = time.monotonic()
                engine, url = engine_stack.enter_context(engine_process(root))
                engine_ps = psutil.Process(engine.pid)
                if via_api:
                    began = time.monotonic()
                    control.register(url, document["hosts"], timeout=3600)
                    added_s = time.monotonic() - began
                    _progress(f"{hosts} hosts added in {added_s:.1f} s")
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                up_s, up = _wait_all_listed(port, control_url, hosts, began, UP_TIMEOUT)
                _progress(f"{up}/{hosts} up" + (f" and listed {up_s:.1f} s after the start"
                                                if up_s else " (timed out)"))
            time.sleep(settle)
            control.call(control_url, "resetCounters")
            events_before = control.call(control_url, "status")["events"]
            hollow_before = _cpu(hollow_ps)
            engine_before = _cpu(engine_ps) if engine_ps else 0.0
            began = time.monotonic()
            latencies: list[float] = []
            if engine_ps is not None and probes:
                latencies = _probe_latency(control_url, url, document["hosts"], began + window,
                                           probes)
            time.sleep(max(began + window - time.monotonic(), 0))
            elapsed = time.monotonic() - began
            hollow_used = _cpu(hollow_ps) - hollow_before
            engine_used = _cpu(engine_ps) - engine_before if engine_ps else None
            status = control.call(control_url, "status")
            sample = Sample(
                hosts=hosts, mode=status["mode"], up_s=up_s, up=up, added_s=added_s,
                window_s=elapsed, hollow_cpu=hollow_used / elapsed * 100,
                hollow_rss=hollow_ps.memory_info().rss, hollow_fds=hollow_ps.num_fds(),
                engine_cpu=None if engine_used is None else engine_used / elapsed * 100,
                engine_rss=engine_ps.memory_info().rss if engine_ps else None,
                engine_fds=engine_ps.num_fds() if engine_ps else None,
                requests=dict(status["requests"]), events=status["events"] - events_before,
                latencies=latencies, accepted=int(status.get("accepted", 0)),
                beside_poll=int(status.get("listedBesidePoll", 0)))
            if targets and engine_ps is not None:
                frozen_phase(sample, control_url, url, document["hosts"], probes)
                engine_stack.close()  # SIGTERM, as an upgrade or a reboot does
                _progress("engine stopped; starting it again")
                control.call(control_url, "resetCounters")
                began = time.monotonic()
                _, url = engine_stack.enter_context(engine_process(root))
                port = int(url.rsplit(":", 1)[1].split("/")[0])
                sample.restart_s, sample.restart_up = _wait_all_listed(
                    port, control_url, hosts, began, UP_TIMEOUT)
                sample.restarted = True
                _progress(f"restart: {sample.restart_up}/{hosts} up" + (
                    f" and listed {sample.restart_s:.1f} s after the start"
                    if sample.restart_s else " (timed out)"))
            return sample


FROZEN = 100  # hosts frozen at once (--targets)
FROZEN_WINDOW = 40.0  # seconds of probes on the other hosts meanwhile


def frozen_phase(sample: Sample, control_url: str, engine_url: str,
                 hosts: Sequence[dict[str, Any]], probes: int) -> None:
    """Freeze FROZEN hosts at once (like SIGSTOP: they accept connections and never
    answer), time transitions on the others for FROZEN_WINDOW seconds, thaw."""
    frozen = list(range(min(FROZEN, len(hosts) // 2)))
    control.call(control_url, "freeze", hosts=frozen)
    sample.frozen = len(frozen)
    _progress(f"{len(frozen)} hosts frozen")
    try:
        others = range(len(frozen), len(hosts))
        sample.frozen_latencies = _probe_latency(
            control_url, engine_url, hosts, time.monotonic() + FROZEN_WINDOW,
            max(probes, 20), others)
    finally:
        control.call(control_url, "thaw", hosts=frozen)


def _probe_latency(control_url: str, engine_url: str, hosts: Sequence[dict[str, Any]],
                   until: float, probes: int,
                   choices: Sequence[int] | None = None) -> list[float]:
    """Seconds from a task transition made on a random hollow host (a control ``tick``)
    to the engine's ``getTask`` showing it, ``probes`` times spread until ``until``
    (each in its own slot of the window, at a random moment of it)."""
    rng = random.Random(1)
    start = time.monotonic()
    slot = max(until - start, 0) / probes
    latencies = []
    for number in range(probes):
        time.sleep(max(start + slot * (number + rng.random() * 0.5) - time.monotonic(), 0))
        host = rng.choice(choices) if choices else rng.randrange(len(hosts))
        name = hosts[host]["name"]
        event = control.call(control_url, "tick", hosts=[host], kind="task")[name]
        began = time.monotonic()
        while time.monotonic() - began < PROBE_TIMEOUT:
            with contextlib.suppress(control.ControlError):
                task = control.call(engine_url, "getTask", host=name,
                                    taskID=event["taskID"])["task"]
                if task["state"] == event["state"] or task["state"] in FINAL:
                    break
            time.sleep(0.005)
        latencies.append(time.monotonic() - began)
    return latencies


def _progress(line: str) -> None:
    print(f"  {line}", file=sys.stderr, flush=True)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.0f}"


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_samples(samples: Sequence[Sample], rate: float) -> None:
    print(f"\nHollow agents at {rate:g} event per host per minute "
          f"({', '.join(f'{k} {v:.0%}' for k, v in MIX.items())}); CPU in % of one core")
    header = (f"{'hosts':>6} {'mode':>5} {'up in s':>8} {'hollow CPU':>10} {'RSS MiB':>8} "
              f"{'fds':>6} {'engine CPU':>10} {'RSS MiB':>8} {'fds':>6} {'req/s':>7} "
              f"{'events/s':>8}")
    print(header)
    print("-" * len(header))
    for s in samples:
        print(f"{s.hosts:>6} {s.mode:>5} {_opt(s.up_s, '.1f'):>8} {s.hollow_cpu:>9.1f}% "
              f"{_mib(s.hollow_rss):>8} {s.hollow_fds:>6} "
              f"{_opt(s.engine_cpu, '.1f') + ('%' if s.engine_cpu is not None else ''):>10} "
              f"{_mib(s.engine_rss):>8} {_opt(s.engine_fds, 'd'):>6} "
              f"{s.requests_per_s:>7.0f} {s.events / s.window_s:>8.1f}")
    for s in samples:
        per_verb = ", ".join(f"{verb} {count / s.window_s:.1f}"
                             for verb, count in sorted(s.requests.items(),
                                                       key=lambda item: -item[1]))
        print(f"  {s.hosts} hosts, requests/s by verb: {per_verb or '-'}")
        lists = s.requests.get("listTasks", 0) + s.requests.get("getStorageConnectionList", 0)
        print(f"  {s.hosts} hosts: connections accepted {s.accepted / s.window_s:.1f}/s; "
              f"lists read beside the host's long-poll {s.beside_poll} of {lists}")
        if s.latencies:
            ordered = sorted(s.latencies)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            print(f"  {s.hosts} hosts, transition -> engine's getTask ({len(ordered)} probes): "
                  f"p50 {statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                  f"max {ordered[-1] * 1000:.0f} ms")
        if s.added_s is not None:
            print(f"  {s.hosts} hosts: addHost of all took {s.added_s:.1f} s")
        if s.up < s.hosts and s.engine_cpu is not None:
            print(f"  {s.hosts} hosts: only {s.up} up in the engine after "
                  f"{UP_TIMEOUT:.0f} s")


def _p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def _row(target: str, figure: str, met: bool | None) -> None:
    verdict = "-" if met is None else "met" if met else "MISSED"
    print(f"  {target:<72} {figure:>12}  {verdict}")


def print_targets(sample: Sample, pages: dict[str, dict[str, tuple[float, float, int]]]) -> None:
    """Each target of issue 18 (point 3) beside its figure."""
    print(f"\nTargets at {sample.hosts} hosts (figure, then met or MISSED)")
    if sample.engine_cpu is not None:
        _row("steady state, 1 event/host/min: engine CPU <= 50% of a core",
             f"{sample.engine_cpu:.1f}%", sample.engine_cpu <= 50)
    if sample.latencies:
        p99 = _p99(sample.latencies)
        _row(f"event -> engine's views, p99 <= 1 s ({len(sample.latencies)} probes)",
             f"{p99 * 1000:.0f} ms", p99 <= 1.0)
    if sample.up_s is not None or sample.engine_cpu is not None:
        _row("first start (hosts in its database): all up and listed",
             _opt(sample.up_s, ".1f") + " s", None)
    if sample.restarted:
        _row("after an engine restart: all up and resynced <= 60 s",
             (f"{sample.restart_s:.1f} s" if sample.restart_s is not None
              else f"{sample.restart_up} up, timed out"),
             sample.restart_s is not None and sample.restart_s <= 60)
    if sample.frozen_latencies:
        frozen = _p99(sample.frozen_latencies)
        calm = _p99(sample.latencies) if sample.latencies else frozen
        _row(f"{sample.frozen} hosts frozen: the others' p99 <= 1 s (unfrozen "
             f"{calm * 1000:.0f} ms)",
             f"{frozen * 1000:.0f} ms", frozen <= 1.0)
    if sample.engine_rss is not None:
        _row("engine RSS <= 1 GiB", f"{_mib(sample.engine_rss)} MiB",
             sample.engine_rss <= 2**30)
    for database, timings in pages.items():
        for label, (p50, p99, count) in timings.items():
            _row(f"{database}: {label} p99 <= 50 ms ({count} calls, p50 {p50:.1f} ms)",
                 f"{p99:.1f} ms", p99 <= 50)


def measure_pages(database: str, hosts: int, tasks: int,
                  repeat: int) -> dict[str, tuple[float, float, int]]:
    """listTasks/listHosts pages of an engine with ``tasks`` tasks in its store."""
    root = Path(tempfile.mkdtemp(prefix=f"bench-pages-{database}-"))
    try:
        with contextlib.ExitStack() as stack:
            url = ""
            if database == "postgresql":
                url = stack.enter_context(pages.postgres_database())
            began = time.monotonic()
            names = pages.fill_sync(url, root / "engine", hosts, tasks)
            _progress(f"{database}: {tasks} tasks of {hosts} hosts written in "
                      f"{time.monotonic() - began:.0f} s")
            _, engine_url = stack.enter_context(engine_process(root, url))
            port = int(engine_url.rsplit(":", 1)[1].split("/")[0])
            return pages.summary(pages.time_pages(port, names, repeat))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hollow.bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="500,2000,5000",
                        help="fleet sizes, comma-separated (default 500,2000,5000)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="events per host per minute (default 1)")
    parser.add_argument("--settle", type=float, default=30.0,
                        help="seconds after all hosts are up before measuring (default 30)")
    parser.add_argument("--window", type=float, default=120.0,
                        help="measuring window in seconds (default 120)")
    parser.add_argument("--path-per-host", action="store_true",
                        help="one port, a path per host")
    parser.add_argument("--via-api", action="store_true",
                        help="add the hosts with addHost to the running engine (default: "
                             "in its database before it starts)")
    parser.add_argument("--no-engine", action="store_true",
                        help="the hollow process alone (no engine polls it)")
    parser.add_argument("--probes", type=int, default=20,
                        help="transitions timed to the engine's view per window (default 20)")
    parser.add_argument("--targets", action="store_true",
                        help="also: 100 hosts frozen, an engine restart, and the list pages "
                             "with --page-tasks tasks in the store (sqlite, PostgreSQL); "
                             "print each target beside its figure")
    parser.add_argument("--page-tasks", type=int, default=500_000,
                        help="tasks in the store for the page timings (default 500000)")
    parser.add_argument("--page-repeat", type=int, default=40,
                        help="rounds of page calls per database (default 40)")
    parser.add_argument("--databases", default="sqlite,postgresql",
                        help="databases for the page timings (default sqlite,postgresql)")
    parser.add_argument("--quick", action="store_true", help="100 hosts, 10 s + 20 s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.__main__ import machine_line

    args = build_parser().parse_args(argv)
    sizes = [100] if args.quick else [int(size) for size in args.hosts.split(",")]
    settle, window = (10.0, 20.0) if args.quick else (args.settle, args.window)
    # Both processes inherit the limit: an engine following N hosts holds ~2 per host.
    raise_open_files(max(sizes) * 5 + 1024)
    print(machine_line())
    samples = []
    started = time.monotonic()
    for hosts in sizes:
        root = Path(tempfile.mkdtemp(prefix="bench-hollow-"))
        print(f"{hosts} hosts ...", file=sys.stderr, flush=True)
        try:
            samples.append(measure(root, hosts, args.rate, settle, window,
                                   args.path_per_host, not args.no_engine, args.via_api,
                                   args.probes, args.targets))
        except (BenchError, control.ControlError) as exc:
            print(f"bench hollow: {hosts} hosts: {exc}", file=sys.stderr)
            return 1
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print_samples(samples, args.rate)
    if args.targets:
        timings = {}
        for database in filter(None, args.databases.split(",")):
            try:
                timings[database] = measure_pages(database, sizes[-1], args.page_tasks,
                                                  args.page_repeat)
            except (BenchError, RuntimeError, OSError, AssertionError) as exc:
                print(f"bench hollow: pages on {database}: {exc}", file=sys.stderr)
        print_targets(samples[-1], timings)
    print(f"\n(the whole run took {(time.monotonic() - started) / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
