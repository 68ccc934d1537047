"""HTTP answers shared by the agent's and the engine's aiohttp applications."""

from __future__ import annotations

import asyncio
import logging
import uuid

import orjson
from aiohttp import web

from vdsm_agent import errors
from vdsm_agent.server.jsonrpc import Dispatcher, error_answer

log = logging.getLogger(__name__)

JSON = "application/json"


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=JSON)


async def _body_too_slow(request: web.Request, body_timeout: float) -> web.Response:
    """HTTP 408 with a JSON-RPC error, then the connection is closed at once
    (aiohttp would otherwise linger up to 10 s to read the rest of the body)."""
    response = json_response(error_answer(errors.refused_request(errors.LimitExceeded(
        f"the request body did not arrive within {body_timeout:g} s", limit="header_timeout",
        max=body_timeout))), status=408)
    response.force_close()
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


async def jsonrpc_response(request: web.Request, dispatcher: Dispatcher,
                           max_body_size: int, body_timeout: float = 10.0) -> web.Response:
    """Answer one ``POST /jsonrpc``: always a JSON-RPC answer (or 204), never HTTP 500.

    A body still arriving must be complete within ``body_timeout`` seconds (the
    agent's ``header_timeout``), or the connection is closed after a 408."""
    try:
        if request.content.is_eof():  # the whole body is here (nearly always)
            body = await request.read()
        else:
            async with asyncio.timeout(body_timeout):
                body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return json_response(error_answer(errors.refused_request(errors.LimitExceeded(
            f"request body larger than {max_body_size} bytes", limit="max_body_size",
            max=max_body_size))), status=413)
    except TimeoutError:
        return await _body_too_slow(request, body_timeout)
    except ConnectionError:
        # The client left before its body was read (aiohttp fails the read even when
        # the body had arrived): nothing to run and nobody to answer. Not logged as
        # an error: any local process can do this as often as it likes.
        log.debug("the client of a POST /jsonrpc went away before its body was read")
        return web.Response(status=400)
    try:
        answer = await dispatcher.dispatch(body)
    except Exception:
        # Dispatch itself failed (a bug): still a JSON-RPC answer.
        correlation_id = uuid.uuid4().hex[:16]
        log.exception("dispatch failed [correlation_id=%s]", correlation_id)
        return json_response(error_answer(
            errors.InternalError(correlationId=correlation_id).to_error()))
    if answer is None:
        return web.Response(status=204)
    return web.Response(body=answer, content_type=JSON)
