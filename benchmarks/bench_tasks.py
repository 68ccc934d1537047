"""Task manager benchmarks against real agent processes.

* ``submit``: startTask throughput and latency (p50/p99) with N concurrent
  clients; tasks stay queued (one blocker holds the only run slot), so this
  measures validation + the durable insert, not process start-up.
* ``checksum``: a checksum task over a 1 GiB file against ``sha256sum`` on the
  same (page-cached) file, alternating, in the same run.
* ``restart``: 10,000 finished tasks in the store and 20 running; the agent
  is killed with SIGKILL and started again: time until it serves again
  (``/health``) and until all 20 are re-attached (same PIDs, still running).
* ``rss``: resident memory of the agent (idle, with 10,000 tasks and 20
  running) and of one task process.

``python -m benchmarks.bench_tasks [--quick] [--only submit,checksum,restart]``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import http.client
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from vdsm_agent.store import Store
from vdsm_agent.tasks import clock, repository
from vdsm_agent.tasks.record import TaskRecord, request_hash
from vdsm_agent.tasks.states import State

GiB = 1024 ** 3
MiB = 1024 ** 2


class BenchError(Exception):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
            conn.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
            answer = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        if "error" in answer:
            raise BenchError(f"{method}: {answer['error']}")
        return answer["result"]

    def healthy(self) -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from spawn until /health answers."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"agent exited with {self.proc.returncode}")
            if self.healthy():
                return time.monotonic() - self.started
            time.sleep(0.005)
        raise BenchError("agent not ready")

    def rss_mib(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / MiB


def start_agent(state_dir: Path, images: Path, **flags: Any) -> Agent:
    port = _free_port()
    argv = [sys.executable, "-m", "vdsm_agent.main", "--state-dir", str(state_dir),
            "--listen", f"127.0.0.1:{port}", "--unix-socket", "none",
            "--allowed-root", str(images), "--log-level", "info",
            "--enable-test-kinds", "true"]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    log_path = state_dir.parent / f"agent-{port}.log"
    with open(log_path, "wb") as log:
        agent = Agent(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), port,
                      state_dir, time.monotonic(), log_path)
    agent.wait_ready()
    return agent


def stop_agent(agent: Agent, sig: int = signal.SIGTERM) -> None:
    if agent.proc.poll() is None:
        agent.proc.send_signal(sig)
        agent.proc.wait(timeout=30)


def kill_tasks(state_dir: Path) -> None:
    """SIGKILL every task process group of this state dir (found by command line)."""
    prefix = str(state_dir)
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if "vdsm_agent.tasks.child" in cmdline and any(a.startswith(prefix) for a in cmdline):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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


@dataclasses.dataclass(frozen=True)
class SubmitResult:
    concurrency: int
    count: int
    per_second: float
    p50_ms: float
    p99_ms: float
    max_ms: float


async def _submit_many(port: int, count: int, concurrency: int) -> tuple[float, list[float]]:
    url = f"http://127.0.0.1:{port}/jsonrpc"
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(count):
        queue.put_nowait(index)

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            body = {"jsonrpc": "2.0", "method": "startTask", "id": index,
                    "params": {"kind": "test.sleep", "params": {"seconds": 1},
                               "taskID": str(uuid.uuid4())}}
            began = time.perf_counter()
            async with session.post(url, json=body) as response:
                answer = await response.json()
            latencies.append(time.perf_counter() - began)
            if "error" in answer:
                raise BenchError(f"startTask: {answer['error']}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return elapsed, latencies


def bench_submit(count: int, concurrencies: Sequence[int]) -> list[SubmitResult]:
    results = []
    for concurrency in concurrencies:
        with workdir() as root:
            agent = start_agent(root / "state", root / "images", max_running_tasks=1,
                                max_queued_tasks=count + 1000)
            try:
                agent.call("startTask", kind="test.sleep", params={"seconds": 3600})
                asyncio.run(_submit_many(agent.port, min(200, count), concurrency))  # warm-up
                elapsed, latencies = asyncio.run(_submit_many(agent.port, count, concurrency))
            finally:
                stop_agent(agent)
        results.append(SubmitResult(concurrency, count, count / elapsed,
                                    statistics.median(latencies) * 1000,
                                    percentile(latencies, 0.99) * 1000, max(latencies) * 1000))
    return results


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


# -- report --------------------------------------------------------------------------------------


def report(submit: list[SubmitResult] | None, checksum: ChecksumResult | None,
           restart: RestartResult | None) -> None:
    if submit:
        print("\nstartTask (test.sleep, queued behind one blocker; durable insert)")
        print(f"{'clients':>7} {'tasks':>6} {'tasks/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'max ms':>7}")
        for row in submit:
            print(f"{row.concurrency:>7} {row.count:>6} {row.per_second:>8,.0f} "
                  f"{row.p50_ms:>7.2f} {row.p99_ms:>7.2f} {row.max_ms:>7.1f}")
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
                        help="small sizes: 1,000 submits, a 256 MiB file, 1,000 stored tasks")
    parser.add_argument("--only", default="submit,checksum,restart",
                        help="comma-separated subset of submit,checksum,restart")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    try:
        submit = (bench_submit(1000 if args.quick else 5000, (1, 16))
                  if "submit" in only else None)
        checksum = (bench_checksum(256 * MiB if args.quick else GiB, 2 if args.quick else 3)
                    if "checksum" in only else None)
        restart = (bench_restart(1000 if args.quick else 10_000, 20)
                   if "restart" in only else None)
    except BenchError as exc:
        print(f"bench_tasks: {exc}", file=sys.stderr)
        return 1
    report(submit, checksum, restart)
    return 0


if __name__ == "__main__":
    sys.exit(main())
