"""A host's task output through the engine, so that nobody needs to ssh to a host.

* ``getTaskOutput(host, taskID, offset, maxBytes, encoding)``: the host's own
  ``getTaskOutput``, asked at once (the engine keeps no output), with ``host``
  added. A host that does not answer (or is in maintenance) is
  ``HostUnreachable``; a task it does not have is ``TaskNotFound``.
* ``GET /hosts/{host}/tasks/{taskID}/output[?follow=1][&offset=N][&keepalive=1]``:
  the host's ``GET /tasks/{taskID}/output`` stream, relayed as it comes (plain
  bytes; with ``follow`` until the task ends), so ``curl -N`` on the engine
  prints a task's output live. The upstream stream always asks the agent for
  keep-alives (a NUL byte while the task is silent) so that a frozen agent is
  noticed: ``SILENCE`` seconds without a byte end the stream. They reach the
  engine's client only when it asked for ``keepalive=1`` too. Errors before
  the first byte are JSON bodies like the agent's: 404 (``HostNotFound``,
  ``TaskNotFound``), 503 (``HostUnreachable``), 429 (``LimitExceeded``: more
  than ``MAX_FOLLOWERS`` streams at once), 502 (the agent answered something
  else).

Each stream has an HTTP session of its own (``AgentClient.stream``), apart from
the host's connection pool, and is written with the agent's back-pressure and
stall watchdog (``server/streaming.py``). The engine's shutdown closes them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from aiohttp import web

from vdsm_agent import errors
from vdsm_agent.engine.agentclient import AgentError, AgentUnreachable
from vdsm_agent.engine.engine import Engine
from vdsm_agent.engine.leases import Visitor
from vdsm_agent.engine.poller import HostWorker
from vdsm_agent.engine.store import repository
from vdsm_agent.server import streaming
from vdsm_agent.server.http import json_response
from vdsm_agent.tasks.files import canonical_task_id

log = logging.getLogger(__name__)

ROUTE = "/hosts/{host}/tasks/{task_id}/output"
SILENCE = 300.0  # seconds without a byte from the agent (its keep-alives: 15 s) that end a stream
STALL_TIMEOUT = 60.0  # seconds a client may take nothing while data waits (the agent's default)
MAX_FOLLOWERS = 64  # streams relayed at once
KEEPALIVE = b"\0"
_TRUE = frozenset({"1", "true", "yes", "on"})


# -- the verb ------------------------------------------------------------------------------


async def read(engine: Engine, host: str, task_id: str, offset: int, max_bytes: int,
               encoding: str) -> dict[str, Any]:
    """``getTaskOutput`` of the host, asked now."""
    worker = await _worker(engine, host)
    params = {"taskID": task_id, "offset": offset, "maxBytes": max_bytes, "encoding": encoding}
    try:
        result = await worker.call("getTaskOutput", params)
    except AgentUnreachable as exc:
        raise errors.HostUnreachable(f"host {host} does not answer ({exc}); the engine keeps "
                                     "no task output", host=host) from None
    except AgentError as exc:
        if exc.name == "TaskNotFound":
            raise errors.TaskNotFound(f"no task {task_id} on host {host}", host=host,
                                      taskID=task_id) from None
        raise errors.HostUnreachable(f"host {host} refused getTaskOutput: {exc}",
                                     host=host) from None
    return {**result, "host": host}


async def _worker(engine: Engine, host: str) -> HostWorker | Visitor:
    await engine.store.run(repository.get_host, host)  # HostNotFound
    # Another engine's host (several engines): called from here all the same.
    worker = await engine.reach(host) if engine.leases is not None else engine.host(host)
    if worker is None or worker.maintenance:
        raise errors.HostUnreachable(f"host {host} is in maintenance (not polled)", host=host)
    return worker


# -- the stream ----------------------------------------------------------------------------


def _error(status: int, error: errors.RpcError) -> web.Response:
    return json_response(error.to_body(), status)


async def _relay(upstream: aiohttp.ClientResponse, keepalive: bool) -> AsyncIterator[bytes]:
    """The agent's bytes; its keep-alives (an HTTP chunk of one NUL) only if asked for."""
    chunk_start = True
    async for data, chunk_end in upstream.content.iter_chunks():
        alone = chunk_start and chunk_end
        chunk_start = chunk_end
        if data == KEEPALIVE and alone and not keepalive:
            continue
        if data:
            yield data


class Followers:
    """The engine's relayed streams: counted, and closed at shutdown."""

    def __init__(self, engine_of: Callable[[web.Request], Engine]) -> None:
        self.engine_of = engine_of
        self.open: set[aiohttp.ClientResponse] = set()

    async def shutdown(self, app: web.Application) -> None:
        for upstream in list(self.open):
            upstream.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = request.match_info["host"]
        raw_id = request.match_info["task_id"]
        try:
            task_id = canonical_task_id(raw_id)
        except ValueError:
            return _error(404, errors.TaskNotFound(f"no task {raw_id!r}", taskID=raw_id))
        query = request.query
        follow = query.get("follow", "0").lower() in _TRUE
        keepalive = follow and query.get("keepalive", "0").lower() in _TRUE
        offset = query.get("offset", "0")
        if not offset.isdigit():
            return _error(400, errors.InvalidParams("offset must be an integer, 0 or more",
                                                    field="offset", rule="query"))
        if len(self.open) >= MAX_FOLLOWERS:
            return _error(429, errors.LimitExceeded(
                f"{MAX_FOLLOWERS} task output streams are open", limit="streams",
                max=MAX_FOLLOWERS))
        try:
            worker = await _worker(self.engine_of(request), host)
            client = await worker.ensure_client()
            upstream_query = {"offset": offset, **({"follow": "1", "keepalive": "1"}
                                                   if follow else {})}
            async with client.stream(f"/tasks/{task_id}/output", upstream_query,
                                     SILENCE) as upstream:
                return await self._answer(request, upstream, host, task_id, keepalive)
        except errors.RpcError as exc:
            return _error(404 if isinstance(exc, errors.HostNotFound) else 503, exc)
        except AgentUnreachable as exc:
            return _error(503, errors.HostUnreachable(f"host {host} does not answer: {exc}",
                                                      host=host))

    async def _answer(self, request: web.Request, upstream: aiohttp.ClientResponse,
                      host: str, task_id: str, keepalive: bool) -> web.StreamResponse:
        if upstream.status == 404:
            return _error(404, errors.TaskNotFound(f"no task {task_id} on host {host}",
                                                   host=host, taskID=task_id))
        if upstream.status != 200:
            said = (await upstream.read())[:200].decode("utf-8", "replace")
            return _error(502, errors.HostUnreachable(
                f"host {host} answered HTTP {upstream.status}: {said}", host=host))
        response = web.StreamResponse(headers={
            "Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff"})
        await response.prepare(request)
        self.open.add(upstream)
        try:
            async with streaming.Follower(request, response, STALL_TIMEOUT) as follower:
                async for data in _relay(upstream, keepalive):
                    await follower.send(data)
                await response.write_eof()
        except ConnectionError:
            pass  # our client went away, or stalled
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The agent went away or fell silent mid-stream: the stream just ends.
            log.info("output of task %s on host %s: upstream ended: %s", task_id, host,
                     type(exc).__name__)
        finally:
            self.open.discard(upstream)
        return response


def install(app: web.Application, engine_of: Callable[[web.Request], Engine]) -> None:
    """Add the output stream's route and close open streams at shutdown."""
    followers = Followers(engine_of)
    app.on_shutdown.append(followers.shutdown)
    app.router.add_get(ROUTE, followers.handle)
