"""Engine benchmarks against real agent processes on loopback.

* ``resync``: a full resynchronisation (every page of ``listTasks`` and
  ``getStorageConnectionList``, written to the engine's store) of N agents at
  once, against one agent's alone, in the same run (target: N at once within
  2x one alone: hosts are handled concurrently, not one after another); and a
  bare ``ping`` round trip for scale.
* ``frozen``: the same with 5 agents stopped by SIGSTOP: the answer must come
  no later than the all-up time plus the request timeout (the frozen hosts
  only cost their own timeout).
* ``latency``: the full engine (events long-poll per host) following the N
  agents: time from a task transition on an agent (a task started and ended
  there directly) to the engine's store showing it (target <= 1 s).

``python -m benchmarks.bench_engine [--quick] [--agents N]``; the agents
(~50 MB each) are started in parallel and killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
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

import aiohttp
import orjson
import psutil  # type: ignore[import-untyped]

import rpc_schema
from benchmarks.agents import agent_argv, free_port, healthy, kill_task_processes, spawn
from vdsm_agent.common.clock import parse_rfc3339
from vdsm_agent.engine.agentclient import AgentClient, AgentUnreachable
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.store import EngineStore, repository

TARGET_RESYNC_RATIO = 2.0
TARGET_LATENCY_S = 1.0
FROZEN = 5
REQUEST_TIMEOUT = 2.0


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Agent:
    name: str
    port: int
    proc: subprocess.Popen[bytes]
    state_dir: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jsonrpc"


def start_agents(root: Path, count: int, timeout: float = 300) -> list[Agent]:
    agents = []
    for index in range(count):
        name = f"host{index + 1:02d}"
        state = root / name / "state"
        images = root / name / "images"
        images.mkdir(parents=True)
        port = free_port()
        argv = agent_argv(state, port, images, "warning", heartbeat_interval=0.5)
        agents.append(Agent(name, port, spawn(argv, root / name / "agent.log"), state))
    deadline = time.monotonic() + timeout
    pending = list(agents)
    while pending:
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} agents not ready in {timeout:g} s")
        for agent in list(pending):
            if agent.proc.poll() is not None:
                raise BenchError(f"agent {agent.name} exited with {agent.proc.returncode}")
            if healthy(agent.port):
                pending.remove(agent)
        time.sleep(0.05)
    return agents


def stop_agents(agents: Sequence[Agent]) -> None:
    for agent in agents:
        if agent.proc.poll() is None:
            agent.proc.send_signal(signal.SIGCONT)
            agent.proc.kill()
    for agent in agents:
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.proc.wait(timeout=30)
    kill_task_processes(tuple(str(agent.state_dir) for agent in agents))


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def rpc(session: aiohttp.ClientSession, agent: Agent, method: str,
              **params: Any) -> Any:
    body = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
    async with session.post(agent.url, data=body,
                            headers={"Content-Type": "application/json"}) as response:
        answer = orjson.loads(await response.read())
    if "error" in answer:
        raise BenchError(f"{agent.name} {method}: {answer['error']}")
    return answer["result"]


async def seed(agents: Sequence[Agent], root: Path, tasks: int) -> None:
    """Each agent: ``tasks`` finished test.sleep tasks and one managed connection."""
    async with aiohttp.ClientSession() as session:
        async def one(agent: Agent) -> None:
            share = root / agent.name / "share"
            share.mkdir()
            await rpc(session, agent, "manageStorageConnection", uri=f"file://{share}",
                      connectionID="share")
            for _ in range(tasks):
                started = await rpc(session, agent, "startTask", kind="test.sleep",
                                    params={"seconds": 0})
                await rpc(session, agent, "waitTask", taskID=started["taskID"], timeout=60)
        await asyncio.gather(*(one(agent) for agent in agents))


def engine_config(root: Path, **overrides: Any) -> EngineConfig:
    return EngineConfig.defaults().replace(
        state_dir=str(root / "engine"), request_timeout=REQUEST_TIMEOUT, connect_timeout=1.0,
        **overrides)


async def open_engine(root: Path, agents: Sequence[Agent],
                      **overrides: Any) -> tuple[Engine, EngineStore]:
    config = engine_config(root, **overrides)
    (root / "engine").mkdir(exist_ok=True)
    store = await EngineStore.open(config.database_url)
    engine = Engine(config=config, schema=rpc_schema.load("engine"), store=store)
    existing = {row.name for row in await store.run(repository.list_hosts)}
    for agent in agents:
        if agent.name not in existing:
            await store.run(repository.add_host, agent.name, agent.url, None, None, None,
                            False, engine.now())
    return engine, store


# -- resync and frozen -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ResyncResult:
    agents: int
    tasks_per_agent: int
    ping_ms: float
    one_ms: float
    all_ms: float
    frozen_ms: float | None
    frozen_failed: int
    cold_ms: float  # the first all-at-once resync, into an empty store
    engine_cpu_ms: float  # CPU of this process per all-at-once round
    agents_cpu_ms: float  # CPU of all agents together per all-at-once round

    @property
    def ratio(self) -> float:
        return self.all_ms / self.one_ms

    @property
    def frozen_bound_ms(self) -> float:
        return self.all_ms + REQUEST_TIMEOUT * 1000


def _cpu(agents: Sequence[Agent]) -> float:
    """CPU seconds (user + system) the agents have used so far."""
    total = 0.0
    for agent in agents:
        with contextlib.suppress(psutil.Error):
            times = psutil.Process(agent.proc.pid).cpu_times()
            total += times.user + times.system
    return total


async def _timed(coro: Any) -> float:
    began = time.perf_counter()
    await coro
    return (time.perf_counter() - began) * 1000


async def bench_resync(root: Path, agents: list[Agent], rounds: int,
                       tasks: int) -> ResyncResult:
    engine, store = await open_engine(root, agents)
    workers: list[HostWorker] = []
    try:
        for row in await store.run(repository.list_hosts):
            worker = HostWorker(engine, row)
            worker.client = AgentClient(row.url, connect_timeout=1.0,
                                        request_timeout=REQUEST_TIMEOUT)
            workers.append(worker)
        # The first resync writes every host's rows into an empty store ("cold").
        cold_ms = await _timed(asyncio.gather(*(worker.resync() for worker in workers)))
        first = workers[0]
        assert first.client is not None
        ping = [await _timed(first.client.call("ping")) for _ in range(rounds * 5)]
        one: list[float] = []
        everyone: list[float] = []
        engine_cpu = agents_cpu = 0.0
        for _ in range(rounds):  # alternate, so that load drifts hit both alike
            one.append(await _timed(first.resync()))
            cpu_before, agents_before = time.process_time(), _cpu(agents)
            everyone.append(await _timed(asyncio.gather(*(w.resync() for w in workers))))
            engine_cpu += time.process_time() - cpu_before
            agents_cpu += _cpu(agents) - agents_before
        frozen_ms = None
        failed = 0
        if len(agents) > FROZEN:
            stopped = agents[-FROZEN:]
            for agent in stopped:
                agent.proc.send_signal(signal.SIGSTOP)
            try:
                async def guarded(worker: HostWorker) -> bool:
                    try:
                        await worker.resync()
                        return True
                    except AgentUnreachable:
                        return False
                began = time.perf_counter()
                outcomes = await asyncio.gather(*(guarded(worker) for worker in workers))
                frozen_ms = (time.perf_counter() - began) * 1000
                failed = outcomes.count(False)
            finally:
                for agent in stopped:
                    agent.proc.send_signal(signal.SIGCONT)
        return ResyncResult(len(agents), tasks, statistics.median(ping),
                            statistics.median(one), statistics.median(everyone), frozen_ms,
                            failed, cold_ms, engine_cpu / rounds * 1000,
                            agents_cpu / rounds * 1000)
    finally:
        for worker in workers:
            if worker.client is not None:
                await worker.client.close()
        await store.close()


# -- latency -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LatencyResult:
    samples: int
    appear_ms: list[float]  # startTask answered on the agent -> in the engine's store
    end_ms: list[float]  # the agent's endedAt -> done in the engine's store


async def bench_latency(root: Path, agents: list[Agent], samples: int) -> LatencyResult:
    engine, store = await open_engine(root, agents, resync_interval=300.0, poll_interval=300.0)
    appear: list[float] = []
    ended: list[float] = []
    try:
        await engine.start()
        deadline = time.monotonic() + 120
        while not all(w.events_supported and w.sync_count for w in engine.workers.values()):
            if time.monotonic() > deadline:
                raise BenchError("the engine did not reach every agent's feed in 120 s")
            await asyncio.sleep(0.1)
        async with aiohttp.ClientSession() as session:
            for index in range(samples):
                agent = agents[(index * 7) % len(agents)]
                answer = await rpc(session, agent, "startTask", kind="test.sleep",
                                   params={"seconds": 0.3})
                accepted = time.time()
                task_id = answer["taskID"]
                row = await _wait_row(store, agent.name, task_id, None)
                appear.append(max(0.0, (row.updated_at - accepted) * 1000))
                row = await _wait_row(store, agent.name, task_id, "done")
                doc = await rpc(session, agent, "getTask", taskID=task_id)
                ended.append(max(0.0, (row.updated_at - parse_rfc3339(doc["endedAt"])) * 1000))
    finally:
        await engine.close()
        await store.close()
    return LatencyResult(samples, appear, ended)


async def _wait_row(store: EngineStore, host: str, task_id: str, state: str | None) -> Any:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = await store.run(repository.get_task, host, task_id)
        if row is not None and (state is None or row.state == state):
            return row
        await asyncio.sleep(0.005)
    raise BenchError(f"{host} task {task_id} not {state or 'seen'} in the engine in 30 s")


# -- report --------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_resync(result: ResyncResult) -> None:
    print(f"\nFull resynchronisation ({result.tasks_per_agent} tasks + 1 connection per "
          f"agent; median of alternating rounds)")
    print(f"  ping round trip, one agent:       {result.ping_ms:8.1f} ms")
    print(f"  resync, one agent alone:          {result.one_ms:8.1f} ms")
    print(f"  resync, {result.agents} agents at once:      {result.all_ms:8.1f} ms "
          f"(x{result.ratio:.2f} one alone; target <= {TARGET_RESYNC_RATIO:g}: "
          f"{_verdict(result.ratio <= TARGET_RESYNC_RATIO)}; one after another would be "
          f"~{result.one_ms * result.agents:.0f} ms)")
    print(f"  first resync, {result.agents} agents, empty store: {result.cold_ms:6.1f} ms")
    cores = os.cpu_count() or 1
    print(f"  CPU per all-at-once round: engine {result.engine_cpu_ms:.0f} ms, agents "
          f"{result.agents_cpu_ms:.0f} ms -> at best "
          f"{(result.engine_cpu_ms + result.agents_cpu_ms) / cores:.0f} ms on {cores} CPUs")
    if result.frozen_ms is not None:
        print(f"  resync with {FROZEN} frozen (SIGSTOP):     {result.frozen_ms:8.1f} ms "
              f"({result.frozen_failed} timed out; bound all-up + timeout "
              f"{result.frozen_bound_ms:.0f} ms: "
              f"{_verdict(result.frozen_ms <= result.frozen_bound_ms)})")


def print_latency(result: LatencyResult) -> None:
    def line(name: str, values: list[float]) -> str:
        return (f"  {name}: p50 {statistics.median(values):6.1f} ms, max {max(values):6.1f} ms "
                f"(target <= {TARGET_LATENCY_S * 1000:.0f} ms: "
                f"{_verdict(max(values) <= TARGET_LATENCY_S * 1000)})")
    print(f"\nAgent transition -> engine view ({result.samples} tasks, events feed)")
    print(line("task started -> seen  ", result.appear_ms))
    print(line("task ended   -> done  ", result.end_ms))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_engine",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="10 agents, fewer rounds and samples (smoke run)")
    parser.add_argument("--agents", type=int, help="agents to start (default 50, quick 10)")
    parser.add_argument("--tasks", type=int, default=10,
                        help="finished tasks per agent (default 10)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from benchmarks.__main__ import machine_line

    args = build_parser().parse_args(argv)
    count = args.agents or (10 if args.quick else 50)
    rounds = 3 if args.quick else 7
    samples = 5 if args.quick else 20
    tasks = 3 if args.quick else args.tasks
    print(machine_line())
    with workdir() as root:
        began = time.monotonic()
        agents: list[Agent] = []
        try:
            agents = start_agents(root, count)
            rss = sum(psutil.Process(a.proc.pid).memory_info().rss for a in agents) / count
            print(f"{count} agents started in parallel in {time.monotonic() - began:.1f} s; "
                  f"RSS {rss / 2**20:.0f} MiB each", file=sys.stderr, flush=True)
            asyncio.run(seed(agents, root, tasks))
            resync = asyncio.run(bench_resync(root, agents, rounds, tasks))
            print_resync(resync)
            latency = asyncio.run(bench_latency(root, agents, samples))
            print_latency(latency)
        except BenchError as exc:
            print(f"bench_engine: {exc}", file=sys.stderr)
            return 1
        finally:
            stop_agents(agents)
    return 0


if __name__ == "__main__":
    sys.exit(main())
