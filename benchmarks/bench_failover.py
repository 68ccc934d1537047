"""Several engines on one PostgreSQL (issue 19): how long a killed engine's hosts
stay unpolled, and what the leases cost.

* **takeover**: a throwaway PostgreSQL, ``--agents`` real agents and two real
  ``vdsm-engine serve`` processes (``--lease-time``). Each round waits until the
  hosts are spread (half each) and up, kills one engine with SIGKILL (the
  engines take turns), and times until the survivor holds every lease
  (polling the database every 20 ms), and until the survivor's own answers
  show every host ``up`` again. The killed engine is started again for the
  next round. p50 / p95 / max over ``--kills`` rounds. The bound is
  ``lease_time`` plus one tick of the survivor (``lease_time / 3``).
* **renewal**: ``--hosts`` hosts in a fresh database, two engines registered,
  one ``store.leases.tick`` of each until they hold half the hosts each; then
  ``--ticks`` ticks of one engine (heartbeat + renewal of its leases in one
  statement + the fair-share counts), timed on the caller's side; and the
  fence's cost: a fenced empty call against an unfenced one.

    python -m benchmarks.bench_failover [--kills 20] [--agents 4] [--lease-time 10]
                                        [--hosts 5000] [--ticks 200] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vdsm_agent.engine.store import EngineStore
from vdsm_agent.engine.store import leases as store_leases
from vdsm_agent.engine.store.db import FENCE
from vdsm_agent.engine.store.leases import Fence
from vdsm_agent.engine.store.models import HostRow


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def describe(label: str, values: Sequence[float], unit: str = "s", scale: float = 1.0) -> str:
    return (f"{label}: p50 {statistics.median(values) * scale:.3f} {unit}, "
            f"p95 {percentile(values, 0.95) * scale:.3f} {unit}, "
            f"max {max(values) * scale:.3f} {unit} (n={len(values)})")


@contextlib.contextmanager
def postgres() -> Iterator[Any]:
    """The tests' throwaway cluster (root, PostgreSQL 15 from scripts/bootstrap)."""
    server = importlib.import_module("tests.engine_support").start_postgres()
    try:
        yield server
    finally:
        server.stop()


def takeover(server: Any, root: Path, kills: int, agents: int, lease_time: float) -> int:
    support = importlib.import_module("tests.engine_support")
    ha = importlib.import_module("tests.ha_support")
    name = server.create_database()
    url = server.url(name)
    lost: list[float] = []
    up: list[float] = []
    with support.fleet(root / "agents", agents) as fleet, \
            ha.engines(root, url, 2, lease_time=lease_time) as pair:
        db = ha.Database(server, name)
        for agent in fleet:
            pair[0].call("addHost", name=agent.name, url=agent.url)
        half = [agents // 2, agents - agents // 2]
        for round_ in range(kills):
            ha.wait_for(lambda: db.spread() == half, timeout=10 * lease_time)
            victim, survivor = pair[round_ % 2], pair[1 - round_ % 2]
            ha.wait_for(lambda s=survivor: all(host["status"] == "up" for host in
                                               s.call("listHosts")["hosts"]), timeout=60)
            pid = str(survivor.proc.pid)
            killed = time.monotonic()
            victim.kill()
            ha.wait_for(lambda p=pid: list(db.owners().values()) == [p] * agents,
                        timeout=10 * lease_time, interval=0.02)
            lost.append(time.monotonic() - killed)
            ha.wait_for(lambda s=survivor: all(
                host["status"] == "up" and host["polledBy"] is not None
                and host["polledBy"].endswith(f":{s.proc.pid}")
                for host in s.call("listHosts")["hosts"]), timeout=60, interval=0.02)
            up.append(time.monotonic() - killed)
            print(f"  kill {round_ + 1}/{kills}: leases {lost[-1]:.2f} s, "
                  f"hosts up {up[-1]:.2f} s", flush=True)
            victim.start()
        db.close()
    server.drop_database(name)
    print(f"takeover, {agents} hosts, 2 engines, lease_time {lease_time} s "
          f"(bound {lease_time + lease_time / 3:.1f} s + the worker's start):")
    print("  " + describe("every lease held by the survivor", lost))
    print("  " + describe("every host up from the survivor", up))
    return 0


async def renewal(server: Any, hosts: int, ticks: int) -> None:
    name = server.create_database()
    store = await EngineStore.open(server.url(name))
    try:
        await store.run(_fill_hosts, hosts)
        for engine_id in ("a", "b"):
            await store.run(store_leases.register_engine, engine_id, engine_id, 1, "0", 3)
        for _ in range(3):  # both take their share
            for engine_id in ("a", "b"):
                await store.run(store_leases.tick, engine_id, 60.0)
        held = await store.run(store_leases.tick, "a", 60.0)
        timings = []
        for _ in range(ticks):
            began = time.perf_counter()
            await store.run(store_leases.tick, "a", 60.0)
            timings.append(time.perf_counter() - began)
        host = sorted(held.held)[0]
        fence = Fence(host, "a", held.held[host][0])
        plain, fenced = [], []
        for _ in range(ticks):
            began = time.perf_counter()
            await store.run(_nothing)
            plain.append(time.perf_counter() - began)
            token = FENCE.set(fence)
            try:
                began = time.perf_counter()
                await store.run(_nothing)
                fenced.append(time.perf_counter() - began)
            finally:
                FENCE.reset(token)
        print(f"renewal, {hosts} hosts, 2 engines ({len(held.held)} leases renewed per tick):")
        print("  " + describe("one tick (heartbeat, renewal, counts)", timings, "ms", 1000))
        print("  " + describe("an empty store call", plain, "ms", 1000))
        print("  " + describe("the same call fenced", fenced, "ms", 1000))
    finally:
        await store.close()
        server.drop_database(name)


def _fill_hosts(count: int) -> None:
    now = time.time()
    rows = [{"name": f"hollow{index:05d}", "url": f"http://127.0.0.1:1/h{index}",
             "status": "connecting", "created_at": now} for index in range(count)]
    for start in range(0, len(rows), 500):
        HostRow.insert_many(rows[start:start + 500]).execute()


def _nothing() -> None:
    return None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_failover", description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--lease-time", type=float, default=10.0)
    parser.add_argument("--hosts", type=int, default=5000)
    parser.add_argument("--ticks", type=int, default=200)
    parser.add_argument("--skip-takeover", action="store_true")
    parser.add_argument("--quick", action="store_true", help="3 kills, lease_time 2 s, 500 hosts")
    options = parser.parse_args(argv)
    if options.quick:
        options.kills, options.lease_time, options.hosts, options.ticks = 3, 2.0, 500, 50
    with postgres() as server:
        asyncio.run(renewal(server, options.hosts, options.ticks))
        if not options.skip_takeover:
            with tempfile.TemporaryDirectory(prefix="bench-failover-") as root:
                takeover(server, Path(root), options.kills, options.agents,
                         options.lease_time)
    return 0


if __name__ == "__main__":
    sys.exit(main())
