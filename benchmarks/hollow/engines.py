"""What leases cost a whole engine: one and two engines on PostgreSQL at N hollow hosts.

Issue 19: bench_failover times a lease tick and a fenced store call in isolation;
this runs whole ``vdsm-engine serve`` processes against one hollow process
(``bench.hollow_process``: 1 event per host per minute by default) in turn:

* ``sqlite:1``: one engine on sqlite (no leases; the hollow bench's engine);
* ``postgresql:1``: one engine on PostgreSQL: it leases every host (any engine
  on PostgreSQL does: ``vdsm_agent/engine/engine.py``), its workers' store calls
  are fenced, it listens for and relays changes, reads its peers;
* ``postgresql:2``: two engines on one PostgreSQL sharing the hosts (half each).

Each starts with the hosts in its database (as a restarted engine finds its fleet),
waits until every host is up and was listed once, settles, then measures over a
window: each engine's CPU (% of one core), RSS, the PostgreSQL cluster's CPU (the
postmaster and its backends), transitions -> the first engine's ``getTask``
(p50/p99; on two engines half the probed hosts are the other engine's), and from
``pg_stat_statements`` (preloaded: the cluster is restarted once) the tick's
statements (calls, mean and max ms) and the lease statements' share of the
database's time.

``python -m benchmarks.hollow.engines [--hosts 5000] [--configs sqlite:1,postgresql:1,
postgresql:2] [--window 120] [--settle 20] [--rate 1] [--probes 20]``. Needs root and
PostgreSQL 15 (the tests' throwaway cluster, ``tests.engine_support``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

from benchmarks.hollow import bench, control
from benchmarks.hollow.server import raise_open_files

# The tick's statements (store/leases.py: tick), and what else is about leases, as
# pg_stat_statements normalizes them (a prefix of the query text each).
TICK = {
    "heartbeat": "UPDATE engines SET heartbeat_at",
    "renewal": "UPDATE host_leases AS l SET expires_at",
    "live engines": "SELECT id FROM engines WHERE heartbeat_at",
    "host count": "SELECT count(*) FROM host",
}
LEASE_WORDS = ("host_leases", "engines")


@dataclasses.dataclass
class Run:
    config: str
    hosts: int
    up_s: float | None
    window_s: float
    engine_cpu: list[float]  # % of one core, per engine
    engine_rss: list[int]
    postgres_cpu: float | None
    latencies: list[float]
    events: int
    statements: dict[str, tuple[int, float, float]]  # tick statement -> calls, mean, max ms
    lease_share: float | None  # lease statements' part of the database's exec time
    db_ms_per_s: float | None  # the database's exec time per second of window
    lease_top: list[tuple[str, int, float]] = dataclasses.field(default_factory=list)


@contextlib.contextmanager
def postgres_with_statements() -> Iterator[tuple[str, Any]]:
    """The tests' throwaway cluster, restarted once with pg_stat_statements preloaded;
    (database URL, server)."""
    support = importlib.import_module("tests.engine_support")
    server = support.start_postgres()
    try:
        with contextlib.closing(server.admin()) as conn, conn.cursor() as cursor:
            cursor.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
        # pg_ctl restart reuses the options the cluster was started with (postmaster.opts).
        subprocess.run(["runuser", "-u", "postgres", "--", str(support.PG_BIN / "pg_ctl"),
                        "-D", str(server.data), "-l", str(server.root / "postgres.log"), "-w",
                        "-t", "60", "-m", "fast", "restart"],
                       check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=120)
        name = server.create_database()
        with contextlib.closing(_connect(server, name)) as conn, conn.cursor() as cursor:
            cursor.execute("CREATE EXTENSION pg_stat_statements")
        yield server.url(name), server
    finally:
        server.stop()


def _connect(server: Any, database: str) -> Any:
    import psycopg2  # type: ignore[import-untyped]

    conn = psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres",
                            dbname=database, connect_timeout=10)
    conn.autocommit = True
    return conn


def _statements(server: Any, database: str) -> list[tuple[str, int, float, float]]:
    with contextlib.closing(_connect(server, database)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT s.query, s.calls, s.total_exec_time, s.max_exec_time "
                       "FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
                       "WHERE d.datname = current_database()")
        return [(str(q), int(c), float(t), float(m)) for q, c, t, m in cursor.fetchall()]


def _reset_statements(server: Any, database: str) -> None:
    with contextlib.closing(_connect(server, database)) as conn, conn.cursor() as cursor:
        cursor.execute("SELECT pg_stat_statements_reset()")


def _cluster_cpu(server: Any) -> float:
    """CPU seconds of the postmaster and its live children (backends, writers)."""
    pid = server.pid()
    if pid is None:
        return 0.0
    main = psutil.Process(pid)
    total = 0.0
    for process in [main, *main.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += bench._cpu(process)
    return total


def measure(root: Path, config: str, document: dict[str, Any], settle: float, window: float,
            probes: int) -> Run:
    database, count = config.split(":")
    engines = int(count)
    hosts = document["hosts"]
    control_url = document["control"]
    with contextlib.ExitStack() as stack:
        url, server = "", None
        if database == "postgresql":
            url, server = stack.enter_context(postgres_with_statements())
            asyncio.run(bench.preload_url(url, hosts))
        else:
            (root / "e0" / "engine").mkdir(parents=True)
            asyncio.run(bench.preload(root / "e0" / "engine", hosts))
        began = time.monotonic()
        started = []
        for number in range(engines):
            (root / f"e{number}").mkdir(exist_ok=True)
            proc, engine_url = stack.enter_context(bench.engine_process(root / f"e{number}",
                                                                        url))
            started.append((psutil.Process(proc.pid), engine_url))
        up_s = _wait_up([u for _, u in started], control_url, len(hosts), began)
        bench._progress(f"{config}: " + (f"all up and listed {up_s:.1f} s after the start"
                                         if up_s is not None else "not all up (timed out)"))
        time.sleep(settle)
        if server is not None:
            _reset_statements(server, url.rsplit("/", 1)[1])
        events_before = control.call(control_url, "status")["events"]
        cpu_before = [bench._cpu(ps) for ps, _ in started]
        pg_before = _cluster_cpu(server) if server is not None else 0.0
        began = time.monotonic()
        latencies = bench._probe_latency(control_url, started[0][1], hosts, began + window,
                                         probes) if probes else []
        time.sleep(max(began + window - time.monotonic(), 0))
        elapsed = time.monotonic() - began
        run = Run(config=config, hosts=len(hosts), up_s=up_s, window_s=elapsed,
                  engine_cpu=[(bench._cpu(ps) - before) / elapsed * 100
                              for (ps, _), before in zip(started, cpu_before, strict=True)],
                  engine_rss=[ps.memory_info().rss for ps, _ in started],
                  postgres_cpu=None, latencies=latencies,
                  events=control.call(control_url, "status")["events"] - events_before,
                  statements={}, lease_share=None, db_ms_per_s=None)
        if server is not None:
            run.postgres_cpu = (_cluster_cpu(server) - pg_before) / elapsed * 100
            _read_statements(run, _statements(server, url.rsplit("/", 1)[1]))
        return run


def _read_statements(run: Run, rows: Sequence[tuple[str, int, float, float]]) -> None:
    total = sum(t for _, _, t, _ in rows) or 1e-9
    lease = sum(t for q, _, t, _ in rows if any(word in q for word in LEASE_WORDS))
    run.lease_share = lease / total
    run.db_ms_per_s = total / run.window_s
    leases = sorted((r for r in rows if any(word in r[0] for word in LEASE_WORDS)),
                    key=lambda r: -r[2])
    run.lease_top = [(" ".join(q.split())[:90], c, t) for q, c, t, _ in leases[:3]]
    for label, prefix in TICK.items():
        matched = [(c, t, m) for q, c, t, m in rows if q.startswith(prefix)]
        calls = sum(c for c, _, _ in matched)
        if calls:
            run.statements[label] = (calls, sum(t for _, t, _ in matched) / calls,
                                     max(m for _, _, m in matched))


def _wait_up(urls: Sequence[str], control_url: str, hosts: int, began: float) -> float | None:
    """Until the engines count every host up between them and each hollow host was listed."""
    ports = [int(u.rsplit(":", 1)[1].split("/")[0]) for u in urls]
    deadline = time.monotonic() + bench.UP_TIMEOUT
    while time.monotonic() < deadline:
        up = sum(int(((bench._health(port) or {}).get("hosts") or {}).get("up", 0))
                 for port in ports)
        requests = control.call(control_url, "status")["requests"]
        if up >= hosts and requests.get("listTasks", 0) >= hosts \
                and requests.get("getStorageConnectionList", 0) >= hosts:
            return time.monotonic() - began
        time.sleep(1.0)
    return None


def print_runs(runs: Sequence[Run]) -> None:
    print("\nconfig        up s  engine CPU (each)   sum  RSS MiB (each)   PostgreSQL CPU  "
          "getTask p50/p99 ms  events/s")
    for r in runs:
        cpus = " + ".join(f"{c:.1f}" for c in r.engine_cpu)
        rss = " + ".join(f"{v / 2**20:.0f}" for v in r.engine_rss)
        pg = "-" if r.postgres_cpu is None else f"{r.postgres_cpu:.1f}%"
        lat = "-"
        if r.latencies:
            p50, p99 = statistics.median(r.latencies), bench._p99(r.latencies)
            lat = f"{p50 * 1000:.0f}/{p99 * 1000:.0f}"
        print(f"{r.config:<12} {bench._opt(r.up_s, '.0f'):>5}  {cpus:>17}% "
              f"{sum(r.engine_cpu):>5.1f}% {rss:>15}  {pg:>14}  {lat:>18}  "
              f"{r.events / r.window_s:>8.1f}")
    for r in runs:
        if r.db_ms_per_s is None:
            continue
        parts = ", ".join(f"{label} {calls} calls mean {mean:.2f} ms max {peak:.1f} ms"
                          for label, (calls, mean, peak) in r.statements.items())
        tick = sum(mean for _, mean, _ in r.statements.values())
        print(f"  {r.config}: database exec {r.db_ms_per_s:.1f} ms/s, lease statements "
              f"{(r.lease_share or 0):.1%} of it; a tick's statements {tick:.2f} ms: "
              f"{parts or '-'}")
        for query, calls, total in r.lease_top:
            print(f"    {calls / r.window_s:7.1f}/s {total / r.window_s:6.2f} ms/s  {query}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.hollow.engines",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5000, help="hollow hosts (default 5000)")
    parser.add_argument("--configs", default="sqlite:1,postgresql:1,postgresql:2",
                        help="DATABASE:ENGINES, comma-separated (default "
                             "sqlite:1,postgresql:1,postgresql:2)")
    parser.add_argument("--rate", type=float, default=1.0,
                        help="events per host per minute (default 1)")
    parser.add_argument("--settle", type=float, default=20.0,
                        help="seconds after all hosts are up before measuring (default 20)")
    parser.add_argument("--window", type=float, default=120.0,
                        help="measuring window in seconds (default 120)")
    parser.add_argument("--probes", type=int, default=20,
                        help="transitions timed to the first engine's getTask (default 20)")
    return parser


def parse_configs(text: str) -> list[str]:
    configs = [word.strip() for word in text.split(",") if word.strip()]
    for config in configs:
        database, _, count = config.partition(":")
        if database not in ("sqlite", "postgresql") or not count.isdigit() or int(count) < 1 \
                or (database == "sqlite" and int(count) != 1):
            raise SystemExit(f"--configs: {config!r}: want sqlite:1 or postgresql:N (N >= 1)")
    return configs


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.__main__ import machine_line

    args = build_parser().parse_args(argv)
    configs = parse_configs(args.configs)
    raise_open_files(args.hosts * 5 + 1024)
    print(machine_line())
    print(f"load average at the start: {' '.join(f'{v:.2f}' for v in psutil.getloadavg())}")
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="bench-engines-"))
    runs = []
    try:
        with bench.hollow_process(root, args.hosts, args.rate, False) as (_, document):
            for config in configs:
                bench._progress(f"{config} ...")
                control.call(document["control"], "resetCounters")
                run_root = root / config.replace(":", "-")
                run_root.mkdir()
                runs.append(measure(run_root, config, document, args.settle, args.window,
                                    args.probes))
    except (bench.BenchError, control.ControlError, subprocess.SubprocessError) as exc:
        print(f"bench engines: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_runs(runs)
    print(f"load average at the end: {' '.join(f'{v:.2f}' for v in psutil.getloadavg())}")
    print(f"(the whole run took {(time.monotonic() - started) / 60:.1f} minutes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
