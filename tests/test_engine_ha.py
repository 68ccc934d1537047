"""Several engines on one PostgreSQL (docs/engine.md, "Several engines"): real
``vdsm-engine serve`` processes, a real PostgreSQL server, real agents.

Hosts are leased and spread evenly, rebalanced when an engine joins or
leaves; a killed engine's hosts are taken over within the lease time and its
jobs complete with every step run once (the agents' tasks counted by the
engine-chosen IDs); a frozen engine that resumes after its lease expired is
fenced; waitJob on one engine wakes when another's step finishes; a
PostgreSQL restart is survived."""

from __future__ import annotations

import asyncio
import http.client
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.engine_support import PG_BIN, DroppingProxy, fleet, postgres_server  # noqa: F401
from tests.ha_support import (
    Database,
    EngineProcess,
    RpcError,
    engine_command,
    engines,
    wait_for,
)
from vdsm_agent.engine.states import StepState
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store import leases as store_leases
from vdsm_agent.engine.store.db import FENCE
from vdsm_agent.engine.store.leases import Fence, LeaseLost
from vdsm_agent.engine.store.migrations import latest_version

pytestmark = pytest.mark.slow

LEASE = 2.0  # the engines' lease_time here (tests/ha_support.py)
# A dead engine's hosts are taken within its lease, plus one tick of the taker
# (lease_time / 3) and the time its worker needs to start.
TAKEOVER_BOUND = LEASE + LEASE / 3 + 2.0


@pytest.fixture
def ha_db(postgres_server) -> Iterator[tuple[str, Database]]:  # noqa: F811
    name = postgres_server.create_database()
    database = Database(postgres_server, name)
    try:
        yield postgres_server.url(name), database
    finally:
        database.close()
        postgres_server.drop_database(name)


def add_hosts(engine: EngineProcess, agents: Any) -> list[str]:
    names = []
    for agent in agents:
        engine.call("addHost", name=agent.name, url=agent.url)
        names.append(agent.name)
    return names


def all_up(engine: EngineProcess, count: int) -> bool:
    hosts = engine.call("listHosts")["hosts"]
    return len(hosts) == count and all(host["status"] == "up" for host in hosts)


def leased_by(db: Database, engine: EngineProcess) -> list[str]:
    assert engine.proc is not None
    return sorted(host for host, pid in db.owners().items() if pid == str(engine.proc.pid))


def agent_task_ids(agent: Any) -> list[str]:
    return sorted(task["id"] for task in agent.call("listTasks", pageSize=1000)["tasks"])


def wait_job(engine: EngineProcess, job_id: str, timeout: float = 60) -> dict[str, Any]:
    """waitJob, again after a failed call (a restarting database), until it is final."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            job = engine.call("waitJob", http_timeout=40, jobID=job_id,
                              timeout=min(30.0, max(deadline - time.monotonic(), 0.1)))
        except (RpcError, OSError):
            job = None
        if job is not None and job["state"] in ("done", "failed", "partial"):
            return dict(job)
        assert time.monotonic() < deadline, f"job {job_id} not final: {job}"
        time.sleep(0.2)


# -- leases spread and rebalanced ------------------------------------------------------------


def test_hosts_spread_and_rebalanced_when_engines_join_and_leave(tmp_path, ha_db):
    url, db = ha_db
    with fleet(tmp_path / "agents", 6) as agents, \
            engines(tmp_path, url, 2) as (first, second):
        names = add_hosts(first, agents)
        wait_for(lambda: db.spread() == [3, 3], timeout=15)
        # Every engine answers for every host: the other's hosts from the database.
        wait_for(lambda: all_up(second, 6) and all_up(first, 6), timeout=20)
        assert sorted(leased_by(db, first) + leased_by(db, second)) == names
        listing = first.call("listEngines")
        assert [len(item["hosts"]) for item in listing["engines"]] == [3, 3]
        third = EngineProcess(tmp_path, "engine3", url)
        try:
            third.start()
            wait_for(lambda: db.spread() == [2, 2, 2], timeout=5 * LEASE)
            assert len(leased_by(db, third)) == 2
            wait_for(lambda: all_up(third, 6), timeout=20)
            # SIGTERM: its leases are given back at once, taken within a tick.
            given_back = time.monotonic()
            assert third.terminate() == 0, third.logs()
            wait_for(lambda: db.spread() == [3, 3], timeout=LEASE)
            assert time.monotonic() - given_back < LEASE
        finally:
            third.close()
        # Every host is still polled: a job on each completes.
        jobs = [second.call("startTask", host=name, kind="test.sleep",
                            params={"seconds": 0.1})["jobID"] for name in names]
        assert [wait_job(first, job)["state"] for job in jobs] == ["done"] * 6
        assert "leaseReleased" in third.logs() or "leases given back" in third.logs()
        # Each lease change is counted for Prometheus (GET /metrics): the first two
        # took 3 each, gave 2 back for the third (rebalance), took them again later.
        counts = [lease_changes(engine) for engine in (first, second)]
        assert sum(c.get(("taken", "expired"), 0) for c in counts) >= 8, counts
        assert sum(c.get(("released", "rebalance"), 0) for c in counts) >= 2, counts


def lease_changes(engine: EngineProcess) -> dict[tuple[str, str], float]:
    """``vdsm_engine_host_lease_changes_total`` by (change, reason), from /metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    found = re.findall(r'^vdsm_engine_host_lease_changes_total\{change="(\w+)",'
                       r'reason="(\w+)"\} (\S+)$', text, re.M)
    return {(change, reason): float(value) for change, reason, value in found}


# -- kill -9 during a fan-out job ---------------------------------------------------------------


def test_killed_engine_hosts_taken_over_and_every_step_runs_once(tmp_path, ha_db):
    url, db = ha_db
    share = tmp_path / "share"
    share.mkdir()
    with fleet(tmp_path / "agents", 4) as agents, \
            engines(tmp_path, url, 2) as (victim, survivor):
        names = add_hosts(survivor, agents)
        wait_for(lambda: db.spread() == [2, 2], timeout=15)
        wait_for(lambda: all_up(survivor, 4), timeout=20)
        victims = leased_by(db, victim)
        assert len(victims) == 2
        # Tasks on every host (their steps run by each host's engine), then the
        # fan-out job, and the engine of half the hosts killed in the middle.
        jobs = [survivor.call("startTask", host=name, kind="test.sleep",
                              params={"seconds": 2})["jobID"] for name in names]

        def running_everywhere() -> bool:
            return all(survivor.call("getJob", jobID=job)["steps"][0]["state"] == "running"
                       for job in jobs)
        wait_for(running_everywhere, timeout=15)
        fanout = survivor.call("manageStorageConnection", hosts=names, uri=f"file://{share}",
                               connectionID="ha-share")["jobID"]
        killed = time.monotonic()
        victim.kill()
        took = wait_for(lambda: sorted(leased_by(db, survivor)) == names, timeout=3 * LEASE)
        assert time.monotonic() - killed < TAKEOVER_BOUND, took
        for job in [*jobs, fanout]:
            assert wait_job(survivor, job)["state"] == "done", job
        # Every step ran once: each agent has exactly its step's task.
        for agent, job in zip(agents, jobs, strict=True):
            task_id = survivor.call("getJob", jobID=job)["steps"][0]["taskID"]
            assert agent_task_ids(agent) == [task_id]
            assert agent.call("getTask", taskID=task_id)["state"] == "done"
            connections = agent.call("getStorageConnectionList")
            assert "ha-share" in str(connections)
        audit = survivor.logs()
        assert "leaseTaken" in audit
        # Lease moves are not refusals: INFO audit lines.
        assert all(" INFO [vdsm_agent.audit]" in line for line in audit.splitlines()
                   if '"event":"lease"' in line)


# -- a frozen engine resumes after its lease expired ------------------------------------------


def test_frozen_engine_past_its_lease_is_fenced(tmp_path, ha_db):
    url, db = ha_db
    with fleet(tmp_path / "agents", 2) as agents, \
            engines(tmp_path, url, 2) as (frozen, other):
        add_hosts(other, agents)
        wait_for(lambda: db.spread() == [1, 1], timeout=15)
        wait_for(lambda: all_up(other, 2), timeout=20)
        (host,) = leased_by(db, frozen)
        agent = next(agent for agent in agents if agent.name == host)
        ((generation,),) = db.query("SELECT generation FROM host_leases WHERE host = %s", host)
        frozen.freeze()
        wait_for(lambda: host in leased_by(db, other), timeout=3 * LEASE)
        ((taken,),) = db.query("SELECT generation FROM host_leases WHERE host = %s", host)
        assert taken > generation
        job = other.call("startTask", host=host, kind="test.sleep", params={"seconds": 0.2})
        assert wait_job(other, job["jobID"])["state"] == "done"
        frozen.thaw()
        # It resumes believing it leases the host: its worker's writes are refused
        # or its tick finds the lease gone; either way the worker stops.
        wait_for(lambda: f"host {host}: lease lost" in frozen.logs()
                 or f"lease lost for host {host}" in frozen.logs(), timeout=10)
        assert frozen.alive()
        # One line, no traceback (the worker's loops end quietly: LoopEnded).
        assert "Traceback" not in frozen.logs()
        assert frozen.logs().count(f"lease lost for host {host}") <= 1
        # No double action: the one task, and the hosts spread again over both.
        assert agent_task_ids(agent) == [job["steps"][0]["taskID"]]
        wait_for(lambda: db.spread() == [1, 1], timeout=5 * LEASE)
        job = frozen.call("startTask", host=host, kind="test.sleep", params={"seconds": 0.1})
        assert wait_job(frozen, job["jobID"])["state"] == "done"
        assert len(agent_task_ids(agent)) == 2


async def as_worker(fence: Fence, call: Any) -> Any:
    """Await ``call`` (a store.run) as a leased host's worker does: fenced."""
    return await asyncio.create_task(call, context=_with_fence(fence))


def _with_fence(fence: Fence) -> Any:
    import contextvars

    context = contextvars.copy_context()
    context.run(FENCE.set, fence)
    return context


async def test_a_fenced_write_is_refused_after_a_takeover(postgres_server):  # noqa: F811
    """The fence itself, in process: engine A's lease of a host expires and B takes
    it (generation + 1); A's writes with its old generation are refused and
    change nothing, B's are applied."""
    name = postgres_server.create_database()
    store = await EngineStore.open(postgres_server.url(name))
    try:
        await store.run(repository.add_host, "h1", "http://127.0.0.1:1/jsonrpc", None, None,
                        None, False, time.time())
        await store.run(store_leases.register_engine, "a", "a", 1, "0", 3)
        await store.run(store_leases.register_engine, "b", "b", 1, "0", 3)
        first = await store.run(store_leases.tick, "a", 1.0)
        assert first.held == {"h1": (1, False)}
        await store.run(repository.create_job, "job1", "startTask", {}, [repository.StepSpec(
            "h1", "startTask", {"taskID": "t1"}, task_id="t1")], ["step1"], [], time.time())
        fence_a, fence_b = Fence("h1", "a", 1), Fence("h1", "b", 2)
        assert await as_worker(fence_a, store.run(repository.claim_step, "step1"))
        # A's lease expires (the database's clock) and A is no longer live: B takes it.
        await asyncio.sleep(1.1)
        taken = await store.run(store_leases.tick, "b", 1.0)
        assert taken.held == {"h1": (2, False)}
        assert taken.taken == ["h1"]
        with pytest.raises(LeaseLost):
            await as_worker(fence_a, store.run(repository.step_accepted, "step1",
                                               StepState.RUNNING, time.time()))
        with pytest.raises(LeaseLost):
            await as_worker(fence_a, store.run(repository.claim_step, "step1"))
        assert (await store.run(repository.get_step, "step1")).state == "pending"
        assert await as_worker(fence_b, store.run(repository.claim_step, "step1"))
        await as_worker(fence_b, store.run(repository.step_accepted, "step1",
                                           StepState.RUNNING, time.time()))
        assert (await store.run(repository.get_step, "step1")).state == "running"
        # A's renewal does not bring it back: the lease is B's (and unexpired).
        assert (await store.run(store_leases.tick, "a", 1.0)).held == {}
    finally:
        await store.close()
        postgres_server.drop_database(name)


# -- wake-ups across engines ---------------------------------------------------------------------


def test_wait_job_on_one_engine_wakes_when_another_engine_finishes_it(tmp_path, ha_db):
    url, db = ha_db
    # Idle workers look for pending steps only every ~resync_interval: the new step
    # reaches the other engine by NOTIFY.
    with fleet(tmp_path / "agents", 2) as agents, \
            engines(tmp_path, url, 2, resync_interval=60) as (runner, waiter):
        add_hosts(waiter, agents)
        wait_for(lambda: db.spread() == [1, 1], timeout=15)
        wait_for(lambda: all_up(waiter, 2), timeout=20)
        (host,) = leased_by(db, runner)
        began = time.monotonic()
        job = waiter.call("startTask", host=host, kind="test.sleep", params={"seconds": 0.5})
        done = waiter.call("waitJob", http_timeout=40, jobID=job["jobID"], timeout=30)
        elapsed = time.monotonic() - began
        assert done["state"] == "done"
        assert elapsed < 8, elapsed  # not the 30 s of the wait, nor a resync interval
        # What only the agent has is asked of it from the other engine all the same.
        task_id = done["steps"][0]["taskID"]
        output = waiter.call("getTaskOutput", host=host, taskID=task_id)
        assert output["host"] == host
        assert output["eof"] is True
        assert waiter.call("getTask", host=host, taskID=task_id)["task"]["state"] == "done"
        (listed,) = [item for item in waiter.call("listTasks", pageSize=1000)["tasks"]
                     if item["id"] == task_id]
        assert listed["hostStatus"] == "up"  # the status the other engine wrote
        (item,) = [doc for doc in waiter.call("listHosts")["hosts"] if doc["name"] == host]
        assert item["polledBy"].endswith(f":{runner.proc.pid}")
        assert item["leaseGeneration"] >= 1


# -- a lost reply, then the engine killed: the re-sent step runs once ----------------------------


class ThreadedProxy:
    """``DroppingProxy`` on its own event loop thread (the engines are processes)."""

    def __init__(self, upstream_port: int, method: str, drops: int) -> None:
        self.proxy = DroppingProxy(upstream_port, method, drops=drops)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> DroppingProxy:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.start(), self.loop).result(10)
        return self.proxy

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def test_a_step_resent_by_the_engine_that_takes_over_runs_once(tmp_path, ha_db):
    url, db = ha_db
    with fleet(tmp_path / "agents", 1) as agents, \
            ThreadedProxy(agents[0].port, "startTask", drops=1000) as proxy, \
            engines(tmp_path, url, 2) as pair:
        pair[0].call("addHost", name="host1", url=proxy.url)
        wait_for(lambda: len(db.owners()) == 1, timeout=15)
        owner = next(engine for engine in pair if leased_by(db, engine))
        other = next(engine for engine in pair if engine is not owner)
        wait_for(lambda: all_up(other, 1), timeout=20)
        job = other.call("startTask", host="host1", kind="test.sleep", params={"seconds": 0.2})
        task_id = job["steps"][0]["taskID"]
        wait_for(lambda: proxy.dropped >= 1, timeout=15)  # the agent started it; no reply
        owner.kill()
        proxy.drops = proxy.dropped  # the replies come through from now on
        assert wait_job(other, job["jobID"])["state"] == "done"
        assert leased_by(db, other) == ["host1"]
        assert agent_task_ids(agents[0]) == [task_id]
        assert proxy.dropped >= 1


# -- PostgreSQL restarted mid-job ------------------------------------------------------------------


def restart_postgres(server: Any) -> None:
    subprocess.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D",
                    str(server.data), "-l", str(Path(server.root) / "postgres.log"), "-w",
                    "-t", "60", "-m", "fast", "restart"], check=True, capture_output=True,
                   timeout=90)


def test_engines_survive_a_postgresql_restart_mid_job(tmp_path, ha_db, postgres_server):  # noqa: F811
    url, db = ha_db
    with fleet(tmp_path / "agents", 2) as agents, \
            engines(tmp_path, url, 2) as pair:
        names = add_hosts(pair[0], agents)
        wait_for(lambda: db.spread() == [1, 1], timeout=15)
        wait_for(lambda: all_up(pair[1], 2), timeout=20)
        jobs = [pair[1].call("startTask", host=name, kind="test.sleep",
                             params={"seconds": 2})["jobID"] for name in names]
        db.close()
        restart_postgres(postgres_server)
        db.connect()
        for job in jobs:
            assert wait_job(pair[0], job, timeout=60)["state"] == "done"
        assert all(engine.alive() for engine in pair)
        wait_for(lambda: db.spread() == [1, 1], timeout=5 * LEASE)
        for agent, job in zip(agents, jobs, strict=True):
            assert agent_task_ids(agent) == [pair[0].call("getJob", jobID=job)["steps"][0][
                "taskID"]]
        # A job after the restart runs too (the listener and the stores reconnected).
        job = pair[1].call("startTask", host=names[0], kind="test.sleep",
                           params={"seconds": 0.1})
        assert wait_job(pair[0], job["jobID"])["state"] == "done"
        # Every connection of the engines dropped (an idle timeout, a proxy): the next
        # calls run again on new ones, the API answers at once.
        dropped = db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert len(dropped) >= 4  # per engine: its store and its listener
        job = pair[1].call("startTask", host=names[1], kind="test.sleep",
                           params={"seconds": 0.1})
        assert pair[0].call("waitJob", http_timeout=40, jobID=job["jobID"],
                            timeout=30)["state"] == "done"
        assert all(engine.alive() for engine in pair)
        assert len(agent_task_ids(agents[1])) == 2


# -- rolling upgrades: a store of a newer schema is refused ---------------------------------


def test_engine_refuses_a_store_of_a_newer_schema(tmp_path, ha_db):
    url, db = ha_db
    with engines(tmp_path, url, 1) as (engine,):
        assert engine.call("listEngines")["engines"][0]["schemaVersion"] == latest_version()
    db.query("INSERT INTO engine_schema_version (version, description, applied_at) "
             "VALUES (99, 'from the future', 0) RETURNING version")
    older = EngineProcess(tmp_path, "older", url)
    refused = subprocess.run(
        [*engine_command(), "serve", "--state-dir", str(older.dir / "state"), "--listen",
         f"127.0.0.1:{older.port}", "--database", url],
        capture_output=True, text=True, timeout=60, check=False)
    assert refused.returncode == 2, refused.stderr
    assert "schema version is 99" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert db.query("SELECT count(*) FROM engines") == [(0,)]


def test_fair_shares_add_up_to_the_hosts():
    live = ["a", "b", "c"]
    assert [store_leases.fair_share(4, live, engine) for engine in live] == [2, 1, 1]
    assert [store_leases.fair_share(6, live, engine) for engine in live] == [2, 2, 2]
    assert [store_leases.fair_share(1, live, engine) for engine in live] == [1, 0, 0]
    assert store_leases.fair_share(5, [], "a") == 5  # not yet counted live: itself


def test_a_second_engine_on_one_sqlite_file_is_refused(tmp_path):
    database = f"sqlite:///{tmp_path / 'engine.db'}"
    first = EngineProcess(tmp_path, "first", database)
    try:
        first.start()
        second = EngineProcess(tmp_path, "second", database)
        refused = subprocess.run(
            [*engine_command(), "serve", "--state-dir", str(second.dir / "state"), "--listen",
             f"127.0.0.1:{second.port}", "--database", database],
            capture_output=True, text=True, timeout=60, check=False)
        assert refused.returncode == 2
        assert f"another engine uses the database {tmp_path / 'engine.db'}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert first.call("listEngines")["engines"][0]["self"] is True
    finally:
        first.close()
    assert first.proc is not None
    assert first.proc.returncode == 0, first.logs()
    # Once the first one stopped, the lock is free.
    again = EngineProcess(tmp_path, "again", database)
    try:
        again.start()
        assert again.call("ping")["database"] == "sqlite"
    finally:
        again.close()
