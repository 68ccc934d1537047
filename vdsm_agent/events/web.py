"""HTTP side of the events feed: ``GET /events``, and its stop at shutdown.

``GET /events[?since=N][&epoch=E][&follow=1]`` answers newline-delimited JSON
(``application/x-ndjson``, chunked): a ``hello`` line, then one event per
line. Without ``follow`` it sends the retained events after ``since`` and
ends; with ``follow`` it goes on sending new events as they come until the
client goes away or the agent shuts down, so ``curl -N '.../events?follow=1'``
prints them live. A reader that falls behind the bound gets a ``gap`` line and
continues from the oldest retained event. While nothing happens a followed
stream sends a ``keepalive`` line every ``stream_keepalive_interval`` seconds
(proxies and clients time idle streams out). A slow reader holds its stream
back, with a bounded buffer; one that takes nothing for
``stream_stall_timeout`` seconds is disconnected (``server/streaming.py``).
Bad query values are HTTP 400 with a JSON body.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from vdsm_agent import errors
from vdsm_agent.agent import Agent
from vdsm_agent.events.feed import Event, EventFeed, ndjson_pieces
from vdsm_agent.server import streaming
from vdsm_agent.server.http import json_response
from vdsm_agent.settings import Config

log = logging.getLogger(__name__)

ROUTE = "/events"
CONTENT_TYPE = "application/x-ndjson"
# Bytes of event lines per write: less than streaming.PIECE (a piece is not cut
# again), small enough that a held-back follower keeps little (~0.9 KB an event).
LINES_PIECE = 16 * 1024
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _bad_request(detail: str, field: str) -> web.Response:
    error = errors.InvalidParams(detail, field=field, rule="query")
    return json_response(error.to_body(), 400)


async def stream_events(request: web.Request, feed: EventFeed,
                        config: Config) -> web.StreamResponse:
    query = request.query
    try:
        since = int(query.get("since", "0"))
    except ValueError:
        return _bad_request("since must be an integer", "since")
    if since < 0:
        return _bad_request("since must be 0 or more", "since")
    follow_text = query.get("follow", "0").lower()
    if follow_text not in _TRUE | _FALSE:
        return _bad_request("follow must be 1 or 0", "follow")
    follow = follow_text in _TRUE
    epoch = query.get("epoch") or None
    response = web.StreamResponse(headers={
        "Content-Type": CONTENT_TYPE,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    })
    await response.prepare(request)

    def alive() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    batches: AsyncIterator[list[Event] | None] = feed.stream(since, epoch, follow, alive)
    if follow:
        batches = streaming.with_keepalive(batches, config.stream_keepalive_interval)
    try:
        async with (streaming.Follower(request, response, config.stream_stall_timeout)
                    as follower, streaming.closing(batches)):
            async for batch in batches:
                if batch is None:
                    batch = [feed.keepalive()]
                for piece in ndjson_pieces(batch, LINES_PIECE):
                    await follower.send(piece)
                batch.clear()  # sent: a follower held back keeps no event alive
            await response.write_eof()
    except ConnectionError:
        pass  # the client went away, or stalled and was dropped
    return response


def install(app: web.Application, agent_key: web.AppKey[Agent]) -> None:
    """Add the route, and end long-polls and streams when the agent shuts down."""

    async def on_shutdown(app: web.Application) -> None:
        # Runs before the server waits for open requests.
        if agent_key in app:
            app[agent_key].events.close()

    async def handler(request: web.Request) -> web.StreamResponse:
        agent = request.app[agent_key]
        return await stream_events(request, agent.events, agent.config)

    app.on_shutdown.append(on_shutdown)
    app.router.add_get(ROUTE, handler)
