"""Several engines on one PostgreSQL: what one engine shows of the hosts another
engine polls (docs/engine.md, "Several engines"). Real ``vdsm-engine serve``
processes, a real PostgreSQL server, real agents.

The console's live stream on engine B follows a task and a host that engine A
leases (the changes relayed by NOTIFY); B's partial-result lists
(``unreachableHosts``, a task's ``unknown`` state) cover A's host whose agent
was killed; a conflicting startTask sent to B for A's host is refused at once
(B's early lock, from the host's kind table read through a visitor); a job
creation run again after its COMMIT was lost is answered as created."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import queue
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.engine_support import fleet, postgres_server  # noqa: F401
from tests.ha_support import Database, EngineProcess, RpcError, engines, wait_for
from vdsm_agent import errors
from vdsm_agent.engine.peers import MAX_PAYLOADS, PeerView, payloads
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store import leases as store_leases
from vdsm_agent.engine.store.models import JobRow, ResourceLockRow, StepRow

pytestmark = pytest.mark.slow

# A change on engine A reaches a console page open on engine B within: A's relay
# (0.1 s), B's re-read of the host's rows, B's page coalescing (0.1 s); generous
# for a loaded 2-CPU machine.
RELAY_BOUND = 3.0


@pytest.fixture
def ha_db(postgres_server) -> Iterator[tuple[str, Database]]:  # noqa: F811
    name = postgres_server.create_database()
    database = Database(postgres_server, name)
    try:
        yield postgres_server.url(name), database
    finally:
        database.close()
        postgres_server.drop_database(name)


OPEN_STREAMS: list[EventStream] = []


@pytest.fixture(autouse=True)
def _close_streams() -> Iterator[None]:
    """A stream left open by a failed test would warn of its socket in a later one."""
    yield
    while OPEN_STREAMS:
        OPEN_STREAMS.pop().close()


class EventStream:
    """``GET /console/events?...`` of one engine, read by a thread: (event, data)."""

    def __init__(self, engine: EngineProcess, query: str) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=60)
        self.conn.request("GET", "/console/events?" + query,
                          headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise RuntimeError(f"{self.response.status}: {self.response.read()[:300]!r}")
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        OPEN_STREAMS.append(self)

    def _read(self) -> None:
        name = ""
        try:
            for raw in self.response:
                line = raw.decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    self.events.put((name, orjson.loads(line[6:])))
        except (OSError, ValueError, AttributeError):
            pass  # closed (http.client drops its file under the reader: AttributeError)

    def wait_row(self, row_id: str, contains: str, timeout: float) -> float:
        """Seconds until a patch of row ``row_id`` whose HTML holds ``contains``."""
        began = time.monotonic()
        seen: list[tuple[str, Any]] = []
        while True:
            left = timeout - (time.monotonic() - began)
            assert left > 0, f"no patch of {row_id} with {contains!r} in {timeout} s: {seen}"
            try:
                name, data = self.events.get(timeout=left)
            except queue.Empty:
                continue
            seen.append((name, data))
            if name == "patch" and any(row["id"] == row_id and contains in row["html"]
                                       for row in data["rows"]):
                return time.monotonic() - began

    def close(self) -> None:
        """Ends the reader (EOF by shutdown), then closes the response and the socket."""
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(10)
        self.response.close()
        self.conn.close()


def console_page(engine: EngineProcess, path: str) -> str:
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Accept": "text/html"})
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def dom_id(*parts: str) -> str:
    from vdsm_agent.engine.console import render

    return render.dom_id(*parts)


def spread_over_two(db: Database, agents: Any, first: EngineProcess,
                    second: EngineProcess) -> tuple[str, Any]:
    """Both hosts added and up; the host ``first`` leases, and its agent."""
    for agent in agents:
        second.call("addHost", name=agent.name, url=agent.url)
    wait_for(lambda: sorted(db.owners().values()) == sorted(
        [str(first.proc.pid), str(second.proc.pid)]), timeout=15)
    wait_for(lambda: all(host["status"] == "up" for host in second.call("listHosts")["hosts"]),
             timeout=20)
    assert first.proc is not None
    (host,) = [name for name, pid in db.owners().items() if pid == str(first.proc.pid)]
    return host, next(agent for agent in agents if agent.name == host)


def task_on(engine: EngineProcess, host: str, task_id: str) -> dict[str, Any] | None:
    for task in engine.call("listTasks", filter={"host": host})["tasks"]:
        if task["id"] == task_id:
            return dict(task)
    return None


def test_console_and_partial_results_on_one_engine_follow_another_engines_host(
        tmp_path, ha_db):
    url, db = ha_db
    with fleet(tmp_path / "agents", 2) as agents, \
            engines(tmp_path, url, 2) as (first, second):
        host, agent = spread_over_two(db, agents, first, second)
        # B's console lists A's host too, as A wrote it (B reads the other engines'
        # hosts every lease_time / 3: a page opened before shows it at its next load).
        wait_for(lambda: f'id="{dom_id("host", host)}"' in console_page(second, "/console/"),
                 timeout=10)
        hosts = EventStream(second, "view=hosts")
        hosts.wait_row(dom_id("host", host), "up", timeout=10)
        job = first.call("startTask", host=host, kind="test.sleep", params={"seconds": 60})
        task_id = job["steps"][0]["taskID"]
        wait_for(lambda: (task_on(second, host, task_id) or {}).get("state") == "running",
                 timeout=15)
        page = EventStream(second, f"view=task&host={host}&task={task_id}")
        page.wait_row(dom_id("task", host, task_id), "running", timeout=10)
        # A task change made through engine A reaches B's page (relayed by NOTIFY).
        first.call("cancelTask", host=host, taskID=task_id)
        # (cancelTask answers when the job is written: the cancel, A's event, the relay)
        assert page.wait_row(dom_id("task", host, task_id), "canceled",
                             timeout=RELAY_BOUND + 5) < RELAY_BOUND + 5
        page.close()
        # A running task, then the host's agent killed: A marks the host non-responsive
        # and B's console and partial-result lists show it.
        job = first.call("startTask", host=host, kind="test.sleep", params={"seconds": 60})
        task_id = job["steps"][0]["taskID"]
        wait_for(lambda: (task_on(second, host, task_id) or {}).get("state") == "running",
                 timeout=15)
        assert host not in second.call("listTasks")["unreachableHosts"]
        share = tmp_path / "share"
        share.mkdir()
        managed = first.call("manageStorageConnection", hosts=[agent.name for agent in agents],
                             uri=f"file://{share}", connectionID="views-share")["jobID"]
        assert first.call("waitJob", jobID=managed, timeout=30)["state"] == "done"
        health = second.call("getConnectionHealth", connectionID="views-share")
        assert host in health["connections"][0]["connected"]
        agent.kill()
        wait_for(lambda: first.call("getHost", name=host)["status"] == "non-responsive",
                 timeout=20)
        # Measured (2 vCPU VM): ~0.18 s from A's status to B's page.
        assert hosts.wait_row(dom_id("host", host), "non-responsive",
                              timeout=RELAY_BOUND) < RELAY_BOUND
        hosts.close()
        listed = second.call("listTasks")
        assert host in listed["unreachableHosts"]
        (item,) = [task for task in listed["tasks"] if task["id"] == task_id]
        assert item["state"] == "unknown"
        assert item["lastKnownState"] == "running"
        unknown = second.call("listTasks", filter={"state": "unknown"})["tasks"]
        assert task_id in [task["id"] for task in unknown]
        single = second.call("getTask", host=host, taskID=task_id)
        assert single["unreachableHosts"] == [host]
        assert single["task"]["state"] == "unknown"
        health = second.call("getConnectionHealth", connectionID="views-share")
        assert host in health["connections"][0]["unknown"]
        assert host in health["unreachableHosts"]
        # A itself says the same (its own worker).
        assert host in first.call("listTasks")["unreachableHosts"]


def test_a_host_nobody_leases_is_neither_current_nor_reachable():
    """Another engine's host as that engine wrote it: up with a live lease is current;
    up without one (its engine died, nobody took it yet) is unreachable and not
    current; in maintenance, neither current nor unreachable."""
    def peer(status: str, live: bool, maintenance: bool = False) -> PeerView:
        return PeerView.of(store_leases.PeerHost("h1", "http://h1", status, maintenance, 0,
                                                 None, None, None, None, live))
    assert peer("up", True).current
    assert not peer("up", True).unreachable
    assert not peer("up", False).current
    assert peer("up", False).unreachable
    assert not peer("non-responsive", True).current
    assert peer("non-responsive", True).unreachable
    assert peer("connecting", True).unreachable
    held = peer("up", True, maintenance=True)
    assert not held.current
    assert not held.unreachable
    assert str(held.status) == "maintenance"


def test_conflicting_start_on_another_engines_host_is_refused_at_once(tmp_path, ha_db):
    url, db = ha_db
    with fleet(tmp_path / "agents", 2) as agents, \
            engines(tmp_path, url, 2) as (first, second):
        host, _agent = spread_over_two(db, agents, first, second)
        params = {"seconds": 60, "resources": [f"disk-{uuid.uuid4().hex[:8]}"]}
        held = second.call("startTask", host=host, kind="test.sleep", params=params)
        began = time.monotonic()
        with pytest.raises(RpcError) as refused:
            second.call("startTask", host=host, kind="test.sleep", params=params)
        assert time.monotonic() - began < 2.0
        assert refused.value.name == "ResourceBusy"
        assert refused.value.error["data"]["jobID"] == held["jobID"]
        # And through the host's own engine, the same lock.
        with pytest.raises(RpcError) as again:
            first.call("startTask", host=host, kind="test.sleep", params=params)
        assert again.value.name == "ResourceBusy"


# -- in process ----------------------------------------------------------------------------


async def test_a_job_created_again_after_a_lost_commit_is_answered_as_created(
        postgres_server):  # noqa: F811
    """The store runs a call once more when its connection was lost, even during
    the COMMIT (which may have committed): the job written by the first run is
    answered as created, not as a conflict, and nothing is written twice."""
    name = postgres_server.create_database()
    store = await EngineStore.open(postgres_server.url(name))
    try:
        await store.run(repository.add_host, "h1", "http://127.0.0.1:1/jsonrpc", None, None,
                        None, False, time.time())
        spec = repository.StepSpec("h1", "startTask", {"kind": "test.sleep", "taskID": "t1"},
                                   task_id="t1")
        args = ("job1", "startTask", {"host": "h1", "kind": "test.sleep"}, [spec], ["s1"],
                ["test:disk"], time.time())
        await store.run(repository.create_job, *args)
        await store.run(repository.create_job, *args)  # the retry: no conflict
        assert await store.run(lambda: JobRow.select().count()) == 1
        assert await store.run(lambda: StepRow.select().count()) == 1
        assert await store.run(lambda: ResourceLockRow.select().count()) == 1
        # Another task on the lock: still refused.
        other = repository.StepSpec("h1", "startTask", {"kind": "test.sleep", "taskID": "t2"},
                                    task_id="t2")
        with pytest.raises(errors.ResourceBusy):
            await store.run(repository.create_job, "job2", "startTask", {}, [other], ["s2"],
                            ["test:disk"], time.time())
        # The same ID with another request is a conflict, never answered as created.
        with pytest.raises(Exception) as conflict:
            await store.run(repository.create_job, "job1", "cancelTask", {}, [], [], [],
                            time.time())
        assert "unique" in str(conflict.value).lower() or "duplicate" in str(
            conflict.value).lower()
    finally:
        await store.close()
        postgres_server.drop_database(name)


async def test_a_lost_lease_is_one_log_line_and_its_loops_end_quietly(
        postgres_server, caplog):  # noqa: F811
    """Each of a worker's loops may hit the fence before the worker stops: one WARNING
    line for the lease, no traceback, no restart of the loop."""
    import contextvars
    import logging

    from vdsm_agent.common.supervision import keep_running
    from vdsm_agent.engine.store.db import FENCE

    name = postgres_server.create_database()
    store = await EngineStore.open(postgres_server.url(name))
    lost: list[store_leases.Fence] = []
    store.lease_lost = lost.append
    try:
        await store.run(repository.add_host, "h1", "http://127.0.0.1:1/jsonrpc", None, None,
                        None, False, time.time())
        await store.run(store_leases.register_engine, "a", "a", 1, "0", 3)
        await store.run(store_leases.register_engine, "b", "b", 1, "0", 3)
        assert (await store.run(store_leases.tick, "a", 0.5)).held == {"h1": (1, False)}
        await asyncio.sleep(0.6)
        assert (await store.run(store_leases.tick, "b", 0.5)).taken == ["h1"]
        fence = store_leases.Fence("h1", "a", 1)

        async def loop() -> None:  # a worker's loop: its store calls fenced
            await store.run(repository.get_host, "h1")

        context = contextvars.copy_context()
        context.run(FENCE.set, fence)
        caplog.set_level(logging.DEBUG)
        for _ in range(3):
            await asyncio.wait_for(asyncio.create_task(
                keep_running(loop, "host h1: steps", 30.0, logging.getLogger("test")),
                context=context), timeout=5)
        lines = [record for record in caplog.records
                 if "lease lost for host h1 (generation 1): worker stopped" in record.message]
        assert len(lines) == 1
        assert lines[0].levelno == logging.WARNING
        assert lost == [fence]
        assert not [record for record in caplog.records if record.exc_info]
        assert not [record for record in caplog.records if record.levelno >= logging.ERROR]
    finally:
        await store.close()
        postgres_server.drop_database(name)


def test_relayed_changes_fit_a_notify_and_coalesce():
    keys = [("task", f"host{index:04d}", uuid.uuid4().hex) for index in range(400)]
    sent = payloads("engine-id", keys)
    assert all(len(payload.encode()) <= store_leases.MAX_PAYLOAD for payload in sent)
    assert 1 < len(sent) <= MAX_PAYLOADS
    decoded = [tuple(key) for payload in sent
               for key in orjson.loads(payload.split(" ", 2)[2])]
    assert decoded == keys
    assert all(payload.startswith("changes engine-id [") for payload in sent)
