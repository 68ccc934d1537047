"""The engine's store on sqlite and on a real PostgreSQL server: migrations, the
DB thread, hosts, what is learned of tasks and connections, jobs, steps, locks."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import peewee
import pytest

from tests.engine_support import database_url, postgres_server  # noqa: F401
from vdsm_agent import errors
from vdsm_agent.common.clock import rfc3339
from vdsm_agent.engine import views
from vdsm_agent.engine.states import STEP_FINAL, STEP_TRANSITIONS, StepState
from vdsm_agent.engine.store import EngineStore, repository
from vdsm_agent.engine.store.migrations import latest_version
from vdsm_agent.engine.store.models import (
    EngineMeta,
    HostTaskRow,
    ResourceLockRow,
    SchemaVersion,
)

T0 = 1_700_000_000.0


def task_doc(task_id: str, state: str = "running", kind: str = "test.sleep",
             created: float = T0, resources: list[str] | None = None) -> dict[str, Any]:
    return {"id": task_id, "kind": kind, "state": state, "params": {},
            "progress": {"percent": 50.0}, "createdAt": rfc3339(created),
            "startedAt": rfc3339(created + 1), "endedAt": None,
            "resources": resources or []}


@pytest.fixture
async def store(database_url: str):  # noqa: F811
    opened = await EngineStore.open(database_url)
    try:
        yield opened
    finally:
        await opened.close()


async def add_host(store: EngineStore, name: str = "h1") -> None:
    await store.run(repository.add_host, name, "http://127.0.0.1:1/jsonrpc", None, None, None,
                    False, T0)


async def test_open_migrates_and_reopen_applies_nothing_twice(database_url: str):  # noqa: F811
    store = await EngineStore.open(database_url)
    try:
        versions = await store.run(lambda: [row.version for row in SchemaVersion.select()])
        assert versions == list(range(1, latest_version() + 1))
        instance = await store.run(repository.instance_id)
        await add_host(store)
    finally:
        await store.close()
    store = await EngineStore.open(database_url)
    try:
        assert await store.run(repository.instance_id) == instance
        assert await store.run(SchemaVersion.select().count) == latest_version()
        assert [row.name for row in await store.run(repository.list_hosts)] == ["h1"]
        kind = "sqlite" if database_url.startswith("sqlite") else "postgresql"
        assert store.kind == kind
    finally:
        await store.close()


async def test_all_access_runs_on_one_db_thread(store: EngineStore):
    names = {await store.run(lambda: threading.current_thread().name) for _ in range(5)}
    assert len(names) == 1
    assert names.pop().startswith("engine-db")


async def test_transaction_rolls_back_on_error(store: EngineStore):
    def failing() -> None:
        with store.atomic():
            EngineMeta.create(key="half", value="done")
            raise ValueError("abort")

    with pytest.raises(ValueError, match="abort"):
        await store.run(failing)
    assert await store.run(lambda: EngineMeta.get_or_none(EngineMeta.key == "half")) is None


async def test_hosts_add_get_maintenance_remove(store: EngineStore):
    await add_host(store)
    with pytest.raises(errors.HostExists):
        await add_host(store)
    with pytest.raises(errors.HostNotFound):
        await store.run(repository.get_host, "nope")
    row = await store.run(repository.set_maintenance, "h1", True)
    assert row.maintenance is True
    assert (await store.run(repository.get_host, "h1")).maintenance is True
    await store.run(repository.update_host, "h1", status="up", last_seen=T0 + 5)
    assert (await store.run(repository.get_host, "h1")).last_seen == T0 + 5
    await store.run(repository.remove_host, "h1", T0)
    assert await store.run(repository.list_hosts) == []


async def test_snapshot_records_external_tasks_and_keeps_newer_knowledge(store: EngineStore):
    await add_host(store)
    ext, gone, ours = (str(uuid.uuid4()) for _ in range(3))
    await store.run(repository.create_job, "job-1", "startTask", {}, [
        repository.StepSpec("h1", "startTask", {"taskID": ours}, task_id=ours)], ["step-1"],
        [], T0)
    outcome = await store.run(repository.apply_task_snapshot, "h1",
                              [task_doc(ext), task_doc(gone), task_doc(ours)], T0, T0 + 1)
    assert outcome.inserted == 3
    rows = {row.task_id: row for row in await store.run(lambda: list(HostTaskRow.select()))}
    assert rows[ext].external is True
    assert rows[ours].external is False
    assert rows[ours].job_id == "job-1"
    assert rows[ours].step_id == "step-1"
    # The host's task was there although the startTask answer never came: bound.
    job = await views.get_job(store, "job-1")
    assert job["steps"][0]["state"] == "running"
    assert job["state"] == "running"

    # An event after the listing started is newer: a later listing keeps it.
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": ext, "state": "done", "at": rfc3339(T0 + 3)}, None, T0 + 3)
    outcome = await store.run(repository.apply_task_snapshot, "h1",
                              [task_doc(ext, "running"), task_doc(ours, "done")], T0 + 2,
                              T0 + 4)
    rows = {row.task_id: row for row in await store.run(lambda: list(HostTaskRow.select()))}
    assert rows[ext].state == "done"  # not regressed
    assert rows[ext].ended_at == T0 + 3
    assert gone not in rows  # the host removed it
    assert rows[ours].state == "done"
    job = await views.get_job(store, "job-1")
    assert job["state"] == "done"
    assert job["steps"][0]["state"] == "done"
    assert job["endedAt"] is not None


async def test_events_insert_update_and_never_leave_a_final_state(store: EngineStore):
    await add_host(store)
    task_id = str(uuid.uuid4())
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": task_id, "kind": "test.sleep", "state": "accepted",
                     "at": rfc3339(T0)}, None, T0)
    assert await store.run(repository.knows_task, "h1", task_id)
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": task_id, "state": "running", "progress": {"percent": 10.0},
                     "at": rfc3339(T0 + 1)}, None, T0 + 1)
    row = await store.run(repository.get_task, "h1", task_id)
    assert (row.state, row.started_at, repository.loads(row.progress)) == (
        "running", T0 + 1, {"percent": 10.0})
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": task_id, "state": "canceled", "at": rfc3339(T0 + 2)}, None, T0 + 2)
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": task_id, "state": "running", "at": rfc3339(T0 + 1.5)}, None,
                    T0 + 3)
    row = await store.run(repository.get_task, "h1", task_id)
    assert (row.state, row.ended_at, row.external) == ("canceled", T0 + 2, True)


async def test_locks_conflict_and_are_released_when_the_task_ends(store: EngineStore):
    await add_host(store)
    await add_host(store, "h2")
    first, second = str(uuid.uuid4()), str(uuid.uuid4())

    async def start(job: str, host: str, task_id: str, resources: list[str]) -> None:
        await store.run(repository.create_job, job, "startTask", {}, [
            repository.StepSpec(host, "startTask", {"taskID": task_id}, task_id=task_id)],
            [f"step-{job}"], resources, T0)

    await start("j1", "h1", first, ["test:a", "test:b"])
    with pytest.raises(errors.ResourceBusy) as busy:
        await start("j2", "h1", second, ["test:b"])
    assert busy.value.data == {"resource": "test:b", "holder": first, "host": "h1",
                               "jobID": "j1", "holders": [
                                   {"taskID": first, "resource": "test:b", "shared": False,
                                    "jobID": "j1"}]}
    with pytest.raises(errors.JobNotFound):
        await views.get_job(store, "j2")  # nothing of it was written
    await start("j3", "h2", second, ["test:b"])  # another host: no conflict
    # The host reports the task's real resources: they replace the guess.
    await store.run(repository.step_accepted, "step-j1", StepState.RUNNING, T0)
    await store.run(repository.apply_task_doc, "h1",
                    task_doc(first, resources=["test:a", "device:/dev/loop9"]), T0,
                    replace_locks=True)
    held = sorted(row.resource for row in await store.run(repository.locks_of, "h1"))
    assert held == ["device:/dev/loop9", "test:a"]
    await store.run(repository.apply_task_event, "h1",
                    {"taskID": first, "state": "done", "at": rfc3339(T0 + 9)}, None, T0 + 9)
    assert await store.run(repository.locks_of, "h1") == []
    assert (await views.get_job(store, "j1"))["state"] == "done"
    # An unfinished task the engine did not start holds what its host reported.
    external = str(uuid.uuid4())
    await store.run(repository.apply_task_doc, "h1",
                    task_doc(external, resources=["test:x"]), T0)
    with pytest.raises(errors.ResourceBusy) as busy:
        await start("j4", "h1", str(uuid.uuid4()), ["test:x"])
    assert busy.value.data["holder"] == external


async def test_job_states_from_steps(store: EngineStore):
    for name in ("h1", "h2", "h3"):
        await add_host(store, name)
    specs = [repository.StepSpec(name, "manageStorageConnection", {"connectionID": "c"},
                                 connection_id="c") for name in ("h1", "h2", "h3")]
    await store.run(repository.create_job, "j", "manageStorageConnection", {}, specs,
                    ["s1", "s2", "s3"], [], T0)
    assert (await views.get_job(store, "j"))["state"] == "pending"
    await store.run(repository.step_attempt_failed, "s2", {"name": "HostUnreachable"}, T0)
    pending = await store.run(repository.pending_steps, "h2")
    assert [(step.id, step.attempts) for step in pending] == [("s2", 1)]
    await store.run(repository.step_accepted, "s1", StepState.DONE, T0, {"state": "connecting"})
    assert (await views.get_job(store, "j"))["state"] == "running"
    await store.run(repository.step_failed, "s3", {"name": "InvalidUri"}, T0)
    await store.run(repository.step_accepted, "s2", StepState.DONE, T0 + 1)
    job = await views.get_job(store, "j")
    assert job["state"] == "partial"
    assert [step["attempts"] for step in job["steps"]] == [1, 2, 1]
    assert job["steps"][2]["lastError"] == {"name": "InvalidUri"}
    # Retention removes finished jobs with their steps.
    assert await store.run(repository.delete_finished_jobs, T0 + 1) == 0
    assert await store.run(repository.delete_finished_jobs, T0 + 2) == 1
    with pytest.raises(errors.JobNotFound):
        await views.get_job(store, "j")


async def test_a_step_moves_only_by_its_transition_table(store: EngineStore):
    """Every change of a step's state goes through steps.move_step and the table in
    engine/states.py: a final step never moves again."""
    await add_host(store, "h1")
    spec = repository.StepSpec("h1", "cancelTask", {"taskID": "t"}, task_id="t")
    await store.run(repository.create_job, "j", "cancelTask", {}, [spec], ["s1"], [], T0)
    await store.run(repository.step_accepted, "s1", StepState.RUNNING, T0)
    await store.run(repository.step_accepted, "s1", StepState.RUNNING, T0 + 1)  # stays
    await store.run(repository.step_accepted, "s1", StepState.DONE, T0 + 2)
    step = await store.run(repository.get_step, "s1")
    assert (step.state, step.attempts, step.ended_at) == ("done", 3, T0 + 2)

    def move_back() -> None:
        repository.move_step(repository.get_step("s1"), StepState.RUNNING, T0 + 3)
    with pytest.raises(ValueError, match="done -> running is not allowed"):
        await store.run(move_back)
    assert set(STEP_TRANSITIONS) == set(StepState)
    assert all(not STEP_TRANSITIONS[StepState(final)] for final in STEP_FINAL)


async def test_task_pages_and_unknown_hosts(store: EngineStore):
    await add_host(store, "h1")
    await add_host(store, "h2")
    docs = {host: [task_doc(str(uuid.uuid4()), created=T0 + index) for index in range(5)]
            for host in ("h1", "h2")}
    for host, host_docs in docs.items():
        await store.run(repository.apply_task_snapshot, host, host_docs, T0, T0)
    query = repository.TaskQuery()
    seen: list[tuple[str, str]] = []
    after = None
    while True:
        page = await store.run(repository.list_tasks_page, query, [], after, 3)
        seen += [(row.host, row.task_id) for row in page]
        if len(page) < 3:
            break
        last = page[-1]
        after = (last.created_at, last.host, last.task_id)
    assert len(seen) == 10 == len(set(seen))
    running = repository.TaskQuery(states=("running",))
    assert len(await store.run(repository.list_tasks_page, running, ["h2"], None, 100)) == 5
    unknown = repository.TaskQuery(states=("unknown",))
    rows = await store.run(repository.list_tasks_page, unknown, ["h2"], None, 100)
    assert {row.host for row in rows} == {"h2"}
    assert len(rows) == 5
    by_host = repository.TaskQuery(hosts=("h1",), kind="test.sleep", external=True)
    assert len(await store.run(repository.list_tasks_page, by_host, [], None, 100)) == 5
    counts = await store.run(repository.host_counts, ["h1"])
    assert counts == {"h1": {"tasks": {"running": 5}, "connections": {}}}


async def seed_hosts(store: EngineStore, names: list[str]) -> dict[str, dict[str, Any]]:
    """Hosts with different tasks and connections each (host k: k running tasks, k % 3
    done, a connected connection on even k); the counts each should show."""
    expected: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(names):
        await add_host(store, name)
        docs = ([task_doc(f"{name}-r{n}") for n in range(k)]
                + [task_doc(f"{name}-d{n}", state="done") for n in range(k % 3)])
        await store.run(repository.apply_task_snapshot, name, docs, T0, T0)
        connections = {"c1": {"uri": "file:///a", "managed": True, "connected": True,
                              "state": "connected", "lastError": None}} if k % 2 == 0 else {}
        await store.run(repository.apply_connection_snapshot, name, connections, T0)
        tasks = {state: number for state, number in (("running", k), ("done", k % 3))
                 if number}
        expected[name] = {"tasks": tasks, "connections": {"connected": 1} if k % 2 == 0 else {}}
    return expected


async def test_host_pages_see_every_host_once_with_its_own_counts(store: EngineStore):
    names = ["h3", "a1", "h10", "b2", "z9", "h2", "m5"]
    expected = await seed_hosts(store, names)
    seen: list[str] = []
    after = None
    pages = 0
    while True:
        page = await store.run(repository.list_hosts_page, after, 3)
        pages += 1
        seen += [row.name for row in page.rows]
        # A page counts its own hosts, and only them.
        assert page.counts == {row.name: expected[row.name] for row in page.rows}
        if not page.more:
            break
        after = page.rows[-1].name
    assert seen == sorted(names)
    assert pages == 3
    last = await store.run(repository.list_hosts_page, "z9", 3)
    assert (last.rows, last.more, last.counts) == ([], False, {})
    row, counts = await store.run(repository.get_host_with_counts, "h10")
    assert row.name == "h10"
    assert counts == {"h10": expected["h10"]}


async def test_connections_snapshot_and_events(store: EngineStore):
    await add_host(store)
    await store.run(repository.apply_connection_snapshot, "h1", {
        "c1": {"uri": "file:///a", "managed": True, "connected": True, "state": "connected",
               "lastError": None},
        "unmanaged-1": {"uri": "file:///b", "managed": False, "connected": True,
                        "state": "connected", "lastError": None}}, T0)
    rows = await store.run(repository.list_connections, None)
    assert [(row.connection_id, row.state) for row in rows] == [("c1", "connected")]
    unknown = await store.run(repository.apply_connection_event, "h1", {
        "connectionIDs": ["c1", "c2"], "state": "disconnected",
        "error": {"code": "ENOENT", "message": "gone", "at": rfc3339(T0)}}, T0 + 1)
    assert unknown is True  # c2 is new to the engine: the caller resynchronises
    (row,) = await store.run(repository.list_connections, "c1")
    assert (row.state, row.connected) == ("disconnected", False)
    assert repository.loads(row.last_error)["code"] == "ENOENT"
    await store.run(repository.forget_connection, "h1", "c1")
    assert await store.run(repository.list_connections, None) == []


async def test_composite_keys_are_unique(store: EngineStore):
    await add_host(store)

    def insert_twice() -> None:
        with store.atomic():
            for _ in range(2):
                ResourceLockRow.insert(host="h1", resource="r", task_id="t", job_id="j",
                                       created_at=T0).execute()

    with pytest.raises(peewee.IntegrityError):
        await store.run(insert_twice)
