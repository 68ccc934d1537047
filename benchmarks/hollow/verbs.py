"""The agent verbs a hollow host answers, as encoded JSON results.

Each verb takes the host and the request's params and returns its result as
orjson bytes (the task documents and the connection list are kept encoded,
see ``state``), or raises one of the agent's own errors
(``vdsm_agent.errors``: the same codes, names and data shape). Params are not
validated against the schema (the engine sends valid ones; validating costs
more than answering): a missing or mistyped param is an ``InvalidParams``
naming it, never a traceback. ``tests/test_hollow_agents.py`` validates every
result against ``rpc_schema/agent.json`` and checks that the engine calls no
verb that is missing here.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

import rpc_schema
from benchmarks.hollow.state import (
    FINAL,
    GENERATED_KIND,
    SCHEMES,
    HollowHost,
    Target,
    request_digest,
)
from rpc_schema import openrpc
from vdsm_agent import API_VERSION, __version__, errors
from vdsm_agent.common.clock import parse_rfc3339
from vdsm_agent.connections.monitor import ErrorInfo
from vdsm_agent.tasks.kinds import KINDS

VERSION = f"{__version__}+hollow"
MAX_PAGE_SIZE = 1000
MAX_WAIT_TASK = 600.0

Verb = Callable[[HollowHost, dict[str, Any]], Awaitable[bytes]]


def _param(params: dict[str, Any], name: str, kind: type | tuple[type, ...],
           default: Any = ...) -> Any:
    """``params[name]`` of ``kind`` (a bool is not a number), else ``default`` (None:
    optional); InvalidParams naming the field otherwise."""
    value = params.get(name, default)
    if value is ...:
        raise errors.InvalidParams(f"params.{name} is required", field=f"params.{name}",
                                   rule="required")
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kind):
        raise errors.InvalidParams(f"params.{name} has the wrong type",
                                   field=f"params.{name}", rule="type")
    return value


def _task_id(params: dict[str, Any]) -> str:
    return str(_param(params, "taskID", str))


# -- host --------------------------------------------------------------------------------


async def ping(host: HollowHost, params: dict[str, Any]) -> bytes:
    return orjson.dumps({"version": VERSION, "uptime": round(host.uptime, 3)})


async def get_capabilities(host: HollowHost, params: dict[str, Any]) -> bytes:
    return orjson.dumps({
        "version": VERSION, "apiVersion": API_VERSION, "hostname": host.name,
        "uriSchemes": list(SCHEMES), "taskKinds": sorted(host.options.kinds),
        "limits": {"maxBodySize": 1 << 20, "maxBatch": 100}})


@functools.cache
def _discover_document() -> bytes:
    return orjson.dumps(openrpc.document(rpc_schema.load("agent")))


async def discover(host: HollowHost, params: dict[str, Any]) -> bytes:
    return _discover_document()


# -- tasks -------------------------------------------------------------------------------


def _resources(kind: str, params: dict[str, Any]) -> tuple[str, ...]:
    """What a task locks: test.sleep's ``resources`` as the real kind reports them;
    the hollow kinds touch nothing."""
    if kind != GENERATED_KIND:
        return ()
    names = params.get("resources") or ()
    return tuple(sorted(f"test:{name}" for name in names if isinstance(name, str)))


def _run_seconds(host: HollowHost, kind: str, params: dict[str, Any]) -> float:
    if kind == GENERATED_KIND:
        seconds = params.get("seconds", 1)
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return float(seconds)
        raise errors.InvalidParams("params.params.seconds must be a number >= 0",
                                   field="params.params.seconds", rule="type")
    return host.options.task_seconds


def _kind_info(name: str) -> dict[str, Any]:
    """A kind as getTaskKinds describes it: the real kind's description and schemas, and
    what a hollow task of it locks (``_resources``): test.sleep's ``resources``, the
    real declaration; nothing for the hollow kinds, which touch nothing."""
    real = KINDS.get(name)
    info = real.describe() if real is not None else {
        "name": name, "description": "a hollow kind", "destructive": False,
        "paramsSchema": {"type": "object"}, "resultSchema": {"type": "object"},
        "sharesResources": False}
    info["resourceParams"] = dict(real.resource_params) if (
        real is not None and name == GENERATED_KIND) else {}
    return info


@functools.cache
def _kinds_answer(kinds: tuple[str, ...]) -> bytes:
    return orjson.dumps({"kinds": [_kind_info(name) for name in sorted(kinds)]})


async def get_task_kinds(host: HollowHost, params: dict[str, Any]) -> bytes:
    return _kinds_answer(tuple(host.options.kinds))


async def start_task(host: HollowHost, params: dict[str, Any]) -> bytes:
    kind = str(_param(params, "kind", str))
    task_params = _param(params, "params", dict)
    task_id = _param(params, "taskID", str, None)
    deadline_text = _param(params, "deadline", str, None)
    if kind not in host.options.kinds:
        raise errors.UnknownTaskKind(f"no task kind {kind!r}", kind=kind,
                                     known=sorted(host.options.kinds))
    deadline = None
    if deadline_text is not None:
        try:
            deadline = parse_rfc3339(deadline_text)
        except ValueError as exc:
            raise errors.InvalidParams(f"deadline: {exc}", field="params.deadline",
                                       rule="format") from None
    digest = request_digest(kind, task_params, deadline)
    if task_id is not None:
        task_id = task_id.lower()
        known = host.tasks.get(task_id)
        if known is not None:  # a retry: the same answer, or a conflict
            if known.digest != digest:
                raise errors.TaskIdConflict(f"task {task_id} exists with another request",
                                            taskID=task_id)
            return orjson.dumps({"taskID": known.id, "state": known.state})
    seconds = _run_seconds(host, kind, task_params)
    if deadline is not None and deadline <= time.time():
        raise errors.InvalidParams("the deadline has already passed", field="params.deadline",
                                   rule="future")
    resources = _resources(kind, task_params)
    holder = host.unfinished_holder(resources)
    if holder is not None:
        raise errors.ResourceBusy(f"{holder[0]} is held by task {holder[1]}",
                                  resource=holder[0], holder=holder[1])
    task = host.add_task(kind, task_params, task_id, resources, deadline, digest)
    host.drive(task, seconds)
    return orjson.dumps({"taskID": task.id, "state": task.state})


async def get_task(host: HollowHost, params: dict[str, Any]) -> bytes:
    return host.task(_task_id(params)).encoded()


async def get_task_output(host: HollowHost, params: dict[str, Any]) -> bytes:
    """A hollow task writes no output (its ``outputSize`` is 0): an empty read, at its
    end once the task is final, as a real agent answers for a silent task."""
    task = host.task(_task_id(params))
    encoding = _param(params, "encoding", str, "utf-8")
    if encoding not in ("utf-8", "base64"):
        raise errors.InvalidParams("params.encoding is utf-8 or base64",
                                   field="params.encoding", rule="enum")
    return orjson.dumps({"data": "", "encoding": encoding, "offset": 0, "nextOffset": 0,
                         "eof": task.final, "truncatedBefore": 0, "size": 0})


async def list_tasks(host: HollowHost, params: dict[str, Any]) -> bytes:
    current = host.tasks_token()
    since = _param(params, "changedSince", str, None)
    if since is not None and not 1 <= len(since) <= 128:
        raise errors.InvalidParams("params.changedSince must be 1..128 characters",
                                   field="params.changedSince", rule="maxLength")
    if since == current:
        return b"".join((b'{"tasks":[],"nextPageToken":null,"changeToken":',
                         orjson.dumps(current), b',"notModified":true}'))
    where = _param(params, "filter", dict, {})
    page_size = _param(params, "pageSize", int, 100)
    if not 1 <= page_size <= MAX_PAGE_SIZE:
        raise errors.InvalidParams(f"params.pageSize must be 1..{MAX_PAGE_SIZE}",
                                   field="params.pageSize", rule="maximum")
    token = _param(params, "pageToken", str, None)
    page, next_token = host.list_tasks(where, page_size, token)
    return b"".join((b'{"tasks":[', b",".join(task.encoded() for task in page),
                     b'],"nextPageToken":', orjson.dumps(next_token), b',"changeToken":',
                     orjson.dumps(current), b',"notModified":false}'))


async def cancel_task(host: HollowHost, params: dict[str, Any]) -> bytes:
    task = host.task(_task_id(params))
    if task.final:
        raise errors.TaskNotActive(f"task {task.id} is {task.state}", taskID=task.id,
                                   state=task.state)
    host.request_stop(task)
    return task.encoded()


async def delete_task(host: HollowHost, params: dict[str, Any]) -> bytes:
    task = host.task(_task_id(params))
    if not task.final:
        raise errors.TaskActive(f"task {task.id} is {task.state}", taskID=task.id,
                                state=task.state)
    host.delete_task(task)
    return orjson.dumps({"taskID": task.id, "deleted": True})


async def wait_task(host: HollowHost, params: dict[str, Any]) -> bytes:
    task = host.task(_task_id(params))
    timeout = float(_param(params, "timeout", (int, float), 30))
    if not 0 <= timeout <= MAX_WAIT_TASK:
        raise errors.InvalidParams(f"params.timeout must be 0..{MAX_WAIT_TASK:g} seconds",
                                   field="params.timeout", rule="maximum",
                                   maximum=MAX_WAIT_TASK)
    deadline = time.monotonic() + timeout
    # Any event of the host wakes the wait (the feed is the host's one pulse).
    feed = host.feed
    while task.state not in FINAL and (left := deadline - time.monotonic()) > 0 \
            and not feed.closed:
        await feed.wait(feed.last_seq, left)
    return task.encoded()


# -- events ------------------------------------------------------------------------------


async def get_events(host: HollowHost, params: dict[str, Any]) -> bytes:
    since = _param(params, "since", int, 0)
    timeout = float(_param(params, "timeout", (int, float), 0))
    epoch = _param(params, "epoch", str, None)
    max_events = _param(params, "maxEvents", int, 1000)
    limit = host.options.events_max_wait
    if timeout > limit:
        raise errors.InvalidParams(
            f"params.timeout must be at most {limit:g} seconds (setting events_max_wait)",
            field="params.timeout", rule="maximum", maximum=limit)
    if since < 0 or timeout < 0 or not 1 <= max_events <= 10000:
        raise errors.InvalidParams("since, timeout >= 0; maxEvents 1..10000",
                                   field="params", rule="minimum")
    page = await host.feed.wait(since, timeout, epoch, max_events)
    return orjson.dumps(page.to_api())


# -- storage connections -----------------------------------------------------------------


def _connection_id(params: dict[str, Any]) -> str:
    connection_id = str(_param(params, "connectionID", str))
    if not 1 <= len(connection_id) <= 128 or "/" in connection_id:
        raise errors.InvalidParams("params.connectionID: 1-128 characters without '/'",
                                   field="params.connectionID", rule="pattern")
    return connection_id


async def get_connection_list(host: HollowHost, params: dict[str, Any]) -> bytes:
    since = _param(params, "changedSince", str, None)
    if since is None:
        return host.connection_list()
    if len(since) > 128:
        raise errors.InvalidParams("params.changedSince must be at most 128 characters",
                                   field="params.changedSince", rule="maxLength")
    current = orjson.dumps(host.connections_token())
    if since == host.connections_token():
        return b'{"connections":null,"changeToken":' + current + b',"notModified":true}'
    return b"".join((b'{"connections":', host.connection_list(), b',"changeToken":', current,
                     b',"notModified":false}'))


async def get_connection(host: HollowHost, params: dict[str, Any]) -> bytes:
    connection_id = _connection_id(params)
    target = host.connection(connection_id)
    return orjson.dumps(target.status(connection_id, time.time(), host.options.probe_interval))


async def manage_connection(host: HollowHost, params: dict[str, Any]) -> bytes:
    """A new target connects (``connecting`` -> ``connected`` 50 ms later, one event);
    the same ID and URI again is the same answer; another URI is ConnectionIdInUse."""
    uri = str(_param(params, "uri", str))
    connection_id = _connection_id(params)
    scheme, separator, rest = uri.partition("://")
    if not separator or not rest:
        raise errors.InvalidUri(f"not a URI: {uri!r}", uri=uri)
    if scheme not in SCHEMES:
        raise errors.UnsupportedScheme(f"no backend for {scheme}://", scheme=scheme)
    known = host.connection_ids.get(connection_id)
    if known is not None and known.uri != uri:
        raise errors.ConnectionIdInUse(f"{connection_id} names {known.uri}",
                                       connectionID=connection_id, uri=known.uri)
    if known is None:
        new_target = uri not in host.targets
        target = host.add_connection(connection_id, uri, state="connecting")
        if new_target:
            _connect_soon(host, target)
    else:
        target = known
    return orjson.dumps(target.status(connection_id, time.time(), host.options.probe_interval))


def _connect_soon(host: HollowHost, target: Target) -> None:
    def connected() -> None:
        if host.targets.get(target.uri) is target and target.state == "connecting":
            host.set_connection_state(target, "connected")

    asyncio.get_running_loop().call_later(0.05, connected)


async def unmanage_connection(host: HollowHost, params: dict[str, Any]) -> bytes:
    connection_id = _connection_id(params)
    host.connection(connection_id)
    target, last = host.remove_connection(connection_id)
    return orjson.dumps({"connectionID": connection_id, "disconnected": last,
                         "sharedWith": sorted(target.ids), "lastError": None})


def probe_error(code: str, message: str) -> ErrorInfo:
    return ErrorInfo(code=code, message=message, at=time.time())


VERBS: dict[str, Verb] = {
    "ping": ping,
    "getCapabilities": get_capabilities,
    "rpc.discover": discover,
    "getTaskKinds": get_task_kinds,
    "startTask": start_task,
    "getTask": get_task,
    "getTaskOutput": get_task_output,
    "listTasks": list_tasks,
    "cancelTask": cancel_task,
    "deleteTask": delete_task,
    "waitTask": wait_task,
    "getEvents": get_events,
    "getStorageConnectionList": get_connection_list,
    "getStorageConnection": get_connection,
    "manageStorageConnection": manage_connection,
    "unmanageStorageConnection": unmanage_connection,
}
