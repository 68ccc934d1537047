"""``vdsm-engine call``: call one verb of the engine's API from a shell.

The agent's client (``vdsm_agent.client.command``) given the engine's
``Program``: ``rpc_schema/engine.json``, ``--url`` else ``$VDSM_ENGINE_URL``
else http://127.0.0.1:54322/jsonrpc, "engine" in its messages, the engine
verbs' default table columns, and ``--watch`` for jobs (waitJob, getJob,
startTask, cancelTask) and one host's task (getTask). Everything else —
``name=value`` words, help, tables, completion, exit codes (docs/cli.md) —
is the agent client's.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from vdsm_agent import __version__
from vdsm_agent.client import command
from vdsm_agent.client.calling import Caller
from vdsm_agent.client.program import Program
from vdsm_agent.client.transport import Defaults
from vdsm_agent.client.units import BYTE_KINDS
from vdsm_agent.client.watch import FINAL_TASK_STATES, OutputTail, Snapshot, task_summary
from vdsm_agent.engine.settings import DEFAULT_PORT

PROG = "vdsm-engine call"
URL_ENV = "VDSM_ENGINE_URL"
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}/jsonrpc"
FINAL_JOB_STATES = frozenset({"done", "failed", "partial"})

EXIT_OK = command.EXIT_OK
EXIT_APPLICATION_ERROR = command.EXIT_APPLICATION_ERROR
EXIT_USAGE = command.EXIT_USAGE
EXIT_PROTOCOL_ERROR = command.EXIT_PROTOCOL_ERROR
EXIT_UNREACHABLE = command.EXIT_UNREACHABLE


class EngineTask:
    """One host's task through the engine: getTask with refresh (the agent's
    latest figures), and its output when the engine proxies getTaskOutput."""

    def __init__(self, caller: Caller, host: str, task_id: str) -> None:
        self.caller = caller
        self.host = host
        self.task_id = task_id
        self.output = (OutputTail(caller, "getTaskOutput", {"host": host, "taskID": task_id})
                       if caller.has("getTaskOutput", "host", "taskID", "offset") else None)
        self.first = True

    def fetch(self) -> dict[str, Any]:
        answer = self.caller.call("getTask", {"host": self.host, "taskID": self.task_id,
                                              "refresh": True})
        return dict(answer["task"])

    def snapshot(self, task: Mapping[str, Any]) -> Snapshot:
        detail = task.get("detail") if isinstance(task.get("detail"), dict) else {}
        assert isinstance(detail, dict)
        state = str(task.get("state"))
        line = ""
        if self.output is not None:
            line = self.output.update(detail.get("outputSize"),
                                      detail.get("outputTruncatedBefore"))
        kind = str(task.get("kind", ""))
        if state == "unknown":
            state = f"unknown (host {task.get('hostStatus')})"
        final = state in FINAL_TASK_STATES
        return Snapshot(
            title=f"{self.host} {kind} {self.task_id[:8]}", state=state,
            progress=task.get("progress"), in_bytes=kind in BYTE_KINDS, line=line,
            final=final, ok=state == "done",
            summary=f"task {self.task_id} on {self.host} {task_summary({**detail, **task})}",
            result={"task": task}, result_verb="getTask",
            again=f"{PROG} getTask host={self.host} taskID={self.task_id}")

    def poll(self, wait: float) -> Snapshot:
        """getTask answers at once: wait between polls (not before the first)."""
        if not self.first:
            time.sleep(wait)
        self.first = False
        return self.snapshot(self.fetch())


class EngineJob:
    """A job until it is final (waitJob long-polls); a startTask job shows its
    task's progress once the host has it. ``start``: (verb, params) to call first."""

    def __init__(self, caller: Caller, job_id: str | None,
                 start: tuple[str, Mapping[str, Any]] | None = None) -> None:
        self.caller = caller
        if start is not None:
            job_id = str(caller.call(start[0], start[1])["jobID"])
        assert job_id is not None
        self.job_id = job_id
        self.task: EngineTask | None = None

    def poll(self, wait: float) -> Snapshot:
        job = self.caller.call("waitJob", {"jobID": self.job_id, "timeout": wait})
        state = str(job.get("state"))
        steps = [step for step in job.get("steps", []) if isinstance(step, dict)]
        final = state in FINAL_JOB_STATES
        snapshot = Snapshot(
            title=f"{job.get('action')} {self.job_id[:8]}", state=state, final=final,
            ok=state == "done", summary=f"job {self.job_id} {self._summary(state, steps)}",
            result=job, result_verb="getJob",
            again=f"{PROG} getJob jobID={self.job_id}")
        step = steps[0] if len(steps) == 1 else None
        if job.get("action") == "startTask" and step and step.get("taskID") \
                and step.get("state") != "pending":
            if self.task is None:
                self.task = EngineTask(self.caller, str(step["host"]), str(step["taskID"]))
            task = self.task.snapshot(self.task.fetch())
            snapshot.title, snapshot.progress = task.title, task.progress
            snapshot.in_bytes, snapshot.line = task.in_bytes, task.line
            if not final:
                snapshot.state = task.state
        return snapshot

    @staticmethod
    def _summary(state: str, steps: list[dict[str, Any]]) -> str:
        failed = [step for step in steps if step.get("state") in ("failed", "canceled")]
        words = state
        if failed:
            first = failed[0]
            error = first.get("lastError")
            words += f": {first.get('host')} {first.get('state')}"
            if isinstance(error, dict):
                words += f" ({error.get('name') or error.get('message') or ''})"
        return words


def engine_watchers() -> dict[str, Any]:
    return {
        "waitJob": lambda caller, params: EngineJob(caller, params["jobID"]),
        "getJob": lambda caller, params: EngineJob(caller, params["jobID"]),
        "startTask": lambda caller, params: EngineJob(caller, None, ("startTask", params)),
        "cancelTask": lambda caller, params: EngineJob(caller, None, ("cancelTask", params)),
        "getTask": lambda caller, params: EngineTask(caller, params["host"], params["taskID"]),
    }


ENGINE = Program(
    prog=PROG,
    schema_name="engine",
    server="engine",
    summary="Call a verb of the engine's JSON-RPC API and print its result as JSON (or a "
            "table); follow a job or a task with --watch.",
    version=f"vdsm-engine {__version__}",
    defaults=Defaults(url=DEFAULT_URL, port=DEFAULT_PORT, url_env=URL_ENV, socket_env=None,
                      installed_socket=None),
    columns={
        "listHosts": ("name", "status", "maintenance", "lastSeen", "agentVersion"),
        "listTasks": ("host", "id", "state", "progress.percent", "kind"),
        "listJobs": ("jobID", "state", "action", "createdAt"),
    },
    watchers=engine_watchers(),
    examples=(
        "listHosts --table",
        "listTasks state=running --table",
        "startTask host=host1 kind=checksum params.path=/var/lib/vdsm-agent/images/a.img "
        "--watch",
        "help waitJob",
    ),
)


def main(argv: Sequence[str]) -> int:
    """``vdsm-engine call ARGS``: the exit code."""
    return command.main(ENGINE, argv)
