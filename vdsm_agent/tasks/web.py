"""HTTP side of tasks: the manager's life cycle in the app, and the output stream.

``GET /tasks/{taskID}/output[?follow=1][&offset=N][&keepalive=1]`` streams a
task's output as plain bytes (chunked), so ``curl -N .../tasks/ID/output?follow=1``
prints it as it is written and ends when the task ends. Without ``follow`` it
sends what there is and ends. With ``keepalive=1`` a followed stream sends a NUL
byte every ``stream_keepalive_interval`` seconds while the task is silent (opt-in:
the stream is otherwise the task's exact bytes). A slow reader holds its stream
back with a bounded buffer, and is disconnected after ``stream_stall_timeout``
seconds without taking anything (``server/streaming.py``). An unknown task is
404 with a JSON body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from vdsm_agent import errors
from vdsm_agent.agent import Agent
from vdsm_agent.server import streaming
from vdsm_agent.server.http import json_response
from vdsm_agent.settings import Config
from vdsm_agent.tasks import files
from vdsm_agent.tasks.manager import TaskManager

log = logging.getLogger(__name__)

OUTPUT_ROUTE = "/tasks/{task_id}/output"
_TRUE = frozenset({"1", "true", "yes", "on"})


def _json_error(status: int, error: errors.RpcError) -> web.Response:
    return json_response(error.to_body(), status)


def _bad_request(detail: str, field: str) -> web.Response:
    return _json_error(400, errors.InvalidParams(detail, field=field, rule="query"))


KEEPALIVE = b"\0"  # task output is text: the client strips these


async def stream_output(request: web.Request, manager: TaskManager,
                        config: Config) -> web.StreamResponse:
    raw_id = request.match_info["task_id"]
    try:
        task_id = files.canonical_task_id(raw_id)
    except ValueError:
        return _json_error(404, errors.TaskNotFound(f"no task {raw_id!r}", taskID=raw_id))
    follow = request.query.get("follow", "0").lower() in _TRUE
    keepalive = follow and request.query.get("keepalive", "0").lower() in _TRUE
    try:
        offset = int(request.query.get("offset", "0"))
    except ValueError:
        return _bad_request("offset must be an integer", "offset")
    if offset < 0:
        return _bad_request("offset must be 0 or more", "offset")
    if not await manager.exists(task_id):
        return _json_error(404, errors.TaskNotFound(f"no task {task_id}", taskID=task_id))
    response = web.StreamResponse(headers={
        "Content-Type": "text/plain; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    })
    await response.prepare(request)
    chunks: AsyncIterator[bytes | None] = manager.stream_output(task_id, offset, follow)
    if keepalive:
        chunks = streaming.with_keepalive(chunks, config.stream_keepalive_interval)
    try:
        async with (streaming.Follower(request, response, config.stream_stall_timeout)
                    as follower, streaming.closing(chunks)):
            try:
                async for data in chunks:
                    await follower.send(KEEPALIVE if data is None else data)
            except errors.TaskNotFound:
                pass  # deleted while we streamed: end the stream
            await response.write_eof()
    except ConnectionError:
        pass  # the client went away (also while ending the stream), or stalled
    return response


def install(app: web.Application, agent_key: web.AppKey[Agent]) -> None:
    """Start the task manager with the app (after the agent context) and add the route."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        agent = app[agent_key]
        agent.tasks = await TaskManager.start(agent.config, agent.store)
        try:
            yield
        finally:
            await agent.tasks.close()

    async def on_shutdown(app: web.Application) -> None:
        # Runs before the server waits for open requests: end long-polls and streams.
        manager = app[agent_key].tasks if agent_key in app else None
        if manager is not None:
            manager.begin_shutdown()

    def manager_of(request: web.Request) -> TaskManager:
        manager = request.app[agent_key].tasks
        assert manager is not None
        return manager

    async def handler(request: web.Request) -> web.StreamResponse:
        return await stream_output(request, manager_of(request), request.app[agent_key].config)

    app.cleanup_ctx.append(context)
    app.on_shutdown.append(on_shutdown)
    app.router.add_get(OUTPUT_ROUTE, handler)


