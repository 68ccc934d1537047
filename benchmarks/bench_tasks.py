"""Task manager benchmarks against real agent processes.

* ``submit``: startTask throughput with wrk (one call per request at 16
  connections, and JSON-RPC batches of 10 at 4; agent on CPU 0, wrk on CPU 1),
  and latency at 1,000 calls/s offered (open loop, client on CPU 1) beside the
  same client's latency against a bare aiohttp handler and the agent's
  ``ping`` at that rate, in alternating rounds, with the CPU time the
  hypervisor took (steal) during each: when the bare handler alone misses the
  target, the host cannot judge it. Tasks stay queued (one blocker holds the
  only run slot), so this measures validation + the durable insert, not
  process start-up.
* ``checksum``: a checksum task over a 1 GiB file against ``sha256sum`` on the
  same (page-cached) file, alternating, in the same run.
* ``restart``: 10,000 finished tasks in the store and 20 running; the agent
  is killed with SIGKILL and started again: time until it serves again
  (``/health``) and until all 20 are re-attached (same PIDs, still running).
* ``rss``: resident memory of the agent (idle, with 10,000 tasks and 20
  running) and of one task process.
* ``start``: accepted -> initializing (``startedAt - createdAt``) and accepted
  -> running (the ``running`` event of ``getEvents``, when the agent has the
  events feed) over 200 ``test.sleep`` tasks, submitted by as many clients as
  there are run slots (so no task waits for a slot).
* ``output``: ``GET /tasks/ID/output`` of a finished task with 256 MiB of
  output against ``web.FileResponse`` of the same segment file from a bare
  aiohttp app, alternating; target: the stream at >= 0.5x the file's MiB/s.
* ``memory``: 1 GiB of output read through ``getTaskOutput`` (1 MiB pages);
  the agent's RSS before, at its highest while reading, and after.

``python -m benchmarks.bench_tasks [--quick] [--only submit,checksum,restart,start,output,memory]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import http.client
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from benchmarks import agents, bench_http
from benchmarks.agents import agent_argv, free_port, kill_task_processes, spawn
from vdsm_agent.common import clock
from vdsm_agent.store import Store
from vdsm_agent.tasks import repository
from vdsm_agent.tasks.record import TaskRecord, request_hash
from vdsm_agent.tasks.states import State

GiB = 1024 ** 3
MiB = 1024 ** 2
CASES = ("submit", "checksum", "restart", "start", "output", "memory")
OUTPUT_TARGET = 0.5  # stream MiB/s over FileResponse MiB/s
PAGE = 1024 * 1024  # getTaskOutput's maxBytes cap


class BenchError(Exception):
    pass


@dataclasses.dataclass
class Agent:
    proc: subprocess.Popen[bytes]
    port: int
    state_dir: Path
    started: float
    log_path: Path

    def reconcile_ms(self) -> float:
        """The agent's own measure of its start-up reconcile (from its log)."""
        match = re.search(r"reconciled in ([0-9.]+) ms", self.log_path.read_text())
        if match is None:
            raise BenchError("no reconcile line in the agent log")
        return float(match.group(1))

    def call(self, method: str, **params: Any) -> Any:
        return agents.call(self.port, method, params, timeout=60, error=BenchError)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from spawn until /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"agent exited with {self.proc.returncode}")
            if agents.healthy(self.port):
                return time.monotonic() - self.started
            time.sleep(0.005)
        raise BenchError("agent not ready")

    def rss_mib(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / MiB


def start_agent(state_dir: Path, images: Path, **flags: Any) -> Agent:
    port = free_port()
    argv = agent_argv(state_dir, port, images, "info", **flags)
    log_path = state_dir.parent / f"agent-{port}.log"
    agent = Agent(spawn(argv, log_path), port, state_dir, time.monotonic(), log_path)
    agent.wait_ready()
    return agent


def stop_agent(agent: Agent, sig: int = signal.SIGTERM) -> None:
    if agent.proc.poll() is None:
        agent.proc.send_signal(sig)
        agent.proc.wait(timeout=30)


def kill_tasks(state_dir: Path) -> None:
    """SIGKILL every task process group of this state dir, and its agent's zygote."""
    kill_task_processes((str(state_dir),))


@contextmanager
def workdir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bench-tasks-"))
    (root / "images").mkdir()
    try:
        yield root
    finally:
        kill_tasks(root / "state")
        shutil.rmtree(root, ignore_errors=True)


def wait_final(agent: Agent, task_id: str, timeout: float = 600) -> dict[str, Any]:
    task: dict[str, Any] = agent.call("waitTask", taskID=task_id, timeout=timeout)
    if task["state"] not in ("done", "failed", "canceled", "interrupted"):
        raise BenchError(f"task {task_id} did not end: {task['state']}")
    return task


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


# -- submit ---------------------------------------------------------------------------------


SUBMIT_TARGET = 2500.0  # tasks/s accepted
RATE = 1000.0  # tasks/s offered for the latency case
RATE_P99_TARGET_MS = 5.0
START_LUA = Path(__file__).with_name("start_task.lua")
# (connections, calls per HTTP request): one call per request, and batches of 10.
SUBMIT_MODES = ((16, 1), (4, 10))


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    connections: int
    batch: int  # startTask calls per HTTP request
    tasks_per_s: float
    p50_ms: float  # per HTTP request (a whole batch)
    p99_ms: float
    cpu_us_per_task: float | None


@dataclasses.dataclass(frozen=True)
class RateRun:
    """One open-loop run of one target at ``RATE`` calls/s."""
    target: str  # one of RATE_TARGETS
    sent: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    steal_pct: float  # CPU time the hypervisor gave to others while it ran


@dataclasses.dataclass(frozen=True)
class RateResult:
    rate: float
    seconds: float
    runs: tuple[RateRun, ...]
    commit_p50_ms: float  # the store's durable insert alone (see _durable_insert_floor)
    commit_p99_ms: float

    def of(self, target: str) -> list[RateRun]:
        return [run for run in self.runs if run.target == target]

    def median(self, target: str, field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in self.of(target)))


def _agent_on_cpu(root: Path, cpu: str, count: int) -> Agent:
    """An agent pinned to ``cpu`` whose one run slot is held by a blocker, so that
    submitted tasks stay queued: submits measure the checks and the durable
    insert, not process start-up."""
    port = free_port()
    # Room for every submit of a run: batches of 10 reach ~10,000 tasks/s, and a
    # warm-up plus a 10 s run outgrew a 100,000 cap (QueueFull).
    argv = ["taskset", "-c", cpu, *agent_argv(
        root / "state", port, root / "images", "info",
        max_running_tasks=1, max_queued_tasks=count + 500_000)]
    log_path = root / f"agent-{port}.log"
    agent = Agent(spawn(argv, log_path), port, root / "state", time.monotonic(), log_path)
    agent.wait_ready()
    agent.call("startTask", kind="test.sleep", params={"seconds": 3600})
    return agent


def bench_submit(seconds: float) -> list[SubmitResult]:
    """startTask throughput with wrk (agent on CPU 0, wrk on CPU 1), one fresh
    agent per mode."""
    bench_http.check_tools()
    results = []
    for connections, batch in SUBMIT_MODES:
        with workdir() as root:
            agent = _agent_on_cpu(root, bench_http.SERVER_CPU, 0)
            try:
                run = functools.partial(bench_http.run_wrk, agent.port, connections=connections,
                                        script=START_LUA, script_args=[str(batch)])
                run(2.0)  # warm-up
                measured = run(seconds, pid=agent.proc.pid)
            finally:
                stop_agent(agent)
        if measured.errors:
            raise BenchError(f"startTask: {measured.errors} errors (batch {batch})")
        cpu = measured.cpu_us_per_request
        results.append(SubmitResult(connections, batch, measured.requests_per_s * batch,
                                    measured.p50_ms, measured.p99_ms,
                                    cpu / batch if cpu is not None else None))
    return results


def _post(port: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (f"POST /jsonrpc HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


def _start_task_request(port: int) -> bytes:
    return _post(port, {"jsonrpc": "2.0", "method": "startTask", "id": 1,
                        "params": {"kind": "test.sleep", "params": {"seconds": 1},
                                   "taskID": str(uuid.uuid4())}})


def _ping_request(port: int) -> bytes:
    return _post(port, {"jsonrpc": "2.0", "method": "ping", "id": 1})


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length:\s*(\d+)", head)
    if not head.startswith(b"HTTP/1.1 200") or match is None:
        raise BenchError(f"unexpected answer: {head[:200]!r}")
    return await reader.readexactly(int(match.group(1)))


async def _submit_at_rate(port: int, rate: float, warmup: float, seconds: float,
                          connections: int = 32,
                          make_request: Callable[[int], bytes] = _start_task_request
                          ) -> list[float]:
    """Open loop: call ``i`` is due at ``i / rate`` s whatever the answers; its
    latency counts from when it was due, so a late send counts against the
    agent. A bare HTTP/1.1 keep-alive client (pre-built requests, no aiohttp)
    keeps the client's own cost per call well under the 1 ms between calls.
    The first ``warmup`` seconds are not counted: they also open the
    connections (the agent identifies each new loopback caller once, from
    /proc/net/tcp, which would show as a burst of slow first calls)."""
    warmup_count = int(rate * warmup)
    requests = [make_request(port) for _ in range(warmup_count + int(rate * seconds))]
    due: asyncio.Queue[tuple[int, float, bytes] | None] = asyncio.Queue()
    latencies: list[float] = []

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while (item := await due.get()) is not None:
                index, when, request = item
                writer.write(request)
                answer = await _read_answer(reader)
                if index >= warmup_count:
                    latencies.append(time.perf_counter() - when)
                if b'"error"' in answer:
                    raise BenchError(f"error answer: {answer[:300]!r}")
        finally:
            writer.close()

    loop = asyncio.get_running_loop()

    def pace() -> None:
        # A thread with time.sleep (nanosleep) hands each call over when it is
        # due: the loop's own timers wake up to a millisecond late, which would
        # count as latency, and spinning would take the CPU the agent may use.
        began = time.perf_counter() + 0.05
        for index, request in enumerate(requests):
            when = began + index / rate
            delay = when - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(due.put_nowait, (index, when, request))
        for _ in range(connections):
            loop.call_soon_threadsafe(due.put_nowait, None)

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    await asyncio.gather(asyncio.to_thread(pace), *workers)
    return latencies


# What the startTask latency is compared with, at the same rate, by the same client:
# a bare aiohttp handler (the floor of any Python HTTP server on this host) and the
# agent's ping (HTTP + JSON-RPC, no task work); each target with its request.
RATE_REQUESTS: dict[str, Callable[[int], bytes]] = {
    "bare aiohttp": _ping_request, "ping": _ping_request, "startTask": _start_task_request}
RATE_TARGETS = tuple(RATE_REQUESTS)


def _cpu_ticks() -> tuple[int, int]:
    """(steal, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(value) for value in stat.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: inside user/nice]
    return fields[7], sum(fields[:8])


def _measure_at_rate(target: str, port: int, seconds: float) -> RateRun:
    steal_before, total_before = _cpu_ticks()
    latencies = asyncio.run(_submit_at_rate(port, RATE, 2.0, seconds,
                                            make_request=RATE_REQUESTS[target]))
    steal_after, total_after = _cpu_ticks()
    steal = 100 * (steal_after - steal_before) / max(1, total_after - total_before)
    return RateRun(target, len(latencies), statistics.median(latencies) * 1000,
                   percentile(latencies, 0.99) * 1000, max(latencies) * 1000, steal)


def _new_record() -> TaskRecord:
    params = {"seconds": 1}
    return TaskRecord(id=str(uuid.uuid4()), kind="test.sleep", params=params,
                      request_hash=request_hash("test.sleep", params, None),
                      state=State.ACCEPTED, created_at=clock.now())


async def _durable_insert_floor(state_dir: Path, rate: float, seconds: float) -> list[float]:
    """How long the agent's own durable insert of one new task takes when nothing
    else runs: a real store, ``repository.insert_new`` through its DB thread (the
    thread hop, the statement, the fsync), one call every ``1 / rate`` s. No
    startTask can answer faster on this host."""
    store = await Store.open(state_dir / "agent.db")
    durations: list[float] = []
    try:
        for _ in range(int(rate * seconds)):
            record = _new_record()
            began = time.perf_counter()
            await store.run(repository.insert_new, [record])
            durations.append(time.perf_counter() - began)
            await asyncio.sleep(max(0.0, 1 / rate - durations[-1]))
    finally:
        await store.close()
    return durations


def bench_rate(seconds: float, rounds: int = 3) -> RateResult:
    """startTask latency at 1,000 calls/s offered, beside the same client's
    latency against a bare aiohttp handler and the agent's ping, in ``rounds``
    rounds of alternating order, each with a fresh agent (so that no round
    starts with the tasks queued by the one before): this client pinned to
    CPU 1 while it runs, the servers free to use both CPUs (the agent's DB
    thread and fsyncs work beside its event loop, as on a real host)."""
    bench_http.check_tools()
    cpus = f"{bench_http.SERVER_CPU},{bench_http.LOAD_CPU}"
    client_cpus = os.sched_getaffinity(0)
    bare_port = free_port()
    bare_argv = [sys.executable, "-m", "benchmarks.bare_server", "--port", str(bare_port)]
    runs: list[RateRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-tasks-bare-") as bare_logs, \
            bench_http.server("bare", bare_argv, bare_port, Path(bare_logs), cpus):
        for index in range(rounds):
            order = RATE_TARGETS if index % 2 == 0 else RATE_TARGETS[::-1]
            with workdir() as root:
                agent = _agent_on_cpu(root, cpus, int(RATE * (seconds + 2)))
                ports = {"bare aiohttp": bare_port, "ping": agent.port, "startTask": agent.port}
                try:
                    os.sched_setaffinity(0, {int(bench_http.LOAD_CPU)})
                    runs.extend(_measure_at_rate(target, ports[target], seconds)
                                for target in order)
                finally:
                    os.sched_setaffinity(0, client_cpus)
                    stop_agent(agent)
    with workdir() as root:
        commits = asyncio.run(_durable_insert_floor(root, RATE, seconds))
    return RateResult(RATE, seconds, tuple(runs), statistics.median(commits) * 1000,
                      percentile(commits, 0.99) * 1000)


# -- checksum vs sha256sum -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ChecksumResult:
    size: int
    task_s: list[float]  # startTask -> done, as a caller sees it
    task_work_s: list[float]  # startedAt -> endedAt (process start-up included)
    sha256sum_s: list[float]

    @property
    def ratio(self) -> float:
        """Median task time over median sha256sum time (1.0 = as fast)."""
        return statistics.median(self.task_s) / statistics.median(self.sha256sum_s)


def _make_file(path: Path, size: int) -> None:
    block = os.urandom(4 * MiB)
    with open(path, "wb") as stream:
        for _ in range(size // len(block)):
            stream.write(block[:-8] + os.urandom(8))


def _iso_seconds(text: str) -> float:
    return clock.parse_rfc3339(text)


def bench_checksum(size: int, rounds: int) -> ChecksumResult:
    sha256sum = shutil.which("sha256sum")
    if sha256sum is None:
        raise BenchError("sha256sum is not installed")
    task_s, work_s, tool_s = [], [], []
    with workdir() as root:
        image = root / "images" / "big.img"
        _make_file(image, size)
        subprocess.run([sha256sum, str(image)], check=True, capture_output=True)  # page cache
        agent = start_agent(root / "state", root / "images")
        try:
            for _ in range(rounds):
                began = time.perf_counter()
                tool = subprocess.run([sha256sum, str(image)], check=True, capture_output=True,
                                      text=True).stdout.split()[0]
                tool_s.append(time.perf_counter() - began)
                began = time.perf_counter()
                task_id = agent.call("startTask", kind="checksum",
                                     params={"path": str(image)})["taskID"]
                task = wait_final(agent, task_id)
                task_s.append(time.perf_counter() - began)
                if task["state"] != "done" or task["result"]["checksum"] != tool:
                    raise BenchError(f"checksum task disagrees with sha256sum: {task}")
                work_s.append(_iso_seconds(task["endedAt"]) - _iso_seconds(task["startedAt"]))
                agent.call("deleteTask", taskID=task_id)
        finally:
            stop_agent(agent)
    return ChecksumResult(size, task_s, work_s, tool_s)


# -- restart with a big store ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RestartResult:
    stored: int
    running: int
    serve_again_s: float
    reconcile_ms: float
    empty_start_s: float  # the same agent on an empty store, for comparison
    all_reattached_s: float
    rss_idle_mib: float
    rss_loaded_mib: float
    rss_after_restart_mib: float
    child_rss_mib: float
    list_page_ms: float


async def _fill_store(state_dir: Path, count: int) -> None:
    store = await Store.open(state_dir / "agent.db")
    now = clock.now()
    records = []
    for index in range(count):
        params = {"seconds": 1, "tick": 0.05, "ignoreTerm": False, "printEvery": 0.5,
                  "outputBytes": 0, "crash": False, "verifiable": False}
        records.append(TaskRecord(
            id=str(uuid.uuid4()), kind="test.sleep", params=params,
            request_hash=request_hash("test.sleep", params, None), state=State.DONE,
            created_at=now - count + index, started_at=now - count + index,
            ended_at=now - count + index + 1, result={"slept": 1}))
    try:
        await store.run(repository.insert_many, records)
    finally:
        await store.close()


def bench_restart(stored: int, running: int) -> RestartResult:
    with workdir() as root:
        empty = start_agent(root / "empty-state", root / "images")
        empty_start = time.monotonic() - empty.started
        stop_agent(empty)
        state = root / "state"
        state.mkdir()
        asyncio.run(_fill_store(state, stored))
        flags = {"max_running_tasks": running + 5, "max_finished_tasks": stored * 2,
                 "retention_done": 10 * 365 * 86400.0}
        agent = start_agent(state, root / "images", **flags)
        try:
            rss_idle = agent.rss_mib()
            ids = [agent.call("startTask", kind="test.sleep",
                              params={"seconds": 600, "printEvery": 1})["taskID"]
                   for _ in range(running)]
            deadline = time.monotonic() + 60
            while not all(agent.call("getTask", taskID=t)["state"] == "running" for t in ids):
                if time.monotonic() > deadline:
                    raise BenchError("tasks did not start")
                time.sleep(0.1)
            pids = {t: agent.call("getTask", taskID=t)["pid"] for t in ids}
            rss_loaded = agent.rss_mib()
            child_rss = statistics.median(
                psutil.Process(pid).memory_info().rss / MiB for pid in pids.values())
            began = time.perf_counter()
            agent.call("listTasks", pageSize=1000)
            list_ms = (time.perf_counter() - began) * 1000
            stop_agent(agent, signal.SIGKILL)
            agent = start_agent(state, root / "images", **flags)
            serve_again = time.monotonic() - agent.started
            reconcile_ms = agent.reconcile_ms()
            while True:
                tasks = [agent.call("getTask", taskID=t) for t in ids]
                if all(t["state"] == "running" and t["pid"] == pids[t["id"]] for t in tasks):
                    break
                if time.monotonic() - agent.started > 120:
                    raise BenchError(f"not re-attached: {[t['state'] for t in tasks]}")
                time.sleep(0.01)
            reattached = time.monotonic() - agent.started
            rss_after = agent.rss_mib()
            for task_id in ids:
                agent.call("cancelTask", taskID=task_id)
        finally:
            stop_agent(agent)
    return RestartResult(stored, running, serve_again, reconcile_ms, empty_start, reattached,
                         rss_idle, rss_loaded, rss_after, child_rss, list_ms)


# -- accepted -> running -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StartResult:
    count: int
    clients: int
    heartbeat_interval: float
    to_initializing_ms: list[float]  # startedAt - createdAt
    to_running_ms: list[float] | None  # the "running" event's time - createdAt; None: no feed
    missed_running: int  # tasks that ended before the monitor saw them running


async def _rpc(session: aiohttp.ClientSession, url: str, method: str, **params: Any) -> Any:
    body = {"jsonrpc": "2.0", "method": method, "params": params, "id": 1}
    async with session.post(url, json=body) as response:
        answer = await response.json()
    if "error" in answer:
        raise BenchError(f"{method}: {answer['error']}")
    return answer["result"]


async def _run_tasks(port: int, count: int, clients: int, seconds: float) -> list[dict[str, Any]]:
    """``count`` test.sleep tasks, each client submitting its next one when the last ended."""
    url = f"http://127.0.0.1:{port}/jsonrpc"
    left = list(range(count))
    finished: list[dict[str, Any]] = []

    async def client(session: aiohttp.ClientSession) -> None:
        while left:
            left.pop()
            started = await _rpc(session, url, "startTask", kind="test.sleep",
                                 params={"seconds": seconds, "printEvery": 0})
            task = await _rpc(session, url, "waitTask", taskID=started["taskID"], timeout=120)
            if task["state"] != "done":
                raise BenchError(f"task {task['id']} ended {task['state']}: {task['error']}")
            finished.append(task)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return finished


async def _running_times(port: int) -> dict[str, float] | None:
    """taskID -> time of its "running" event, from getEvents; None without the feed."""
    url = f"http://127.0.0.1:{port}/jsonrpc"
    running: dict[str, float] = {}
    since = 0
    async with aiohttp.ClientSession() as session:
        while True:
            body = {"jsonrpc": "2.0", "method": "getEvents", "id": 1,
                    "params": {"since": since, "maxEvents": 10000}}
            async with session.post(url, json=body) as response:
                answer = await response.json()
            if "error" in answer:
                if answer["error"]["code"] == -32601:
                    return None  # an agent without the events feed
                raise BenchError(f"getEvents: {answer['error']}")
            page = answer["result"]
            if page["gap"]:
                raise BenchError("getEvents: events were dropped (raise events_max)")
            for event in page["events"]:
                if (event.get("type") == "task" and event.get("state") == "running"
                        and event.get("previousState") != "running"):
                    running.setdefault(event["taskID"], _iso_seconds(event["at"]))
            if not page["events"]:
                return running
            since = page["nextSince"]


def bench_start(count: int, clients: int = 4, seconds: float = 1.0,
                heartbeat_interval: float = 0.2) -> StartResult:
    with workdir() as root:
        agent = start_agent(root / "state", root / "images", max_running_tasks=clients,
                            heartbeat_interval=heartbeat_interval, events_max=100_000,
                            max_finished_tasks=count * 2 + 100)
        try:
            asyncio.run(_run_tasks(agent.port, min(20, count), clients, seconds))  # warm-up
            tasks = asyncio.run(_run_tasks(agent.port, count, clients, seconds))
            running = asyncio.run(_running_times(agent.port))
        finally:
            stop_agent(agent)
    to_init = [(_iso_seconds(t["startedAt"]) - _iso_seconds(t["createdAt"])) * 1000
               for t in tasks]
    to_running = None
    missed = 0
    if running is not None:
        to_running = [(running[t["id"]] - _iso_seconds(t["createdAt"])) * 1000
                      for t in tasks if t["id"] in running]
        missed = len(tasks) - len(to_running)
    return StartResult(len(tasks), clients, heartbeat_interval, to_init, to_running, missed)


# -- output over HTTP against FileResponse, and memory while paging -------------------------------


BARE_FILE_SERVER = """
import sys
from aiohttp import web

path, port = sys.argv[1], int(sys.argv[2])

async def serve(request):
    return web.FileResponse(path, headers={"Content-Type": "text/plain; charset=utf-8"})

async def health(request):
    return web.Response(text="ok")

app = web.Application()
app.router.add_get("/file", serve)
app.router.add_get("/health", health)
web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)
"""


@dataclasses.dataclass(frozen=True)
class OutputResult:
    size: int
    stream_mib_s: list[float]  # GET /tasks/ID/output of the agent
    file_mib_s: list[float]  # FileResponse of the bare app
    stream_cpu_ms_per_mib: list[float]  # the agent's CPU time (user + system) per MiB sent
    file_cpu_ms_per_mib: list[float]  # the bare app's
    agent_rss_before_mib: float
    agent_rss_max_mib: float  # highest RSS seen after a round

    @property
    def ratio(self) -> float:
        return statistics.median(self.stream_mib_s) / statistics.median(self.file_mib_s)


@dataclasses.dataclass(frozen=True)
class MemoryResult:
    size: int  # bytes read per pass
    calls: int  # per pass
    seconds: list[float]  # per pass
    rss_before_mib: float
    rss_quarters_mib: list[float]  # after each quarter of each pass
    rss_peak_mib: float  # highest sample while reading (every 16 calls)
    hwm_before_mib: float  # VmHWM: the process's peak RSS so far
    hwm_after_mib: float

    @property
    def rss_after_mib(self) -> float:
        return self.rss_quarters_mib[-1]


def _hwm_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise BenchError("no VmHWM in /proc/PID/status")


def _output_task(agent: Agent, size: int) -> tuple[str, Path]:
    """A finished test.sleep task with ``size`` bytes of filler output in one segment."""
    task_id = agent.call("startTask", kind="test.sleep",
                         params={"seconds": 0, "printEvery": 0, "outputBytes": size})["taskID"]
    task = wait_final(agent, task_id)
    if task["state"] != "done":
        raise BenchError(f"output task ended {task['state']}: {task['error']}")
    segments = sorted((agent.state_dir / "tasks" / task_id / "output").glob("*.out"))
    if len(segments) != 1 or segments[0].stat().st_size != task["outputSize"]:
        raise BenchError(f"expected one output segment, found {segments}")
    return task_id, segments[0]


async def _download(url: str) -> tuple[int, float]:
    """Bytes read and seconds taken (a fresh connection, reading as fast as it comes)."""
    async with aiohttp.ClientSession() as session:
        began = time.perf_counter()
        async with session.get(url) as response:
            if response.status != 200:
                raise BenchError(f"GET {url}: HTTP {response.status}")
            count = 0
            async for data in response.content.iter_any():
                count += len(data)
        return count, time.perf_counter() - began


def _cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return float(times.user + times.system)


def _start_file_server(path: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-c", BARE_FILE_SERVER, str(path), str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the file server exited: {log_path.read_text()}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            time.sleep(0.05)
        finally:
            conn.close()
    proc.kill()
    raise BenchError("the file server did not start")


def bench_output(size: int, rounds: int) -> OutputResult:
    with workdir() as root:
        agent = start_agent(root / "state", root / "images", output_max_bytes=8 * size)
        server = None
        try:
            task_id, segment = _output_task(agent, size)
            total = segment.stat().st_size
            server, port = _start_file_server(segment, root / "file-server.log")
            stream_url = f"http://127.0.0.1:{agent.port}/tasks/{task_id}/output"
            file_url = f"http://127.0.0.1:{port}/file"
            for url in (stream_url, file_url):  # warm-up (page cache, first connection)
                asyncio.run(_download(url))
            rss_before = agent.rss_mib()
            rss_max = rss_before
            speeds: dict[str, list[float]] = {"stream": [], "file": []}
            cpu: dict[str, list[float]] = {"stream": [], "file": []}
            servers = {"stream": psutil.Process(agent.proc.pid),
                       "file": psutil.Process(server.pid)}
            for number in range(rounds):
                order = [("stream", stream_url), ("file", file_url)]
                for name, url in order if number % 2 == 0 else order[::-1]:
                    cpu_before = _cpu_seconds(servers[name])
                    count, seconds = asyncio.run(_download(url))
                    if count != total:
                        raise BenchError(f"{name}: read {count} bytes of {total}")
                    speeds[name].append(count / seconds / MiB)
                    cpu[name].append((_cpu_seconds(servers[name]) - cpu_before) * 1000
                                     / (count / MiB))
                    rss_max = max(rss_max, agent.rss_mib())
        finally:
            if server is not None:
                server.kill()
                server.wait()
            stop_agent(agent)
    return OutputResult(total, speeds["stream"], speeds["file"], cpu["stream"], cpu["file"],
                        rss_before, rss_max)


def bench_memory(piece: int, pieces: int, passes: int = 2) -> MemoryResult:
    """Read ``piece * pieces`` bytes of one task's output through getTaskOutput.

    test.sleep writes at most 256 MiB, so the task writes ``piece`` bytes in one
    segment and the bench adds ``pieces - 1`` hard links of that file as the
    following segments (named by their stream offsets): a stream of
    ``pieces`` times the size without more disk. The reader cannot tell. The
    whole output is read ``passes`` times, RSS taken at every quarter: memory
    that grows with the bytes read keeps growing in the second pass.
    """
    with workdir() as root:
        agent = start_agent(root / "state", root / "images", output_max_bytes=8 * piece)
        try:
            task_id, segment = _output_task(agent, piece)
            length = segment.stat().st_size
            for number in range(1, pieces):
                os.link(segment, segment.with_name(f"{number * length:020d}.out"))
            total = length * pieces
            conn = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=60)

            def page(offset: int) -> dict[str, Any]:
                body = json.dumps({"jsonrpc": "2.0", "method": "getTaskOutput", "id": 1,
                                   "params": {"taskID": task_id, "offset": offset,
                                              "maxBytes": PAGE}})
                conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
                answer = json.loads(conn.getresponse().read())
                if "error" in answer:
                    raise BenchError(f"getTaskOutput: {answer['error']}")
                result: dict[str, Any] = answer["result"]
                return result

            try:
                page(0)  # warm-up: the first call's imports and buffers
                rss_before = agent.rss_mib()
                hwm_before = _hwm_mib(agent.proc.pid)
                rss_peak = rss_before
                quarters: list[float] = []
                seconds: list[float] = []
                calls = 0
                for _ in range(passes):
                    offset, calls = 0, 0
                    mark = total // 4
                    began = time.perf_counter()
                    while True:
                        result = page(offset)
                        calls += 1
                        offset = result["nextOffset"]
                        if calls % 16 == 0:
                            rss_peak = max(rss_peak, agent.rss_mib())
                        if offset >= mark or result["eof"]:
                            quarters.append(agent.rss_mib())
                            mark += total // 4
                        if result["eof"]:
                            break
                    seconds.append(time.perf_counter() - began)
                    if offset != total:
                        raise BenchError(f"getTaskOutput ended at {offset}, not {total}")
            finally:
                conn.close()
            hwm_after = _hwm_mib(agent.proc.pid)
        finally:
            stop_agent(agent)
    return MemoryResult(total, calls, seconds, rss_before, quarters,
                        max([rss_peak, *quarters]), hwm_before, hwm_after)


# -- report --------------------------------------------------------------------------------------


def _spread(values: list[float]) -> str:
    return (f"p50 {statistics.median(values):.0f} ms, p99 {percentile(values, 0.99):.0f} ms, "
            f"max {max(values):.0f} ms")


def report_new(start: StartResult | None, output: OutputResult | None,
               memory: MemoryResult | None) -> None:
    if start:
        print(f"\naccepted -> running: {start.count} test.sleep tasks from {start.clients} "
              f"clients ({start.clients} run slots, heartbeat_interval "
              f"{start.heartbeat_interval:g} s: the monitor looks every "
              f"{min(max(start.heartbeat_interval / 2, 0.05), 0.5) * 1000:.0f} ms)")
        print(f"  accepted -> initializing (startedAt - createdAt): "
              f"{_spread(start.to_initializing_ms)}")
        if start.to_running_ms is None:
            print("  accepted -> running: not measured (the agent has no getEvents)")
        elif start.to_running_ms:
            print(f"  accepted -> running (the running event - createdAt): "
                  f"{_spread(start.to_running_ms)}"
                  + (f"; {start.missed_running} ended before seen running"
                     if start.missed_running else ""))
    if output:
        verdict = "met" if output.ratio >= OUTPUT_TARGET else "NOT met"
        print(f"\noutput of a finished task, {output.size / MiB:.0f} MiB over HTTP, "
              f"{len(output.stream_mib_s)} alternating rounds (median MiB/s, range; "
              f"the server's CPU ms per MiB)")
        for name, values, cpu in (
                ("GET /tasks/ID/output", output.stream_mib_s, output.stream_cpu_ms_per_mib),
                ("bare FileResponse", output.file_mib_s, output.file_cpu_ms_per_mib)):
            print(f"  {name:<22} {statistics.median(values):7.0f}  "
                  f"({min(values):.0f}-{max(values):.0f})  {statistics.median(cpu):5.2f} ms/MiB")
        print(f"  stream/file: {output.ratio:.2f}; target >= {OUTPUT_TARGET}: {verdict}; "
              f"agent RSS {output.agent_rss_before_mib:.0f} MiB before, at most "
              f"{output.agent_rss_max_mib:.0f} MiB after a round")
    if memory:
        seconds = statistics.median(memory.seconds)
        print(f"\ngetTaskOutput of {memory.size / MiB:,.0f} MiB in {memory.calls} pages of "
              f"1 MiB, read {len(memory.seconds)} times: {seconds:.1f} s per pass "
              f"({memory.size / seconds / MiB:.0f} MiB/s)")
        print("  agent RSS after each quarter: "
              + " ".join(f"{value:.1f}" for value in memory.rss_quarters_mib) + " MiB")
        print(f"  agent RSS: {memory.rss_before_mib:.1f} MiB before, "
              f"{memory.rss_peak_mib:.1f} MiB at most while reading, "
              f"{memory.rss_after_mib:.1f} MiB after "
              f"({memory.rss_after_mib - memory.rss_before_mib:+.1f} MiB); "
              f"VmHWM {memory.hwm_before_mib:.1f} -> {memory.hwm_after_mib:.1f} MiB")


def report_rate(rate: RateResult) -> None:
    rounds = len(rate.of("startTask"))
    print(f"\nlatency at {rate.rate:,.0f} calls/s offered (open loop, latency from when each "
          f"call was due), {rounds} alternating rounds of {rate.seconds:g} s, median over "
          f"rounds; client on CPU 1, servers on CPUs 0-1")
    print(f"{'target':<13} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'CPU steal':>9} "
          f"{'p99 / bare':>10}")
    bare_p99 = rate.median("bare aiohttp", "p99_ms")
    for target in RATE_TARGETS:
        p99 = rate.median(target, "p99_ms")
        print(f"{target:<13} {rate.median(target, 'p50_ms'):>7.2f} {p99:>7.2f} "
              f"{rate.median(target, 'max_ms'):>7.1f} {rate.median(target, 'steal_pct'):>8.0f}% "
              f"{p99 / bare_p99:>10.2f}")
    print(f"  the store's durable insert alone (one task every {1000 / rate.rate:g} ms, "
          f"nothing else running; DB thread hop + statement + fsync): "
          f"p50 {rate.commit_p50_ms:.2f} ms, p99 {rate.commit_p99_ms:.2f} ms")
    p99 = rate.median("startTask", "p99_ms")
    print(f"  startTask p99 {p99:.2f} ms (target <= {RATE_P99_TARGET_MS:g} ms: "
          f"{'met' if p99 <= RATE_P99_TARGET_MS else 'missed'})")
    if bare_p99 > RATE_P99_TARGET_MS / 2:
        print(f"  this host cannot judge the target: a bare aiohttp handler alone has p99 "
              f"{bare_p99:.2f} ms at this rate (CPU steal, other load)")


def report(submit: list[SubmitResult] | None, rate: RateResult | None,
           checksum: ChecksumResult | None, restart: RestartResult | None) -> None:
    if submit:
        print("\nstartTask (test.sleep, queued behind one blocker; durable insert); "
              "agent on CPU 0, wrk on CPU 1")
        print(f"{'conns':>5} {'calls/request':>13} {'tasks/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'agent CPU us/task':>17}")
        for row in submit:
            cpu = f"{row.cpu_us_per_task:.0f}" if row.cpu_us_per_task is not None else "-"
            print(f"{row.connections:>5} {row.batch:>13} {row.tasks_per_s:>8,.0f} "
                  f"{row.p50_ms:>7.2f} {row.p99_ms:>7.2f} {cpu:>17}")
        best = max(row.tasks_per_s for row in submit)
        print(f"  best: {best:,.0f} tasks/s (target >= {SUBMIT_TARGET:,.0f}: "
              f"{'met' if best >= SUBMIT_TARGET else 'missed'}); latencies are per HTTP "
              f"request")
    if rate:
        report_rate(rate)
    if checksum:
        size = checksum.size / GiB
        print(f"\nchecksum sha256 of a {size:g} GiB page-cached file, "
              f"{len(checksum.task_s)} alternating rounds (median, range)")
        for name, values in (("sha256sum", checksum.sha256sum_s),
                             ("task (caller)", checksum.task_s),
                             ("task (in process)", checksum.task_work_s)):
            median = statistics.median(values)
            print(f"  {name:<18} {median:6.2f} s  ({min(values):.2f}-{max(values):.2f})  "
                  f"{checksum.size / median / MiB:7.0f} MiB/s")
        print(f"  task/sha256sum time ratio: {checksum.ratio:.2f}")
    if restart:
        print(f"\nrestart (SIGKILL) with {restart.stored:,} finished tasks in the store and "
              f"{restart.running} running")
        print(f"  serving again after {restart.serve_again_s * 1000:.0f} ms "
              f"(process start to /health 200, reconcile included; an empty store: "
              f"{restart.empty_start_s * 1000:.0f} ms)")
        print(f"  reconcile (load unfinished, check PID + start time, re-attach): "
              f"{restart.reconcile_ms:.1f} ms")
        print(f"  all {restart.running} re-attached (same PIDs, running) after "
              f"{restart.all_reattached_s * 1000:.0f} ms")
        print(f"  listTasks pageSize=1000 over the store: {restart.list_page_ms:.0f} ms")
        print(f"  agent RSS: {restart.rss_idle_mib:.0f} MiB idle with the store, "
              f"{restart.rss_loaded_mib:.0f} MiB with {restart.running} running, "
              f"{restart.rss_after_restart_mib:.0f} MiB after the restart")
        print(f"  task process RSS (test.sleep, median): {restart.child_rss_mib:.1f} MiB")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.bench_tasks",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: 3 s of submits, a 256 MiB file, 1,000 stored tasks, "
                             "40 started tasks, 64 MiB of output, 256 MiB paged")
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"comma-separated subset of {','.join(CASES)}")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    unknown = only - set(CASES)
    if unknown:
        parser.error(f"unknown case(s) {', '.join(sorted(unknown))}; known: {', '.join(CASES)}")
    quick = args.quick
    if "submit" in only:
        try:
            bench_http.check_tools()
        except bench_http.BenchError as exc:  # wrk, taskset or CPUs 0 and 1 missing
            print(f"bench_tasks: {exc}", file=sys.stderr)
            return 2
    try:
        submit = bench_submit(3.0 if quick else 10.0) if "submit" in only else None
        rate = bench_rate(2.0 if quick else 10.0) if "submit" in only else None
        checksum = (bench_checksum(256 * MiB if quick else GiB, 2 if quick else 3)
                    if "checksum" in only else None)
        restart = (bench_restart(1000 if quick else 10_000, 20)
                   if "restart" in only else None)
        start = bench_start(40 if quick else 200) if "start" in only else None
        output = (bench_output(64 * MiB if quick else 256 * MiB, 2 if quick else 3)
                  if "output" in only else None)
        memory = (bench_memory(64 * MiB if quick else 256 * MiB, 4)
                  if "memory" in only else None)
    except (BenchError, bench_http.BenchError) as exc:
        print(f"bench_tasks: {exc}", file=sys.stderr)
        return 1
    report(submit, rate, checksum, restart)
    report_new(start, output, memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
