"""The engine's list pages with 500,000 tasks in its store (issue 18, point 3).

A store (sqlite in a fresh state directory, or a database of a throwaway
PostgreSQL cluster) is filled with ``hosts`` hosts, in maintenance (nobody
polls them: what is timed is the store and the views), and ``tasks`` tasks
spread over them, each with an agent's whole task document as the engine
keeps it. Then a ``vdsm-engine serve`` on it answers, over one kept-alive
connection: ``listTasks`` first pages (100), the next pages after them (the
page token), pages of one host and of one state, and ``listHosts`` first
pages (its default, 100 hosts) and the next pages after them. Each
kind of call is timed ``repeat`` times; p50 and p99 in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import importlib
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import peewee

from vdsm_agent.engine.settings import EngineConfig
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store.models import HostTaskRow, engine_proxy
from vdsm_agent.engine.store.rows import atomic

STATES = ("done",) * 17 + ("failed", "canceled", "running")  # mostly finished
CHUNK = 5000  # rows per insert batch


def _task_doc(task_id: str, state: str, created: float) -> dict[str, Any]:
    """A task document as an agent lists it (a finished checksum, ~700 bytes)."""
    final = state != "running"
    return {
        "id": task_id, "kind": "checksum",
        "params": {"path": f"/var/lib/images/{task_id[:8]}.img", "algorithm": "sha256",
                   "offset": 0},
        "state": state,
        "progress": {"percent": 100.0 if final else 40.0, "done": 1 << 30,
                     "total": 1 << 30, "rate": 6.1e8, "eta": 0.0},
        "result": {"digest": "0" * 64} if state == "done" else None,
        "error": None, "warnings": [], "resources": [f"file:/var/lib/images/{task_id[:8]}.img"],
        "createdAt": "2026-12-06T06:00:00.000000Z", "startedAt": "2026-12-06T06:00:00.01Z",
        "endedAt": "2026-12-06T06:00:02.000000Z" if final else None,
        "heartbeatAt": None, "deadline": None, "outputSize": 412,
        "outputTruncatedBefore": 0, "pid": 4242, "stopRequested": None, "resets": []}


def _insert_tasks(hosts: list[str], tasks: int, seed: int) -> None:
    """(DB thread) ``tasks`` task rows spread over ``hosts``, in chunks."""
    rng = random.Random(seed)
    base = time.time() - 86400
    rows: list[dict[str, Any]] = []

    def flush() -> None:
        with atomic():
            for chunk in peewee.chunked(rows, 500):
                HostTaskRow.insert_many(chunk).execute()
        rows.clear()

    for number in range(tasks):
        task_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        state = rng.choice(STATES)
        created = base + number * 0.1
        doc = _task_doc(task_id, state, created)
        rows.append({"host": hosts[number % len(hosts)], "task_id": task_id, "kind": "checksum",
                     "state": state, "external": True,
                     "progress": orjson.dumps(doc["progress"]).decode(),
                     "created_at": created, "started_at": created + 0.01,
                     "ended_at": None if state == "running" else created + 2,
                     "updated_at": created + 2, "job_id": None, "step_id": None,
                     "detail": orjson.dumps(doc).decode()})
        if len(rows) >= CHUNK:
            flush()
    if rows:
        flush()


def _analyze() -> None:
    """(DB thread) Table statistics, as a database that has lived has them (autovacuum
    on PostgreSQL): the planner sees 500,000 rows, not an empty table. PostgreSQL's
    autovacuum also vacuums a table that only had inserts (since version 13): its
    visibility map lets the task counts of listHosts be read from an index alone."""
    if isinstance(engine_proxy.obj, peewee.PostgresqlDatabase):
        engine_proxy.execute_sql("VACUUM ANALYZE")
    else:
        engine_proxy.execute_sql("ANALYZE")


async def fill(database_url: str, hosts: int, tasks: int) -> list[str]:
    """The store with ``hosts`` hosts in maintenance and ``tasks`` tasks; host names."""
    store = await EngineStore.open(database_url)
    names = [f"host{index:05d}" for index in range(hosts)]
    try:
        now = time.time()
        for index, name in enumerate(names):
            await store.run(repository.add_host, name, f"http://127.0.0.1:{20000 + index}",
                            None, None, None, True, now)
        await store.run(_insert_tasks, names, tasks, 1)
        await store.run(_analyze)
    finally:
        await store.close()
    return names


class Timer:
    """JSON-RPC calls to the engine over one kept-alive connection, timed."""

    def __init__(self, port: int) -> None:
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        self.timings: dict[str, list[float]] = {}

    def call(self, label: str, method: str, **params: Any) -> Any:
        body = orjson.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 1})
        began = time.perf_counter()
        self.connection.request("POST", "/jsonrpc", body, {"Content-Type": "application/json"})
        answer = orjson.loads(self.connection.getresponse().read())
        self.timings.setdefault(label, []).append(time.perf_counter() - began)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        self.connection.close()


def time_pages(port: int, names: list[str], repeat: int) -> dict[str, list[float]]:
    """Each kind of page ``repeat`` times (after one warm-up round)."""
    rng = random.Random(2)
    timer = Timer(port)
    try:
        for round_number in range(repeat + 1):
            if round_number == 1:
                timer.timings.clear()  # the first round warms the caches
            first = timer.call("listTasks first page", "listTasks", pageSize=100)
            token = first["nextPageToken"]
            for _ in range(3):
                page = timer.call("listTasks next page", "listTasks", pageSize=100,
                                  pageToken=token)
                token = page["nextPageToken"]
            timer.call("listTasks of a host", "listTasks", pageSize=100,
                       filter={"host": rng.choice(names)})
            timer.call("listTasks of a state", "listTasks", pageSize=100,
                       filter={"state": "failed"})
            hosts = timer.call("listHosts first page", "listHosts")
            token = hosts["nextPageToken"]
            for _ in range(3):
                if token is None:
                    break
                token = timer.call("listHosts next page", "listHosts",
                                   pageToken=token)["nextPageToken"]
        return timer.timings
    finally:
        timer.close()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * share))]


def summary(timings: dict[str, list[float]]) -> dict[str, tuple[float, float, int]]:
    """Per kind of call: (p50 ms, p99 ms, calls)."""
    return {label: (statistics.median(values) * 1000, percentile(values, 0.99) * 1000,
                    len(values)) for label, values in timings.items()}


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A throwaway PostgreSQL cluster and database (the tests' own helper: root,
    PostgreSQL 15 from scripts/bootstrap); its URL."""
    # Imported by name: the tests' module is not part of what mypy checks here.
    server = importlib.import_module("tests.engine_support").start_postgres()
    try:
        yield server.url(server.create_database())
    finally:
        server.stop()


def fill_sync(database_url: str, state_dir: Path, hosts: int, tasks: int) -> list[str]:
    config = EngineConfig.defaults().replace(state_dir=str(state_dir))
    state_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(fill(database_url or config.database_url, hosts, tasks))
