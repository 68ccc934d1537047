"""The hollow agents (benchmarks/hollow): a real hollow process serving a few hosts.

* every verb it serves (getTaskKinds with each kind's resourceParams too), called
  over HTTP, answers what rpc_schema/agent.json says (results validated as
  tests/support.py ``check_result`` does; error answers are errors the schema
  declares for the verb, with their codes);
* the verbs the engine calls (read from vdsm_agent/engine's source) are all
  served, so the hollow agent cannot drift behind the engine;
* an in-process engine follows 20 hollow hosts: all up, a generated task
  transition in its views within 2 s, a frozen host non-responsive while the
  others stay up, a restart (new epoch, state reset) resynchronised, a killed
  host refused and back; the engine's jobs (start, cancel, manage, unmanage)
  run against hollow hosts, and no verb it sent was unknown to them;
* a path per host (one port): the engine's client and poller use the URLs.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import dataclasses
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.hollow import control
from benchmarks.hollow.verbs import VERBS
from tests.engine_support import EngineClient, async_until
from tests.support import SCHEMA, RpcFailure, check_result, until
from vdsm_agent.engine.agentclient import AgentClient, AgentUnreachable

ROOT = Path(__file__).resolve().parent.parent
ENGINE_SOURCES = ROOT / "vdsm_agent" / "engine"


@dataclasses.dataclass
class Hollow:
    """A hollow process, stopped by PID at teardown."""

    proc: subprocess.Popen[bytes]
    control_url: str
    hosts: list[dict[str, Any]]

    def ctl(self, command: str, **params: Any) -> Any:
        return control.call(self.control_url, command, timeout=30, **params)

    def url(self, index: int) -> str:
        return str(self.hosts[index]["url"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def hollow(tmp_path: Path, hosts: int, *flags: str) -> Iterator[Hollow]:
    hosts_file = tmp_path / "hosts.json"
    out = tmp_path / "hollow.out"
    with open(out, "wb") as stdout:
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.hollow", "--hosts", str(hosts),
             "--hosts-file", str(hosts_file), *flags],
            cwd=ROOT, stdout=stdout, stderr=subprocess.STDOUT)
    process = Hollow(proc, "", [])
    try:
        def ready() -> dict[str, Any] | None:
            assert proc.poll() is None, out.read_text()
            for line in out.read_text().splitlines():
                if line.startswith('{"ready"'):
                    return dict(json.loads(line))
            return None
        line = until(ready, timeout=30, what="the hollow process's ready line")
        document = control.read_hosts_file(hosts_file)
        assert line["control"] == document["control"]
        process.control_url = document["control"]
        process.hosts = document["hosts"]
        yield process
    finally:
        process.stop()


class Caller:
    """JSON-RPC over HTTP to one hollow host (a new connection per call, like curl)."""

    def __init__(self, url: str) -> None:
        self.parts = urllib.parse.urlsplit(url)
        self.errors: list[tuple[str, dict[str, Any]]] = []

    def raw(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        connection = http.client.HTTPConnection(self.parts.hostname or "", self.parts.port or 0,
                                                timeout=30)
        try:
            body = json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
            connection.request("POST", self.parts.path, body,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200
            answer = dict(json.loads(response.read()))
        finally:
            connection.close()
        assert answer["jsonrpc"] == "2.0"
        assert answer["id"] == 7
        return answer

    def call(self, method: str, **params: Any) -> Any:
        answer = self.raw(method, params)
        if "error" in answer:
            raise RpcFailure(answer["error"])
        check_result(method, answer["result"])
        return answer["result"]

    def error(self, method: str, **params: Any) -> RpcFailure:
        answer = self.raw(method, params)
        assert "error" in answer, f"{method} {params} did not fail: {answer}"
        error = answer["error"]
        check_error(method, error)
        self.errors.append((method, error))
        return RpcFailure(error)


def check_error(method: str, error: dict[str, Any]) -> None:
    """An error the schema declares for the verb (or for every verb), with its code."""
    name = error["data"]["name"]
    declared = {*SCHEMA.verbs[method].errors, *SCHEMA.common_errors}
    assert name in declared, f"{method} answered {name}, not among {sorted(declared)}"
    assert error["code"] == SCHEMA.errors[name]["code"]


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hollow]:
    with hollow(tmp_path_factory.mktemp("hollow"), 3, "--tasks", "5", "--connections", "2",
                "--probe-interval", "1", "--events-progress-interval", "0") as process:
        yield process


def test_every_served_verb_answers_as_the_schema_says(three: Hollow) -> None:
    host = Caller(three.url(1))
    served = set(VERBS)
    assert served <= set(SCHEMA.verbs), "the hollow agent serves a verb the agent lacks"

    ping = host.call("ping")
    assert ping["version"].endswith("+hollow")
    assert host.call("getCapabilities")["hostname"] == three.hosts[1]["name"]
    assert set(host.call("rpc.discover")["methods"][0]) >= {"name", "params", "result"}
    # getTaskKinds: every kind the host offers, with what a hollow task of it locks
    # (test.sleep's resources, as the real kind declares them; the hollow kinds nothing).
    kinds = {kind["name"]: kind for kind in host.call("getTaskKinds")["kinds"]}
    assert sorted(kinds) == sorted(host.call("getCapabilities")["taskKinds"])
    assert kinds["test.sleep"]["resourceParams"] == {"resources": "test"}
    assert kinds["copy"]["resourceParams"] == {}

    # listTasks: every page of 2, in (createdAt, id) order, then filters.
    seen: list[dict[str, Any]] = []
    token = None
    while True:
        page = host.call("listTasks", pageSize=2, **({"pageToken": token} if token else {}))
        seen += page["tasks"]
        token = page["nextPageToken"]
        if token is None:
            break
    assert len(seen) == 5
    assert [(t["createdAt"], t["id"]) for t in seen] == sorted((t["createdAt"], t["id"])
                                                               for t in seen)
    assert host.call("listTasks", pageSize=1000)["tasks"] == seen
    assert len(host.call("listTasks", filter={"state": ["done"]})["tasks"]) == 5
    assert host.call("listTasks", filter={"state": "running"})["tasks"] == []
    assert host.call("listTasks", filter={"kind": "copy"})["tasks"] == []
    after = host.call("listTasks", filter={"createdAfter": seen[2]["createdAt"]})["tasks"]
    assert [task["id"] for task in after] == [task["id"] for task in seen[3:]]
    assert host.error("listTasks", pageToken="not-a-token").name == "InvalidParams"
    assert host.call("getTask", taskID=seen[0]["id"]) == seen[0]
    # A hollow task writes no output: an empty read, at its end once final.
    assert host.call("getTaskOutput", taskID=seen[0]["id"]) == {
        "data": "", "encoding": "utf-8", "offset": 0, "nextOffset": 0, "eof": True,
        "truncatedBefore": 0, "size": 0}
    assert host.error("getTaskOutput", taskID=str(uuid.uuid4())).name == "TaskNotFound"

    # startTask: accepted, idempotent for the same ID and request, a conflict otherwise.
    task_id = str(uuid.uuid4())
    started = host.call("startTask", kind="test.sleep", params={"seconds": 0.3},
                        taskID=task_id)
    assert started == {"taskID": task_id, "state": "accepted"}
    assert host.call("startTask", kind="test.sleep", params={"seconds": 0.3},
                     taskID=task_id)["taskID"] == task_id
    assert host.error("startTask", kind="test.sleep", params={"seconds": 9},
                      taskID=task_id).name == "TaskIdConflict"
    assert host.error("startTask", kind="nope", params={}).name == "UnknownTaskKind"
    done = host.call("waitTask", taskID=task_id, timeout=10)
    assert done["state"] == "done"
    assert done["result"] == {"slept": 0.3}
    assert done["progress"]["percent"] == 100.0

    # A task holding a resource, canceled; deleteTask of a final task only.
    holder = host.call("startTask", kind="test.sleep",
                       params={"seconds": 30, "resources": ["disk"]})["taskID"]
    busy = host.error("startTask", kind="test.sleep", params={"resources": ["disk"]})
    assert busy.name == "ResourceBusy"
    assert busy.data["holder"] == holder
    assert host.error("deleteTask", taskID=holder).name == "TaskActive"
    stopping = host.call("cancelTask", taskID=holder)
    assert stopping["id"] == holder
    canceled = host.call("waitTask", taskID=holder, timeout=10)
    assert canceled["state"] == "canceled"
    assert canceled["error"]["name"] == "Canceled"
    assert host.error("cancelTask", taskID=holder).name == "TaskNotActive"
    assert host.call("deleteTask", taskID=task_id) == {"taskID": task_id, "deleted": True}
    assert host.error("getTask", taskID=task_id).name == "TaskNotFound"
    assert host.error("waitTask", taskID=task_id).name == "TaskNotFound"
    failed = host.call("startTask", kind="test.sleep", params={"seconds": 0, "fail": "boom"})
    assert host.call("waitTask", taskID=failed["taskID"])["error"] == {
        "name": "TestFailure", "detail": "boom"}

    # Connections: two seeded, one managed now (connecting, then connected).
    connections = host.call("getStorageConnectionList")
    assert sorted(connections) == ["sd-1", "sd-2"]
    assert host.call("getStorageConnection", connectionID="sd-1") == connections["sd-1"]
    managed = host.call("manageStorageConnection", uri="nfs://filer/export/x",
                        connectionID="x")
    assert managed["state"] == "connecting"
    until(lambda: host.call("getStorageConnection", connectionID="x")["state"] == "connected",
          timeout=5)
    assert host.call("manageStorageConnection", uri="nfs://filer/export/x",
                     connectionID="x")["state"] == "connected"
    assert host.call("manageStorageConnection", uri="nfs://filer/export/x",
                     connectionID="y")["connectionInfo"]["sharedWith"] == ["x"]
    assert host.error("manageStorageConnection", uri="nfs://filer/export/z",
                      connectionID="x").name == "ConnectionIdInUse"
    assert host.error("manageStorageConnection", uri="no-uri",
                      connectionID="w").name == "InvalidUri"
    assert host.error("manageStorageConnection", uri="ceph://a/b",
                      connectionID="w").name == "UnsupportedScheme"
    assert host.call("unmanageStorageConnection", connectionID="y") == {
        "connectionID": "y", "disconnected": False, "sharedWith": ["x"], "lastError": None}
    assert host.call("unmanageStorageConnection", connectionID="x")["disconnected"] is True
    assert host.error("unmanageStorageConnection", connectionID="x").name == \
        "ConnectionNotFound"
    assert host.error("getStorageConnection", connectionID="x").name == "ConnectionNotFound"

    # Generated events of every kind, and the feed that carries them.
    name = three.hosts[1]["name"]
    for kind in ("task", "task", "task", "progress", "connection", "connection", "task"):
        event = three.ctl("tick", hosts=[1], kind=kind)[name]
        assert event is not None
        assert event["type"] == ("connection" if kind == "connection" else "task")
    page = host.call("getEvents", since=0, maxEvents=1000)
    assert page["gap"] is False
    assert [event["seq"] for event in page["events"]] == list(range(1, page["lastSeq"] + 1))
    changes = {(event["type"], event.get("change")) for event in page["events"]}
    assert changes == {("task", "state"), ("task", "progress"), ("connection", None)}
    degraded = [event for event in page["events"] if event.get("state") == "degraded"]
    assert degraded
    assert degraded[0]["error"]["code"] == "ETIMEDOUT"
    # The long-poll: waits for the next event, answers an old epoch with a gap.
    began = time.monotonic()
    empty = host.call("getEvents", since=page["lastSeq"], timeout=0.3, epoch=page["epoch"])
    assert empty["events"] == []
    assert time.monotonic() - began >= 0.25
    assert host.call("getEvents", since=3, epoch="0" * 32)["gap"] is True
    assert host.error("getEvents", timeout=61).name == "InvalidParams"

    # Everything served was called here.
    assert set(three.ctl("status")["requests"]) == served
    assert three.ctl("status")["unknownVerbs"] == {}


def test_a_verb_it_does_not_serve_and_bad_requests(three: Hollow) -> None:
    host = Caller(three.url(0))
    answer = host.raw("getDeviceList", {})
    assert answer["error"]["code"] == -32601
    assert host.raw("getTask", {})["error"]["data"]["field"] == "params.taskID"
    assert host.raw("listTasks", {"pageSize": "x"})["error"]["data"]["name"] == "InvalidParams"
    assert three.ctl("status")["unknownVerbs"]["getDeviceList"] >= 1
    with pytest.raises(control.ControlError, match="no hollow host"):
        three.ctl("freeze", hosts=["nobody"])


def test_change_tokens_as_a_real_agent_answers_them(three: Hollow) -> None:
    """listTasks and getStorageConnectionList with changedSince (results checked against
    the schema by ``Caller.call``): not modified while nothing changed, the list
    after a change of it, and after a restart (another epoch) whatever the token."""
    host = Caller(three.url(2))
    name = three.hosts[2]["name"]
    tasks = host.call("listTasks", pageSize=1000)
    connections = host.call("getStorageConnectionList", changedSince="")
    assert tasks["notModified"] is False
    assert connections["notModified"] is False
    assert sorted(connections["connections"]) == ["sd-1", "sd-2"]
    tasks_token, connections_token = tasks["changeToken"], connections["changeToken"]
    assert host.call("listTasks", changedSince=tasks_token) == {
        "tasks": [], "nextPageToken": None, "changeToken": tasks_token, "notModified": True}
    assert host.call("getStorageConnectionList", changedSince=connections_token) == {
        "connections": None, "changeToken": connections_token, "notModified": True}
    # A connection flip changes the connection list only.
    three.ctl("tick", hosts=[2], kind="connection")
    assert host.call("listTasks", changedSince=tasks_token)["notModified"] is True
    flipped = host.call("getStorageConnectionList", changedSince=connections_token)
    assert flipped["notModified"] is False
    assert sorted(flipped["connections"]) == ["sd-1", "sd-2"]
    # A task transition changes the task list.
    event = three.ctl("tick", hosts=[2], kind="task")[name]
    moved = host.call("listTasks", changedSince=tasks_token, pageSize=1000)
    assert moved["notModified"] is False
    assert event["taskID"] in {task["id"] for task in moved["tasks"]}
    # A restart keeps the lists but not the tokens.
    tokens = moved["changeToken"], flipped["changeToken"]
    three.ctl("restart", hosts=[2])
    assert host.call("listTasks", changedSince=tokens[0])["notModified"] is False
    assert host.call("getStorageConnectionList", changedSince=tokens[1])["notModified"] is False
    assert host.error("listTasks", changedSince="").name == "InvalidParams"


def _module_strings(tree: ast.Module) -> dict[str, str]:
    """Module-level NAME = "string" constants."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


AGENT_MODULES = ("vdsm_agent.engine.agentclient", "vdsm_agent.engine.poller")


def _talks_to_agents(path: Path, tree: ast.Module) -> bool:
    """The agent client and the poller, and every engine module using them (the
    engine's own command line calls the engine, not agents)."""
    if f"vdsm_agent.engine.{path.stem}" in AGENT_MODULES:
        return True
    return any(isinstance(node, ast.ImportFrom) and node.module in AGENT_MODULES
               for node in ast.walk(tree))


def engine_agent_verbs() -> set[str]:
    """Every verb vdsm_agent/engine calls on an agent (``X.call(VERB, ...)``, VERB a
    string or a module constant, in a module that talks to agents; ``X._conditional_call``
    and any other method whose name ends in ``call`` counts too). A call whose verb
    cannot be read is allowed only inside such a wrapper (a function whose name ends
    in ``call``); anything else fails the test."""
    verbs: set[str] = set()
    for path in sorted(ENGINE_SOURCES.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if not _talks_to_agents(path, tree):
            continue
        constants = _module_strings(tree)
        wrappers = {id(node) for function in ast.walk(tree)
                    if isinstance(function, ast.AsyncFunctionDef | ast.FunctionDef)
                    and function.name.endswith("call") for node in ast.walk(function)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.endswith("call")):
                continue
            argument = node.args[0] if node.args else next(
                (keyword.value for keyword in node.keywords if keyword.arg == "method"), None)
            if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                verbs.add(argument.value)
            elif isinstance(argument, ast.Name) and argument.id in constants:
                verbs.add(constants[argument.id])
            else:
                assert id(node) in wrappers, (
                    f"{path.name}:{node.lineno}: cannot tell which agent verb this call "
                    "sends; name it with a string or a module constant")
    return verbs


def test_the_engine_calls_no_verb_the_hollow_agent_lacks() -> None:
    called = engine_agent_verbs()
    # The scan itself works: the verbs of the events loop, the resync and the jobs.
    assert {"getEvents", "listTasks", "getStorageConnectionList", "getTask", "ping",
            "startTask", "cancelTask", "manageStorageConnection",
            "unmanageStorageConnection"} <= called
    missing = called - set(VERBS)
    assert not missing, f"the engine calls {sorted(missing)}: serve them in benchmarks/hollow"


# -- an engine following hollow hosts ---------------------------------------------------------

HOSTS = 20


async def _ctl(process: Hollow, command: str, **params: Any) -> Any:
    return await asyncio.to_thread(process.ctl, command, **params)


async def _statuses(engine: EngineClient) -> dict[str, str]:
    return {host["name"]: host["status"] for host in (await engine.call("listHosts"))["hosts"]}


async def _seen_within(engine: EngineClient, host: str, task_id: str, state: str,
                       seconds: float) -> float:
    began = time.monotonic()

    async def shown() -> bool:
        task = await engine.task(host, task_id)
        return task is not None and task["state"] == state
    await async_until(shown, timeout=seconds, interval=0.02)
    return time.monotonic() - began


@pytest.mark.slow
async def test_an_engine_follows_twenty_hollow_hosts(make_engine: Any, tmp_path: Path) -> None:
    with hollow(tmp_path, HOSTS, "--tasks", "3") as process:
        # Long resync and poll intervals: only the events feed (or a gap) can be quick.
        engine = await make_engine(resync_interval=60, poll_interval=60)
        names = [host["name"] for host in process.hosts]
        for host in process.hosts:
            await engine.call("addHost", name=host["name"], url=host["url"])

        async def all_up() -> bool:
            hosts = (await engine.call("listHosts"))["hosts"]
            return all(h["status"] == "up" and h["eventsFeed"] for h in hosts)
        await async_until(all_up, timeout=15)
        listing = await engine.call("listTasks", pageSize=1000)
        assert len(listing["tasks"]) == HOSTS * 3

        # A generated transition reaches the engine's view within 2 s, and its end.
        event = (await _ctl(process, "tick", hosts=[5], kind="task"))[names[5]]
        task_id = event["taskID"]
        assert await _seen_within(engine, names[5], task_id, "accepted", 2.0) < 2.0
        for _ in range(3):  # initializing, running, done
            last = (await _ctl(process, "tick", hosts=[5], kind="task"))[names[5]]
        assert last["state"] == "done"
        assert await _seen_within(engine, names[5], task_id, "done", 2.0) < 2.0
        assert (await engine.task(names[5], task_id))["external"] is True

        # A frozen host becomes non-responsive; the others stay up and current.
        await _ctl(process, "freeze", hosts=[7])
        await engine.wait_status(names[7], "non-responsive", timeout=10)
        other = (await _ctl(process, "tick", hosts=[8], kind="task"))[names[8]]
        assert await _seen_within(engine, names[8], other["taskID"], "accepted", 2.0) < 2.0
        statuses = await _statuses(engine)
        assert [name for name, status in statuses.items() if status != "up"] == [names[7]]
        await _ctl(process, "thaw", hosts=[7])
        await engine.wait_status(names[7], "up", timeout=10)

        # A restart with its state gone: a new epoch, a gap, a resync (not the 60 s one).
        before = (await _ctl(process, "hosts", hosts=[3]))[0]["epoch"]
        await _ctl(process, "restart", hosts=[3], reset=True)
        assert (await _ctl(process, "hosts", hosts=[3]))[0]["epoch"] != before

        async def forgotten() -> bool:
            listing = await engine.call("listTasks", filter={"host": names[3]})
            return listing["tasks"] == []
        await async_until(forgotten, timeout=10)

        # A killed host refuses connections: non-responsive; started again: up.
        await _ctl(process, "kill", hosts=[9])
        parts = urllib.parse.urlsplit(process.url(9))
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(parts.hostname, parts.port)
        await engine.wait_status(names[9], "non-responsive", timeout=10)
        await _ctl(process, "start", hosts=[9])
        await engine.wait_status(names[9], "up", timeout=10)

        # The engine's jobs against hollow hosts.
        job = await engine.call("startTask", host=names[1], kind="test.sleep",
                                params={"seconds": 0.2})
        assert (await engine.wait_job(job["jobID"], timeout=10))["state"] == "done"
        job = await engine.call("startTask", host=names[2], kind="test.sleep",
                                params={"seconds": 60})
        long_task = (await engine.call("getJob", jobID=job["jobID"]))["steps"][0]["taskID"]
        assert await _seen_within(engine, names[2], long_task, "running", 5.0) < 5.0
        cancel = await engine.call("cancelTask", host=names[2], taskID=long_task)
        assert (await engine.wait_job(cancel["jobID"], timeout=10))["state"] == "done"
        assert await _seen_within(engine, names[2], long_task, "canceled", 5.0) < 5.0
        job = await engine.call("manageStorageConnection", hosts=names[:2],
                                uri="nfs://filer/export/shared", connectionID="shared")
        assert (await engine.wait_job(job["jobID"], timeout=10))["state"] == "done"

        async def connected() -> bool:
            health = await engine.call("getConnectionHealth", connectionID="shared")
            return health["connections"][0]["connected"] == sorted(names[:2])
        await async_until(connected, timeout=10)
        job = await engine.call("unmanageStorageConnection", hosts=names[:2],
                                connectionID="shared")
        assert (await engine.wait_job(job["jobID"], timeout=10))["state"] == "done"

        status = await _ctl(process, "status")
        assert status["unknownVerbs"] == {}
        assert {"getEvents", "listTasks", "getStorageConnectionList", "getTask", "ping",
                "startTask", "cancelTask", "manageStorageConnection",
                "unmanageStorageConnection"} <= set(status["requests"])


async def test_a_path_per_host_with_the_engines_client(make_engine: Any, tmp_path: Path) -> None:
    """One port, a path per host: the engine keeps the path of an agent URL and its
    client calls it; a killed host's calls fail, the others' do not."""
    with hollow(tmp_path, 3, "--path-per-host", "--tasks", "2") as process:
        urls = [process.url(index) for index in range(3)]
        assert len({urllib.parse.urlsplit(url).port for url in urls}) == 1
        assert [urllib.parse.urlsplit(url).path for url in urls] == [
            "/h/0/jsonrpc", "/h/1/jsonrpc", "/h/2/jsonrpc"]
        clients = [AgentClient(url, connect_timeout=1, request_timeout=2) for url in urls]
        try:
            for client in clients:
                check_result("ping", await client.call("ping"))
                page = await client.call("listTasks", {"pageSize": 1000})
                check_result("listTasks", page)
                assert len(page["tasks"]) == 2
            await _ctl(process, "kill", hosts=[1])
            with pytest.raises(AgentUnreachable):
                await clients[1].call("ping")
            check_result("ping", await clients[0].call("ping"))
            await _ctl(process, "start", hosts=[1])
            check_result("ping", await clients[1].call("ping"))
            wrong = AgentClient(urls[0].replace("/h/0/", "/h/9/"), connect_timeout=1,
                                request_timeout=2)
            with pytest.raises(AgentUnreachable, match="HTTP 404"):
                await wrong.call("ping")
            await wrong.close()
        finally:
            for client in clients:
                await client.close()

        # addHost takes a path prefix before /jsonrpc (rpc_schema/engine.json), not
        # another path.
        engine = await make_engine()
        refused = await engine.error("addHost", name="other", url=urls[2].replace(
            "/jsonrpc", "/other"))
        assert refused.data["field"] == "params.url"
        await engine.call("addHost", name="pathhost", url=urls[2])
        await engine.wait_status("pathhost", "up", timeout=10)
        assert (await engine.host("pathhost"))["url"] == urls[2]

        async def listed() -> bool:
            return (await engine.host("pathhost"))["counts"]["tasks"].get("done") == 2
        await async_until(listed, timeout=10)


@pytest.mark.slow
async def test_periodic_resyncs_read_on_the_long_polls_connection(make_engine: Any,
                                                                  tmp_path: Path) -> None:
    """A followed host's periodic resync waits for its long-poll to end (timed to end
    when the resync is due) and reads its lists on the connection that freed: none is
    read beside a long-poll, and no connection is opened for it (each resync opened
    and closed one or two, ~0.5 ms of the engine's CPU each)."""
    with hollow(tmp_path, 2, "--tasks", "3") as process:
        engine = await make_engine(resync_interval=1.5, events_timeout=30)
        for host in process.hosts:
            await engine.call("addHost", name=host["name"], url=host["url"])

        async def followed() -> bool:
            hosts = (await engine.call("listHosts"))["hosts"]
            return all(h["status"] == "up" and h["eventsFeed"] for h in hosts)
        await async_until(followed, timeout=15)
        await asyncio.sleep(2.5)  # the first resync (asked by the feed's first contact)
        before = await _ctl(process, "resetCounters")
        assert before["requests"].get("listTasks", 0) >= 2
        event = (await _ctl(process, "tick", hosts=[1], kind="task"))[process.hosts[1]["name"]]
        await asyncio.sleep(6)  # ~4 periodic resyncs a host, and an event among them
        status = await _ctl(process, "status")
        assert status["requests"]["listTasks"] >= 2 * 3
        assert status["requests"]["getStorageConnectionList"] >= 2 * 3
        assert status["listedBesidePoll"] == 0
        assert status["accepted"] == 0
        # The long-polls still bring the events at once.
        assert await _seen_within(engine, process.hosts[1]["name"], event["taskID"],
                                  event["state"], 2.0) < 2.0
