"""Jobs and steps: fan-out actions, retried without ever running twice.

A job is one engine call (startTask, manageStorageConnection,
unmanageStorageConnection, cancelTask) with one step per host. Each step is
bound to the host's own object: the task ID (generated here, uuid4, and
stored in the step *before* the host is called) or the connection ID. A
step is ``pending`` until its host accepts the call; a call without an answer
(refused, reset, timeout — even after the agent acted) leaves it pending, and
the retry sends the very same request: the agent's ``startTask`` is
idempotent for the same task ID and request, ``manageStorageConnection`` for
the same ID and URI, and a repeated unmanage/cancel that finds the work done
counts as done. So a lost reply never runs work twice.

While an engine-started task is unfinished the engine holds a lock on its
host's resources (first named from the params by the kind's declaration in
the host's own kind table, ``KindTables``; then the task's ``resources`` as
its host reports them), so that it never starts a conflicting task itself
(ResourceBusy, naming the holder). The lock is released when the host says
the task ended, or was canceled, or the step failed.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from vdsm_agent import errors
from vdsm_agent.engine import views
from vdsm_agent.engine.agentclient import AgentError, AgentUnreachable
from vdsm_agent.engine.ports import AgentHandle, HostHandle, JobContext
from vdsm_agent.engine.states import TASK_FINAL, StepState
from vdsm_agent.engine.store import repository
from vdsm_agent.engine.store.models import StepRow
from vdsm_agent.tasks import resource_names

log = logging.getLogger(__name__)

START_TASK = "startTask"
MANAGE = "manageStorageConnection"
UNMANAGE = "unmanageStorageConnection"
CANCEL = "cancelTask"


# The host's kind table is asked at most this long when a job is created (a host that
# does not answer by then gets no early lock: its own lock still decides).
KIND_TABLE_TIMEOUT = 5.0
GET_TASK_KINDS = "getTaskKinds"
KindTable = dict[str, Mapping[str, str] | None]  # kind -> resourceParams (None: not said)


def kind_table(answer: Any) -> KindTable:
    """Each kind's ``resourceParams`` from a getTaskKinds answer (None for a kind whose
    agent does not say: an older agent)."""
    table: KindTable = {}
    kinds = answer.get("kinds") if isinstance(answer, dict) else None
    for kind in kinds if isinstance(kinds, list) else ():
        if not isinstance(kind, dict) or not isinstance(kind.get("name"), str):
            continue
        declared = kind.get("resourceParams")
        table[kind["name"]] = (
            {str(param): value for param, value in declared.items() if isinstance(value, str)}
            if isinstance(declared, dict) else None)
    return table


class KindTables:
    """What each host's kinds lock, as its agent declares them (getTaskKinds'
    ``resourceParams``: ``tasks/resource_names``), read once per host URL and agent
    version, so that the engine never re-encodes the agent's resource naming."""

    def __init__(self) -> None:
        self._tables: dict[str, tuple[tuple[str, str | None], KindTable]] = {}

    async def early_locks(self, worker: AgentHandle | None, kind: str,
                          params: Mapping[str, Any]) -> list[str]:
        """The resources a new task of ``kind`` locks on the host from the job's creation;
        none when the host's table is not known (a host that does not answer now) or its
        agent does not declare the kind's (an older agent)."""
        if worker is None:
            return []
        table = await self._table(worker, kind)
        declaration = table.get(kind) if table is not None else None
        return resource_names.declared(declaration, params) if declaration else []

    async def _table(self, worker: AgentHandle, kind: str) -> KindTable | None:
        """The host's table; read again when its URL or agent version changed, or when it
        lacks ``kind`` (an agent restarted with other settings: enable_test_kinds)."""
        key = (worker.url, worker.agent_version)
        cached = self._tables.get(worker.name)
        if cached is not None and cached[0] == key and (kind in cached[1] or not cached[1]):
            return cached[1]
        if not worker.current:
            return None  # not asked: creating the job must not wait for a silent host
        try:
            table = kind_table(await worker.call(GET_TASK_KINDS, None, KIND_TABLE_TIMEOUT))
        except AgentUnreachable as exc:
            log.info("host %s: no kind table (%s): no early resource lock", worker.name, exc)
            return None  # asked again at the next job
        except AgentError as exc:  # it answered that it has none: kept, like a table
            log.info("host %s: no kind table (%s): no early resource locks", worker.name, exc)
            table = {}
        self._tables[worker.name] = (key, table)
        return table


def new_id() -> str:
    return str(uuid.uuid4())


class Jobs:
    """Creates jobs (one transaction each) and wakes the hosts that run their steps."""

    def __init__(self, engine: JobContext) -> None:
        self.engine = engine
        self.kinds = KindTables()

    async def _create(self, action: str, params: dict[str, Any],
                      steps: Sequence[repository.StepSpec],
                      resources: Sequence[str] = ()) -> dict[str, Any]:
        job_id = new_id()
        step_ids = [new_id() for _ in steps]
        store = self.engine.store
        await store.run(repository.create_job, job_id, action, params, steps, step_ids,
                        resources, self.engine.now())
        log.info("job %s: %s on %s", job_id, action, ", ".join(spec.host for spec in steps))
        for host in {spec.host for spec in steps}:
            worker = self.engine.host(host)
            if worker is not None:
                worker.kick()
        return await views.get_job(store, job_id)

    async def start_task(self, host: str, kind: str, params: dict[str, Any],
                         deadline: str | None) -> dict[str, Any]:
        task_id = new_id()
        request: dict[str, Any] = {"kind": kind, "params": params, "taskID": task_id}
        if deadline is not None:
            request["deadline"] = deadline
        spec = repository.StepSpec(host, START_TASK, request, task_id=task_id)
        job_params = {"host": host, "kind": kind, "params": params}
        if deadline is not None:
            job_params["deadline"] = deadline
        # Several engines: a host another engine polls is asked from here (a visitor).
        locks = await self.kinds.early_locks(await self.engine.reach(host), kind, params)
        return await self._create(START_TASK, job_params, [spec], locks)

    async def manage(self, hosts: Sequence[str], uri: str, connection_id: str,
                     options: dict[str, Any] | None) -> dict[str, Any]:
        request: dict[str, Any] = {"uri": uri, "connectionID": connection_id}
        if options is not None:
            request["options"] = options
        specs = [repository.StepSpec(host, MANAGE, request, connection_id=connection_id)
                 for host in _unique(hosts)]
        return await self._create(MANAGE, {"hosts": list(_unique(hosts)), **request}, specs)

    async def unmanage(self, hosts: Sequence[str], connection_id: str) -> dict[str, Any]:
        request = {"connectionID": connection_id}
        specs = [repository.StepSpec(host, UNMANAGE, request, connection_id=connection_id)
                 for host in _unique(hosts)]
        return await self._create(UNMANAGE, {"hosts": list(_unique(hosts)), **request}, specs)

    async def cancel_task(self, host: str, task_id: str) -> dict[str, Any]:
        engine = self.engine
        row = await engine.store.run(repository.get_task, host, task_id)
        if row is None:
            await engine.store.run(repository.get_host, host)
            worker = engine.host(host)
            if worker is not None and not worker.current:
                raise errors.HostUnreachable(
                    f"host {host} does not answer and the engine has no task {task_id} there",
                    host=host)
            raise errors.TaskNotFound(f"no task {task_id} on host {host}", host=host,
                                      taskID=task_id)
        if row.state in TASK_FINAL:
            raise errors.TaskNotActive(f"task {task_id} on host {host} is {row.state}",
                                       host=host, taskID=task_id, state=row.state)
        spec = repository.StepSpec(host, CANCEL, {"taskID": task_id}, task_id=task_id)
        return await self._create(CANCEL, {"host": host, "taskID": task_id}, [spec])


def _unique(hosts: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(hosts))


class StepRunner:
    """Runs one host's pending steps (called by the host's worker)."""

    def __init__(self, engine: JobContext) -> None:
        self.engine = engine

    async def run_pending(self, worker: HostHandle) -> bool:
        """Try every pending step of the host, in order; True if any is left pending."""
        if worker.maintenance:
            return False
        steps = await self.engine.store.run(repository.pending_steps, worker.name)
        for step in steps:
            if not await self.attempt(worker, step):
                return True  # the host does not answer: retry all later, in order
        return False

    async def attempt(self, worker: HostHandle, step: StepRow) -> bool:
        """One attempt; False when the host did not answer (the step stays pending)."""
        store = self.engine.store
        request = repository.loads(step.request)
        # Claimed first, in the worker's fenced transaction (several engines:
        # store/leases.py): a step done meanwhile, or a lease lost, sends nothing.
        if not await store.run(repository.claim_step, step.id):
            return True
        worker.changed()
        try:
            jobs = await self._send(worker, step, request)
        except AgentUnreachable as exc:
            self.engine.stats.step_retries += 1
            log.info("job %s step on %s: no answer (%s); will retry", step.job_id,
                     step.host, exc)
            await store.run(repository.step_attempt_failed, step.id,
                            errors.HostUnreachable(str(exc)).to_data(),
                            self.engine.now())
            return False
        except AgentError as exc:
            log.info("job %s step on %s: refused: %s", step.job_id, step.host, exc)
            jobs = await store.run(repository.step_failed, step.id, exc.to_record(),
                                   self.engine.now())
        self.engine.jobs_changed(jobs)
        return True

    async def _send(self, worker: HostHandle, step: StepRow,
                    request: dict[str, Any]) -> set[str]:
        store = self.engine.store
        now = self.engine.now
        host = worker.name
        if step.action == START_TASK:
            answer = await worker.call(START_TASK, request)
            jobs = await store.run(repository.step_accepted, step.id, StepState.RUNNING, now(),
                                   answer)
            try:
                doc = await worker.call("getTask", {"taskID": request["taskID"]})
            except (AgentError, AgentUnreachable) as exc:
                # The step is running; events or the next resync bring the task.
                log.info("job %s: getTask after startTask failed: %s", step.job_id, exc)
                return jobs
            jobs |= await store.run(repository.apply_task_doc, host, doc, now(),
                                    replace_locks=True)
            return jobs
        if step.action == MANAGE:
            doc = await worker.call(MANAGE, request)
            await store.run(repository.apply_connection_doc, host, request["connectionID"],
                            doc, now())
            return await store.run(repository.step_accepted, step.id, StepState.DONE, now(),
                                   {"state": doc.get("state"), "uri": doc.get("uri")})
        if step.action == UNMANAGE:
            try:
                result = await worker.call(UNMANAGE, request)
            except AgentError as exc:
                if exc.name != "ConnectionNotFound":
                    raise
                result = {"connectionID": request["connectionID"], "alreadyUnmanaged": True}
            await store.run(repository.forget_connection, host, request["connectionID"])
            return await store.run(repository.step_accepted, step.id, StepState.DONE, now(),
                                   result)
        if step.action == CANCEL:
            try:
                doc = await worker.call(CANCEL, request)
            except AgentError as exc:
                if exc.name != "TaskNotActive":
                    raise
                # Already finished (or canceled by an earlier attempt whose reply was lost).
                return await store.run(repository.step_accepted, step.id, StepState.DONE,
                                       now(), {"alreadyFinished": True})
            jobs = await store.run(repository.step_accepted, step.id, StepState.RUNNING, now(),
                                   {"taskState": doc.get("state")})
            jobs |= await store.run(repository.apply_task_doc, host, doc, now())
            return jobs
        raise RuntimeError(f"unknown step action {step.action!r}")
